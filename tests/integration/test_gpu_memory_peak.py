"""``summary.json``'s CUDA peak is the run's, although ``MemoryMonitor`` resets the counter.

No GPU is needed: torch's CUDA peak counters are replaced by a small fake allocator, and the
monitor is told that the module is on CUDA. Each training step holds a known number of bytes
for its duration, so every peak is known exactly.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from sdze_lightning.callbacks import MemoryMonitor, memory
from sdze_lightning.callbacks.summary import RunSummary, peak_memory_bytes
from torch import nn

BASE = 100  # bytes held throughout (the weights)
STEP_BYTES = (300, 900, 500)  # held during steps 1, 2, 3: the peak is step 2's, not the last's
SLACK = 1024  # reserved = allocated + SLACK


class FakeCuda:
    """torch's CUDA peak counters over a fake allocation count (bytes)."""

    def __init__(self) -> None:
        self.current = BASE
        self.peak = BASE
        self.resets = 0

    def hold(self, nbytes: int) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def release(self, nbytes: int) -> None:
        self.current -= nbytes

    def max_memory_allocated(self, device=None) -> int:
        return self.peak

    def max_memory_reserved(self, device=None) -> int:
        return self.peak + SLACK

    def reset_peak_memory_stats(self, device=None) -> None:
        self.peak = self.current
        self.resets += 1


@pytest.fixture
def fake_cuda(monkeypatch):
    """The fake counters in torch.cuda, device 0 current, and no peak cleared so far."""
    fake = FakeCuda()
    for name in ("max_memory_allocated", "max_memory_reserved", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(memory, "_cleared_peaks", {})
    # the module trains on the CPU; the monitor takes it for a CUDA module
    monkeypatch.setattr(MemoryMonitor, "_is_cuda", staticmethod(lambda pl_module: True))
    return fake


class Holder(L.LightningModule):
    """One parameter; step ``k`` holds ``STEP_BYTES[k]`` fake bytes while it runs."""

    def __init__(self, fake: FakeCuda, before_training: int = 0) -> None:
        super().__init__()
        self.fake = fake
        self.before_training = before_training
        self.w = nn.Parameter(torch.zeros(1))

    def on_train_start(self) -> None:
        # a transient before the first step's reset (e.g. moving a batch, a warm-up)
        self.fake.hold(self.before_training)
        self.fake.release(self.before_training)

    def training_step(self, batch, batch_idx):
        nbytes = STEP_BYTES[batch_idx]
        self.fake.hold(nbytes)
        loss = ((self.w - 1.0) ** 2).sum()
        self.fake.release(nbytes)
        return loss

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(len(STEP_BYTES), 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class StepPeaks(L.Callback):
    """The monitor's logged per-step CUDA peak after every step."""

    def __init__(self) -> None:
        self.logged: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.logged.append(float(trainer.callback_metrics["memory/peak_allocated_bytes"]))


def fit(module: Holder, callbacks: list[L.Callback]) -> L.Trainer:
    trainer = L.Trainer(max_steps=len(STEP_BYTES), logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        accelerator="cpu", devices=1, log_every_n_steps=1,
                        callbacks=callbacks)
    trainer.fit(module)
    return trainer


def summary_peak(trainer: L.Trainer, module: Holder) -> int:
    """``peak_memory_bytes`` of the run's summary, the module taken to be on ``cuda:0``."""
    module._device = torch.device("cuda", 0)  # after fit: only the summary reads it
    return RunSummary(echo=False).collect(trainer, module, "completed")["peak_memory_bytes"]


def test_the_summary_reports_the_runs_peak_and_the_log_each_steps(fake_cuda):
    module = Holder(fake_cuda)
    recorder = StepPeaks()
    trainer = fit(module, [MemoryMonitor(rss=False, state_bytes=False), recorder])
    assert fake_cuda.resets == len(STEP_BYTES)  # the monitor did reset before every step
    # the logged metric stays per step: each step's own peak, the last one lower
    assert recorder.logged == [BASE + n for n in STEP_BYTES]
    # the summary: step 2's peak, where reading torch's counter would give the last step's
    assert summary_peak(trainer, module) == BASE + max(STEP_BYTES)
    assert memory.cuda_peak_bytes(torch.device("cuda", 0), reserved=True) == (
        BASE + max(STEP_BYTES) + SLACK)


def test_a_peak_before_the_first_reset_counts(fake_cuda):
    before = 2 * max(STEP_BYTES)
    module = Holder(fake_cuda, before_training=before)
    trainer = fit(module, [MemoryMonitor()])
    assert summary_peak(trainer, module) == BASE + before


def test_without_the_monitor_the_counter_alone_gives_the_same_peak(fake_cuda):
    module = Holder(fake_cuda)
    trainer = fit(module, [])
    assert fake_cuda.resets == 0
    assert summary_peak(trainer, module) == BASE + max(STEP_BYTES)


def test_an_index_free_cuda_device_is_the_current_one(fake_cuda):
    fake_cuda.hold(700)
    fake_cuda.release(700)
    memory.reset_cuda_peak(torch.device("cuda", 0))
    assert peak_memory_bytes(torch.device("cuda")) == BASE + 700
    assert fake_cuda.max_memory_allocated() == BASE  # torch's counter alone lost it
