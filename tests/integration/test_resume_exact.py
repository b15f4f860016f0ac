"""Exact resume: a run killed at step k, resumed from ``last.ckpt``, continues the
same trajectory bit for bit (CPU, float64).

Nothing but the checkpoint carries state between the two processes: points and estimator
directions come from ``(seed, step, key, stream)``, SDZE's directions and bases from
``(method seed, step / window, layer)``; generators are stateless per step, so the step
counter and the seeds (saved by Lightning and by ``PINNProblem.on_save_checkpoint``) fix
the rest. The killed run is a subprocess (this file run as a script) that SIGKILLs itself.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sdze_lightning.estimators.taylor import TaylorEstimator
from sdze_lightning.methods import SDZE, Adam, MeZO
from sdze_lightning.nn import MLP
from sdze_lightning.problems import Poisson2D

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: 1 thread is faster here

STEPS = 10
EVERY = 4  # checkpoints after steps 4 and 8
KILL_AT = 7  # killed at the start of step 7: last.ckpt is from step 4, steps 4-6 are lost

METHODS = {
    # period 3 and carry=project: the resume falls inside a window and crosses window changes
    "sdze": functools.partial(SDZE, lr=1e-2, rank=2, period=3, queries=2, update="adam",
                              carry="project", seed=5),
    "mezo": functools.partial(MeZO, lr=1e-3, queries=2, seed=5, normalize=False),
    "adam": functools.partial(torch.optim.Adam, lr=1e-2),
    # two param groups, both under the StepLR schedule
    "adam_input_lr": functools.partial(Adam, lr=1e-2, input_lr=1e-3),
}


def make_problem(method: str, net_seed: int = 0, **kwargs) -> Poisson2D:
    est = TaylorEstimator(num_directions=2, distribution="rademacher")
    scheduler = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3, gamma=0.7)
    kwargs.setdefault("seed", 3)
    return Poisson2D(net=MLP(2, width=12, depth=2, seed=net_seed), n_interior=32, n_boundary=8,
                     n_eval=64, estimator=est, method=METHODS[method], scheduler=scheduler,
                     **kwargs)


class LossLog(L.Callback):
    """Per-step training loss, in memory and (optionally) appended to a file as it happens."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        step = trainer.global_step - 1
        self.losses[step] = pl_module.last_loss
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(f"{step} {pl_module.last_loss.hex()}\n")


