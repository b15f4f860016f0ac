"""Seed-replay log: per step only (step, lr, 2q loss values); ``sdze-replay`` rebuilds
the trained model from the initial checkpoint and the log, bit-identical on CPU."""

from __future__ import annotations

import functools
import json

import lightning as L
import pytest
import torch
from conftest import load_benchmark
from lightning.pytorch.callbacks import ModelCheckpoint

from sdze_lightning.estimators.taylor import TaylorEstimator
from sdze_lightning.methods import SDZE, MeZO
from sdze_lightning.nn import MLP
from sdze_lightning.problems import Poisson2D
from sdze_lightning.replay import MAGIC, SeedReplayLog, main, read_log, replay

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: 1 thread is faster here

STEPS = 9
Q = 2
METHODS = {
    "sdze": functools.partial(SDZE, lr=1e-2, rank=2, period=4, queries=Q, carry="project",
                              seed=7),
    "mezo": functools.partial(MeZO, lr=1e-3, queries=Q, seed=7, normalize=False),
}


class NaNAt(Poisson2D):
    def __init__(self, bad: int = -1, **kwargs):
        super().__init__(**kwargs)
        self.bad = bad

    def residual(self, x, d):
        r = super().residual(x, d)
        if self._trainer is not None and self.trainer.training and self.global_step == self.bad:
            r = r * float("nan")
        return r


def make(method: str = "sdze", net_seed: int = 0, **kwargs) -> Poisson2D:
    est = TaylorEstimator(num_directions=2, distribution="rademacher")
    scheduler = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.8)
    return NaNAt(net=MLP(2, width=12, depth=2, seed=net_seed), n_interior=24, n_boundary=8,
                 n_eval=32, estimator=est, method=METHODS[method], scheduler=scheduler, **kwargs)


def fit(problem, callbacks=(), ckpt_dir=None, max_steps=STEPS, ckpt_path=None) -> L.Trainer:
    callbacks = list(callbacks)
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=4, save_top_k=-1))
    trainer = L.Trainer(
        max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, accelerator="cpu", devices=1, precision="64-true",
        enable_checkpointing=ckpt_dir is not None, callbacks=callbacks,
    )
    trainer.fit(problem, ckpt_path=ckpt_path)
    return trainer


