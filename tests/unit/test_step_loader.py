"""The step-index loader resumes mid-epoch (``StepLoader``: Lightning's ``_Stateful`` loader).

A run stopped mid-epoch and resumed from its checkpoint continues the epoch at the index
where it stopped: Lightning has no "dataloader is not resumable" warning to give, the
resumed run sees the indices (and validates at the steps) of an uninterrupted run, and its
parameters equal that run's bit for bit. A plain ``DataLoader`` in the same scenario gets
the warning and restarts the indices at 0 (the control that shows these tests can fail).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import Sine1D, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler

from sdze_lightning.collocation import StepLoader
from sdze_lightning.nn import MLP

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: 1 thread is faster here

PER_EPOCH = 7  # epochs end after steps 7, 14, 21
STOP = 10  # the first run stops (and checkpoints) 3 indices into its second epoch
STEPS = 17
WARNING = "not resumable"


class PlainLoader(Sine1D):
    """The old loader: a stock ``DataLoader`` of step indices (no state)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(range(self.steps_per_epoch), batch_size=None)


class Record(L.Callback):
    """The index each step got and the steps after which validation ran."""

    def __init__(self) -> None:
        self.indices: dict[int, int] = {}
        self.validated: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.indices[trainer.global_step] = int(batch)

    def on_validation_end(self, trainer, pl_module):
        self.validated.append(trainer.global_step)


def make_problem(cls: type[Sine1D] = Sine1D, net_seed: int = 0) -> Sine1D:
    return cls(dim=1, net=MLP(1, width=16, depth=2, seed=net_seed), n_interior=32,
               n_boundary=8, n_eval=64, steps_per_epoch=PER_EPOCH)


def fit(problem: Sine1D, max_steps: int, ckpt_dir: Path | None = None,
        ckpt_path: str | None = None) -> tuple[Record, list[str]]:
    """Fit with a checkpoint every STOP steps; the record and the warnings' texts."""
    record = Record()
    callbacks: list[L.Callback] = [record]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=STOP,
                                         save_last=True, save_top_k=0))
    trainer = quiet_trainer(max_steps=max_steps, callbacks=callbacks,
                            enable_checkpointing=ckpt_dir is not None, precision="64-true")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(problem, ckpt_path=ckpt_path)
    return record, [str(w.message) for w in caught]


def stop_and_resume(tmp_path: Path, cls: type[Sine1D]) -> tuple[Record, list[str], Sine1D]:
    first, _ = fit(make_problem(cls), STOP, ckpt_dir=tmp_path)
    assert sorted(first.indices) == list(range(STOP))
    problem = make_problem(cls, net_seed=123)  # other weights: all from the checkpoint
    record, messages = fit(problem, STEPS, ckpt_dir=tmp_path,
                           ckpt_path=str(tmp_path / "last.ckpt"))
    return record, messages, problem


def test_mid_epoch_resume_gives_no_resumability_warning(tmp_path):
    _, messages, _ = stop_and_resume(tmp_path / "new", Sine1D)
    assert not [m for m in messages if WARNING in m]
    # the control: the same scenario with the old, stateless loader is warned about
    _, messages, _ = stop_and_resume(tmp_path / "old", PlainLoader)
    assert [m for m in messages if WARNING in m]


def test_mid_epoch_resume_continues_the_epoch_bit_for_bit(tmp_path):
    reference = make_problem()
    whole, _ = fit(reference, STEPS)
    assert whole.indices == {step: step % PER_EPOCH for step in range(STEPS)}
    assert whole.validated == [7, 14]

    resumed, _, problem = stop_and_resume(tmp_path, Sine1D)
    assert resumed.indices == {step: whole.indices[step] for step in range(STOP, STEPS)}
    assert resumed.validated == [14]  # the epoch boundary of the uninterrupted run
    for a, b in zip(problem.net.parameters(), reference.net.parameters(), strict=True):
        assert torch.equal(a, b)

    # the old loader restarts the resumed epoch's indices at 0
    old, _, _ = stop_and_resume(tmp_path / "old", PlainLoader)
    assert old.indices[STOP] == 0 != whole.indices[STOP]


def consume(loader: StepLoader, n: int) -> list[int]:
    """The first ``n`` indices of a new pass over ``loader``."""
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_state_continues_at_the_index_where_it_stopped():
    # step 10 with 7 steps an epoch: the second pass, 3 indices in
    loader = StepLoader(range(PER_EPOCH), batch_size=None)
    assert loader.state_dict() == {"served": 0}
    assert list(loader) == list(range(PER_EPOCH))
    assert loader.state_dict() == {"served": PER_EPOCH}
    assert consume(loader, STOP - PER_EPOCH) == [0, 1, 2]
    state = loader.state_dict()
    assert state == {"served": 3}

    resumed = StepLoader(range(PER_EPOCH), batch_size=None)
    resumed.load_state_dict(state)
    assert len(resumed) == PER_EPOCH  # Lightning counts the epoch's batches from len()
    assert consume(resumed, 1) == [3]
    assert resumed.state_dict() == {"served": 4}  # positions in the epoch, skipped ones too
    resumed.load_state_dict(state)
    assert list(resumed) == [3, 4, 5, 6]
    assert list(resumed) == list(range(PER_EPOCH))  # the next epoch starts at 0


def test_state_at_an_epoch_boundary_starts_the_next_epoch():
    loader = StepLoader(range(PER_EPOCH), batch_size=None)
    list(loader)
    resumed = StepLoader(range(PER_EPOCH), batch_size=None)
    resumed.load_state_dict(loader.state_dict())  # saved at the end of an epoch
    assert list(resumed) == list(range(PER_EPOCH))
    resumed.load_state_dict({"served": PER_EPOCH + 5})  # a longer epoch before: start again
    assert list(resumed) == list(range(PER_EPOCH))
    fresh = StepLoader(range(PER_EPOCH), batch_size=None)
    iter(fresh)  # a pass begun, nothing served yet
    assert fresh.state_dict() == {"served": 0}


def test_loader_rebuilt_with_a_distributed_sampler_stays_resumable():
    """Under DDP Lightning rebuilds the loader with a ``DistributedSampler``; the rebuilt
    loader is still a ``StepLoader`` and resumes in its own (this rank's) positions."""
    from lightning.pytorch.utilities.data import _update_dataloader

    loader = StepLoader(range(PER_EPOCH), batch_size=None)
    rank1 = _update_dataloader(loader, DistributedSampler(loader.dataset, num_replicas=2,
                                                          rank=1, shuffle=False))
    assert isinstance(rank1, StepLoader) and list(rank1) == [1, 3, 5, 0]
    consume(rank1, 2)
    rank1.load_state_dict(rank1.state_dict())
    assert list(rank1) == [5, 0]


def sdze_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "sdze_lightning.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_resume_gives_no_resumability_warning(tmp_path):
    run = tmp_path / "run"
    small = ["model.width=16", "model.depth=2", "pde.n_interior=64", "pde.n_boundary=16",
             "pde.n_eval=256", "logger=none", f"hydra.run.dir={run}"]
    first = sdze_train(*small, "trainer.max_steps=20", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").exists()
    resumed = sdze_train(*small, "trainer.max_steps=30", "ckpt_path=last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert '"steps": 30' in resumed.stdout
    assert WARNING not in resumed.stderr and WARNING not in resumed.stdout