class KillAt(L.Callback):
    """SIGKILL this process at the start of a step (no cleanup, no checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def trainer(ckpt_dir: Path | None, callbacks=(), **kwargs) -> L.Trainer:
    callbacks = list(callbacks)
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=EVERY,
                                         save_last=True, save_top_k=0))
    return L.Trainer(
        max_steps=kwargs.pop("max_steps", STEPS), logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", devices=1,
        precision="64-true", enable_checkpointing=ckpt_dir is not None, callbacks=callbacks,
        **kwargs,
    )


def uninterrupted(method: str) -> tuple[dict[int, float], Poisson2D]:
    problem = make_problem(method)
    losses = LossLog()
    trainer(None, [losses]).fit(problem)
    return losses.losses, problem


def resume(method: str, ckpt_dir: Path, **kwargs) -> tuple[dict[int, float], Poisson2D]:
    problem = make_problem(method, net_seed=123, **kwargs)  # other weights: all from the ckpt
    losses = LossLog()
    trainer(ckpt_dir, [losses]).fit(problem, ckpt_path="last")
    return losses.losses, problem


def test_killed_run_resumes_bit_for_bit(tmp_path):
    reference, ref_problem = uninterrupted("sdze")
    out = subprocess.run(
        [sys.executable, __file__, str(tmp_path), "sdze"],
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == -signal.SIGKILL, out.stdout[-2000:] + out.stderr[-3000:]
    killed = {int(a): float.fromhex(b) for a, b in
              (line.split() for line in (tmp_path / "losses.txt").read_text().splitlines())}
    assert sorted(killed) == list(range(KILL_AT))  # steps 0..6 ran, then the kill
    assert all(killed[k] == reference[k] for k in killed)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == EVERY
    # what the checkpoint holds: step counters, subspace coordinates and rule state, seeds
    zo = ckpt["optimizer_states"][0]["state"]["zo"]
    assert zo == {"step": EVERY, "window": EVERY // 3, "rule_step": EVERY}  # carry=project
    layer_state = ckpt["optimizer_states"][0]["state"][0]
    assert {"coords", "exp_avg", "exp_avg_sq"} <= set(layer_state)
    assert ckpt["sdze_lightning"]["seed"] == 3 and ckpt["sdze_lightning"]["method_seeds"] == [5]

    resumed, problem = resume("sdze", tmp_path / "ckpt")
    assert sorted(resumed) == list(range(EVERY, STEPS))
    assert [resumed[k] for k in resumed] == [reference[k] for k in resumed]  # bit for bit
    for a, b in zip(problem.net.parameters(), ref_problem.net.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["mezo", "adam", "adam_input_lr"])
def test_stopped_run_resumes_bit_for_bit(tmp_path, method):
    reference, ref_problem = uninterrupted(method)
    trainer(tmp_path, max_steps=EVERY).fit(make_problem(method))
    resumed, problem = resume(method, tmp_path)
    assert [resumed[k] for k in range(EVERY, STEPS)] == [reference[k] for k in
                                                         range(EVERY, STEPS)]
    for a, b in zip(problem.net.parameters(), ref_problem.net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_prefetching_run_stops_and_resumes_bit_for_bit(tmp_path):
    """prefetch=True on both sides of a resume (the module converted to float64 by the
    Trainer in between) gives the trajectory of the uninterrupted run without prefetching."""
    reference, ref_problem = uninterrupted("sdze")
    trainer(tmp_path, max_steps=EVERY).fit(make_problem("sdze", prefetch=True))
    resumed, problem = resume("sdze", tmp_path, prefetch=True)
    assert problem.points(0, 0).dtype == torch.float64
    assert [resumed[k] for k in range(EVERY, STEPS)] == [reference[k] for k in
                                                         range(EVERY, STEPS)]
    for a, b in zip(problem.net.parameters(), ref_problem.net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_resume_with_another_seed_is_refused(tmp_path):
    trainer(tmp_path, max_steps=EVERY).fit(make_problem("sdze"))
    with pytest.raises(ValueError, match="trained with seed=3"):
        trainer(tmp_path).fit(make_problem("sdze", seed=4), ckpt_path="last")
    other = make_problem("sdze")
    other.method = functools.partial(METHODS["sdze"], seed=6)
    with pytest.raises(ValueError, match="method.seed=5"):
        trainer(tmp_path).fit(other, ckpt_path="last")


def test_cli_resume_with_ckpt_path_last(tmp_path):
    """``sdze-train ... hydra.run.dir=<run> ckpt_path=last`` continues the same trajectory."""
    from sdze_lightning.cli import run

    common = [
        "method=sdze", "method.period=3", "method.queries=2", "estimator=taylor",
        "estimator.num_directions=2", "estimator.distribution=rademacher", "model.width=12",
        "model.depth=2", "pde.n_interior=32", "pde.n_boundary=8", "pde.n_eval=64",
        "trainer.precision=64-true", "trainer.accelerator=cpu",
        "+trainer.enable_progress_bar=false", "logger=none", "~callbacks.progress",
        "~callbacks.memory", f"callbacks.checkpoint.every_n_train_steps={EVERY}",
    ]
    whole = run([*common, f"trainer.max_steps={STEPS}"], tmp_path / "whole")
    first = run([*common, f"trainer.max_steps={EVERY}"], tmp_path / "run")
    resumed = run([*common, f"trainer.max_steps={STEPS}", "ckpt_path=last"], tmp_path / "run")
    assert first["steps"] == EVERY and resumed["steps"] == whole["steps"] == STEPS
    assert resumed["loss"] == whole["loss"]  # the last step's loss, bit for bit
    assert resumed["rel_l2"] == whole["rel_l2"]


if __name__ == "__main__":
    out_dir, name = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    log = LossLog(out_dir / "losses.txt")
    trainer(out_dir / "ckpt", [log, KillAt(KILL_AT)]).fit(make_problem(name))