def identical(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


@pytest.mark.parametrize("method", sorted(METHODS))
def test_replay_rebuilds_the_trained_model_bit_for_bit(method, tmp_path):
    trained = make(method)
    fit(trained, [SeedReplayLog(tmp_path)])
    rebuilt = make(method, net_seed=99)  # other initial weights: all comes from the files
    assert not identical(trained, rebuilt)
    opt = replay(rebuilt, tmp_path / "replay.sdzelog")
    assert identical(trained, rebuilt)  # both folded at the end
    assert opt.zo_state["step"] == STEPS
    # a partial replay stops at the requested step
    partial = make(method, net_seed=99)
    assert replay(partial, tmp_path / "replay.sdzelog", steps=4).zo_state["step"] == 4
    assert not identical(trained, partial)


def test_log_holds_only_step_lr_and_loss_values(tmp_path):
    problem = make()
    log = SeedReplayLog(tmp_path)
    trainer = fit(problem, [log])
    data = (tmp_path / "replay.sdzelog").read_bytes()
    header_bytes = data.index(b"\n", len(MAGIC)) + 1
    assert len(data) == header_bytes + STEPS * (2 + 2 * Q) * 8  # 16 + 16 q bytes per step
    parsed = read_log(tmp_path / "replay.sdzelog")
    assert parsed.header["method"] == "sdze_lightning.methods.sdze:SDZE"
    assert parsed.header["dtype"] == "float64" and parsed.header["method_seed"] == 7
    assert parsed.steps.tolist() == list(range(STEPS))
    lrs = parsed.records[:, 1].tolist()
    # StepLR(2, 0.8), the rate each step used (StepLR multiplies: equal up to rounding)
    assert lrs == pytest.approx([1e-2 * 0.8 ** (k // 2) for k in range(STEPS)], rel=1e-14)
    last = trainer.optimizers[0].last_values.reshape(-1)
    assert torch.equal(parsed.records[-1, 2:], last)
    # a truncated last record (killed while writing) is ignored
    (tmp_path / "cut.sdzelog").write_bytes(data[:-5])
    assert read_log(tmp_path / "cut.sdzelog").records.shape == (STEPS - 1, 2 + 2 * Q)


def test_replay_of_a_run_with_a_skipped_step(tmp_path):
    trained = make(bad=3, divergence="skip")
    fit(trained, [SeedReplayLog(tmp_path)])
    assert trained.skipped_steps == 1
    parsed = read_log(tmp_path / "replay.sdzelog")
    assert torch.isnan(parsed.records[3, 2:]).all() and parsed.steps.tolist() == list(range(STEPS))
    rebuilt = make(net_seed=99)
    replay(rebuilt, tmp_path / "replay.sdzelog")
    assert identical(trained, rebuilt)


def test_log_continues_after_resume(tmp_path):
    reference = make()
    fit(reference)
    fit(make(), [SeedReplayLog(tmp_path / "log")], ckpt_dir=tmp_path / "ckpt", max_steps=6)
    assert read_log(tmp_path / "log" / "replay.sdzelog").steps.tolist() == list(range(6))
    # resumed from the step-4 checkpoint: records 4 and 5 are dropped and written again
    resumed = make(net_seed=99)
    fit(resumed, [SeedReplayLog(tmp_path / "log")], ckpt_dir=tmp_path / "ckpt",
        ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert identical(reference, resumed)
    parsed = read_log(tmp_path / "log" / "replay.sdzelog")
    assert parsed.steps.tolist() == list(range(STEPS))
    rebuilt = make(net_seed=5)
    replay(rebuilt, tmp_path / "log" / "replay.sdzelog")
    assert identical(reference, rebuilt)


def test_first_order_method_is_refused(tmp_path):
    problem = make()
    problem.method = functools.partial(torch.optim.Adam, lr=1e-3)
    with pytest.raises(ValueError, match="seed-replay log needs one zeroth-order"):
        fit(problem, [SeedReplayLog(tmp_path)], max_steps=2)


def test_sdze_replay_command_matches_the_checkpoint(tmp_path, capsys):
    from sdze_lightning.cli import run

    run_dir = tmp_path / "run"
    overrides = [
        "method=sdze", "method.queries=2", "method.period=4", "estimator=taylor",
        "estimator.num_directions=2", "estimator.distribution=rademacher", "model.width=12",
        "model.depth=2", "pde.n_interior=32", "pde.n_boundary=8", "pde.n_eval=64",
        "trainer.max_steps=6", "trainer.precision=64-true", "trainer.accelerator=cpu",
        "+trainer.enable_progress_bar=false", "logger=none", "~callbacks.progress",
        "~callbacks.memory", "callbacks.checkpoint.every_n_train_steps=3",
        "callbacks.checkpoint.save_top_k=-1", "replay_log=true",
    ]
    summary = run(overrides, run_dir)
    assert summary["status"] == "completed"
    log = run_dir / "replay" / "replay.sdzelog"
    assert read_log(log).header["config"]["method"]["_target_"] == "sdze_lightning.methods.SDZE"
    result = main([str(log), "--compare", str(run_dir / "checkpoints" / "last.ckpt")])
    assert result == {"steps": 6, "out": str(log.parent / "replayed.ckpt"), "folded": False,
                      "identical_weights": True, "identical_method_state": True}
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    # the checkpoint of step 3 is matched by a 3-step replay, not by the full one
    result = main([str(log), "--compare", str(run_dir / "checkpoints" / "epoch=0-step=3.ckpt")])
    assert result["steps"] == 3 and result["identical_weights"] and result["identical_method_state"]


def test_replay_size_benchmark_smoke(tmp_path):
    bench = load_benchmark("replay_size")
    row = bench.main(["--smoke", "--out", str(tmp_path)])
    assert row["bit_identical"] and row["records"] == row["steps"]
    assert row["log_bytes_per_step"] == 16 + 16 * row["queries"]
    assert row["checkpoint_bytes"] > 4 * row["params"]  # float32 weights, at least
    # the run is sdze-train with the replay log; the file records its provenance beside it
    assert row["replayed_steps"] == row["steps"]
    assert {"method=sdze", "replay_log=true", "pde.dim=1000", "trainer.max_steps=6"} <= set(
        row["overrides"])
    assert row["sdze_train_command"] == "sdze-train " + " ".join(row["overrides"])
    saved = json.loads((tmp_path / "replay_size_smoke.json").read_text())
    assert saved["log_bytes_per_step"] == row["log_bytes_per_step"]
    assert saved["commit"] and saved["load_end"] is not None
    assert saved["command"].startswith("python benchmarks/replay_size.py --smoke")
