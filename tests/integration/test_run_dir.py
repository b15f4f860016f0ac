"""A run directory is never destroyed: resume with its config, history kept, interrupts saved.

The CLI runs as a subprocess (``sdze-train`` as a user types it); the interrupted run is
this file run as a script, which sends itself the signal at the start of a step.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from sdze_lightning.cli import run
from sdze_lightning.run_dir import override_key, resume_config
from sdze_lightning.validation import validation_interval

SMALL = [
    "model.width=12",
    "model.depth=2",
    "pde.n_interior=32",
    "pde.n_boundary=8",
    "pde.n_eval=128",
    "callbacks.checkpoint.every_n_train_steps=4",
    "~callbacks.progress",
    "~callbacks.memory",
]
FIRST = ["method=sdze", "estimator=taylor", "trainer.max_steps=10", *SMALL]


def sdze_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "sdze_lightning.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of the run directory but the append-only log, by relative path."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != "cli.log"
    }


def metric_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """The README's main job, small: an SDZE run of 10 steps."""
    run_dir = tmp_path_factory.mktemp("first") / "R"
    out = sdze_train(*FIRST, "trainer.log_every_n_steps=1", f"hydra.run.dir={run_dir}",
                     cwd=run_dir.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return dst


def test_resume_without_overrides_continues_the_same_run(first_run, tmp_path):
    """A bare ckpt_path=last continues with the stored config (SDZE, not the default Adam)."""
    run_dir = copy_run(first_run, tmp_path / "R")
    out = sdze_train("trainer.max_steps=14", f"hydra.run.dir={run_dir}", "ckpt_path=last",
                     cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 14
    segment = (run_dir / ".hydra" / "segment-1" / "config.yaml").read_text()
    assert "SDZE" in segment and "max_steps: 14" in segment
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == (
        first_run / ".hydra" / "config.yaml").read_bytes()


def test_resume_with_a_conflicting_override_is_refused_and_writes_nothing(first_run, tmp_path):
    run_dir = copy_run(first_run, tmp_path / "R")
    before = snapshot(run_dir)
    out = sdze_train("method=adam", "seed=3", "trainer.max_steps=14",
                     f"hydra.run.dir={run_dir}", "ckpt_path=last", cwd=tmp_path)
    assert out.returncode != 0
    message = out.stderr + out.stdout
    assert "method (the run has 'sdze', this command gives 'adam')" in message
    assert "seed (the run has 0, this command gives 3)" in message
    assert snapshot(run_dir) == before


def test_a_new_run_in_a_used_directory_is_refused(first_run, tmp_path):
    run_dir = copy_run(first_run, tmp_path / "R")
    before = snapshot(run_dir)
    out = sdze_train(*FIRST, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode != 0 and "already holds a run" in out.stderr + out.stdout
    assert snapshot(run_dir) == before


def test_history_survives_two_resumes(first_run, tmp_path):
    run_dir = copy_run(first_run, tmp_path / "R")
    for steps in (14, 18):
        out = sdze_train(f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1",
                         f"hydra.run.dir={run_dir}", "ckpt_path=last", cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
    assert metric_steps(run_dir) == list(range(18))  # one row per step, none lost or repeated
    summary = json.loads((run_dir / "summary.json").read_text())
    segments = summary["segments"]
    assert [(s["first_step"], s["steps"]) for s in segments] == [(0, 10), (10, 14), (14, 18)]
    assert summary["wall_time_s"] == pytest.approx(sum(s["wall_time_s"] for s in segments))
    assert summary["wall_time_s"] > segments[-1]["wall_time_s"]
    for n in (1, 2):
        assert (run_dir / ".hydra" / f"segment-{n}" / "overrides.yaml").is_file()


def test_safe_overrides_apply_and_protected_ones_name_both_values():
    stored = {"config": {"seed": 0, "method": {"lr": 0.01}, "trainer": {"max_steps": 10,
              "precision": "32-true"}, "scheduler": {"T_max": 10, "eta_min": 0.0}},
              "choices": {"method": "sdze"}}
    from omegaconf import OmegaConf

    new = OmegaConf.create({"seed": 0, "method": {"lr": 0.001}, "trainer": {
        "max_steps": 20, "precision": "64-true"}, "scheduler": {"T_max": 20, "eta_min": 0.5}})
    cfg, _ = resume_config(new, stored, ["trainer.max_steps=20", "scheduler.T_max=20"],
                           {"method": "adam"})
    assert cfg.trainer.max_steps == 20 and cfg.scheduler.T_max == 20 and cfg.method.lr == 0.01
    with pytest.raises(ValueError, match=r"trainer\.precision \(the run has '32-true', this "
                                         r"command gives '64-true'\)"):
        resume_config(new, stored, ["trainer.precision=64-true"], {})
    with pytest.raises(ValueError, match=r"scheduler\.eta_min"):
        resume_config(new, stored, ["scheduler.eta_min=0.5"], {})
    assert override_key("+callbacks.x._target_=a.B") == "callbacks.x._target_"


# ------------------------------------------------------------------ interruption
class SignalAt(L.Callback):
    """Send this process a signal at the start of a step (once, or twice in a row)."""

    def __init__(self, step: int, signum: int, times: int = 1) -> None:
        self.step, self.signum, self.times = step, signum, times

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


def interrupted_run(run_dir: Path, signum: int, times: int = 1) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, __file__, str(run_dir), str(int(signum)), str(times)],
        env=env, capture_output=True, text=True, timeout=300,
    )


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    return ckpt["state_dict"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_that_resumes_bit_exactly(first_run, tmp_path, signum):
    out = interrupted_run(tmp_path / "R", signum)
    assert out.returncode == 130, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["status"] == "interrupted" and summary["steps"] == 6
    assert summary["rel_l2"] is not None and summary["loss"] is not None
    assert f"resume with: sdze-train hydra.run.dir={tmp_path / 'R'} ckpt_path=last" in out.stderr
    out = sdze_train(f"hydra.run.dir={tmp_path / 'R'}", "ckpt_path=last", "callbacks=default",
                     cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed, straight = final_state(tmp_path / "R"), final_state(first_run)
    assert resumed.keys() == straight.keys()
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key


def test_second_signal_stops_at_once_without_checkpoint(tmp_path):
    out = interrupted_run(tmp_path / "R", signal.SIGINT, times=2)
    assert out.returncode != 0 and out.returncode != 130
    ckpt = torch.load(tmp_path / "R" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4  # the periodic one: nothing of the stopped step is saved


# ------------------------------------------------------------------ loggers
def test_unwritable_logger_directory_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="logger.save_dir=/proc/nope cannot be written"):
        run([*FIRST, "logger.save_dir=/proc/nope"], tmp_path / "R")
    assert not (tmp_path / "R").exists()


class BreakCSV(L.Callback):
    """After step 3, replace the CSV logger's directory by a file (root-proof failure)."""

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 3:
            folder = Path(trainer.logger.log_dir)
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()
            folder.write_text("not a directory")


def test_logger_failing_mid_run_is_reported_once_and_training_goes_on(tmp_path, caplog):
    summary = run([*FIRST, "trainer.log_every_n_steps=1", "+logger.flush_logs_every_n_steps=1",
                   f"+callbacks.breaker._target_={__name__}.BreakCSV"], tmp_path / "R")
    assert summary["status"] == "completed" and summary["steps"] == 10
    assert summary["logger_failures"] and all(
        f.startswith("AppendingCSVLogger.") for f in summary["logger_failures"])
    reports = [r for r in caplog.records if "training continues without it" in r.getMessage()]
    assert len(reports) == len(summary["logger_failures"]) >= 1


# ------------------------------------------------------------------ validation cadence
def test_validation_cadence_follows_the_run_length(tmp_path):
    assert [validation_interval(n) for n in (10, 200, 1050, 20000, -1)] == [10, 10, 53, 1000,
                                                                            1000]
    run([*FIRST, "trainer.max_steps=20", "trainer.log_every_n_steps=1"], tmp_path / "R")
    with open(tmp_path / "R" / "csv" / "metrics.csv", newline="") as f:
        evaluated = [int(r["step"]) for r in csv.DictReader(f) if r.get("val/rel_l2")]
    assert evaluated == [9, 19]


if __name__ == "__main__":  # the interrupted run (see interrupted_run)
    target, signum, times = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    from sdze_lightning.cli import compose_config, train

    cfg = compose_config([*FIRST, f"+callbacks.signal._target_={__name__}.SignalAt",
                          "+callbacks.signal.step=5", f"+callbacks.signal.signum={signum}",
                          f"+callbacks.signal.times={times}"], target)
    result = train(cfg, target)
    print(json.dumps(result), flush=True)
    sys.exit(130 if result.get("status") == "interrupted" else 1)
