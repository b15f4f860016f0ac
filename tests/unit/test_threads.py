"""The intra-op thread policy (``threads``): choice, override, application, record."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from sdze_lightning.callbacks.summary import RunSummary

from sdze_lightning import threads as policy
from sdze_lightning.cli import run
from sdze_lightning.nn import MLP
from sdze_lightning.problems import Poisson2D

LARGE = 100 * policy.MIN_WORK_PER_THREAD  # a step worth many threads
SMALL = policy.MIN_WORK_PER_THREAD // 2  # a step not worth a second thread


@pytest.mark.parametrize(
    ("work", "free", "reserved", "share", "expected"),
    [
        (SMALL, 2.0, 0, 1, 1),  # small ops: one thread even on an idle machine
        (LARGE, 2.0, 0, 1, 2),  # large ops, both cores idle: both
        (LARGE, 1.0, 0, 1, 1),  # one core busy with another process: one
        (LARGE, 0.8, 0, 1, 1),  # a core 3/4 idle counts as free
        (LARGE, 1.7, 0, 1, 1),  # ... one 0.7 idle does not
        (LARGE, 2.0, 1, 1, 1),  # a prefetch thread takes a core
        (LARGE, 2.0, 0, 2, 1),  # two processes share two cores
        (LARGE, 0.0, 0, 1, 1),  # never fewer than one
        (3 * policy.MIN_WORK_PER_THREAD, 8.0, 0, 1, 3),  # no more than the work can use
    ],
)
def test_choose_threads(work, free, reserved, share, expected):
    assert policy.choose_threads(work, free, cores=8, reserved=reserved, share=share) == expected


def test_choose_threads_never_exceeds_the_allowed_cores():
    assert policy.choose_threads(LARGE, free=8.0, cores=2) == 2


def test_free_cores_from_idle_time(monkeypatch):
    # 2 allowed cores; over the window 150 of 200 jiffies were idle: 1.5 cores free
    readings = iter([(1000, 4000), (1150, 4200)])
    monkeypatch.setattr(policy, "_cpu_times", lambda cpus: next(readings))
    monkeypatch.setattr(policy, "allowed_cores", lambda: 2)
    assert policy.free_cores(window_s=0.0) == pytest.approx(1.5)


def test_free_cores_reads_this_machine():
    free = policy.free_cores(window_s=0.05)
    assert 0.0 <= free <= policy.allowed_cores() + 1e-9


def test_resolve_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert policy.resolve_threads(3, LARGE) == 3  # an integer is used as given
    monkeypatch.setattr(policy, "free_cores", lambda: 2.0)
    monkeypatch.setattr(policy, "allowed_cores", lambda: 2)
    assert policy.resolve_threads("auto", LARGE) == 2
    assert policy.resolve_threads("auto", SMALL) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice wins over auto
    assert policy.resolve_threads("auto", LARGE) == torch.get_num_threads()


@pytest.mark.parametrize("bad", [0, -2, "many", 1.5, True])
def test_bad_thread_setting_is_refused_at_construction(bad):
    with pytest.raises(ValueError, match="threads must be 'auto' or a positive integer"):
        Poisson2D(threads=bad)


class ThreadsDuringTraining(L.Callback):
    def __init__(self) -> None:
        self.seen: set[int] = set()

    def on_train_batch_start(self, *args) -> None:
        self.seen.add(torch.get_num_threads())


def test_fit_uses_the_setting_records_it_and_restores_torch(tmp_path):
    before = torch.get_num_threads()
    wanted = before + 1
    problem = Poisson2D(net=MLP(2, width=8, depth=1), n_interior=16, n_boundary=8, n_eval=16,
                        threads=wanted)
    watch, summary = ThreadsDuringTraining(), RunSummary(dirpath=tmp_path, echo=False)
    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=[watch, summary])
    trainer.fit(problem)
    assert watch.seen == {wanted}
    assert problem.intra_op_threads == wanted and summary.summary["threads"] == wanted
    assert torch.get_num_threads() == before


def test_cli_main_job_gets_one_thread_and_records_it(tmp_path):
    """The README's main job (Poisson 2D, MLP 4x128, 100 points): ~5e6 multiply-adds per
    step, below MIN_WORK_PER_THREAD, so ``auto`` picks one thread whatever the load."""
    summary = run(["method=sdze", "estimator=taylor", "trainer.max_steps=3", "logger=none",
                   "callbacks=none"], tmp_path)
    assert summary["status"] == "completed" and summary["threads"] == 1
    summary = run(["trainer.max_steps=2", "logger=none", "callbacks=none", "model.width=8",
                   "threads=2"], tmp_path / "two")
    assert summary["threads"] == 2
