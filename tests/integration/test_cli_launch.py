"""``sdze-train`` as users launch it: on two CPU processes, as a sweep, with a typo.

* ``trainer=ddp trainer.devices=2``: Lightning starts the command again for rank 1; both
  ranks train to the same parameters, rank 0 alone writes the run directory and prints
  the summary, and a resume works the same way.
* ``-m``: a refused or failed job records its status in its own run directory, the sweep
  runs the rest, and the process exits 1 with one line per job that did not complete.
* Hydra's composition errors (an unknown option or key) are one line and exit status 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sdze_lightning.cli import BAD_INPUT_EXIT

TESTS = Path(__file__).resolve().parents[1]
SMALL = [
    "model.width=16",
    "model.depth=2",
    "pde.n_interior=64",
    "pde.n_boundary=16",
    "pde.n_eval=256",
]
QUIET_CALLBACKS = ["~callbacks.progress", "~callbacks.memory"]  # checkpoints kept


def sdze_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``sdze-train <args>`` in a fresh process that can import ``tests/cli_helpers.py``."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "HYDRA_FULL_ERROR"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "sdze_lightning.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def summary_lines(stdout: str) -> list[dict]:
    """The JSON summaries printed on stdout (one per completed run)."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{"rel_l2"')]


# ---------------------------------------------------------------------------------- DDP
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Five DDP steps through the CLI, then a resume to eight: the processes' outputs."""
    root = tmp_path_factory.mktemp("ddp")
    run_dir = root / "run"

    def launch(params: Path, *extra: str) -> subprocess.CompletedProcess:
        return sdze_train(
            *extra, f"hydra.run.dir={run_dir}",
            "+callbacks.rank_params._target_=cli_helpers.SaveRankParameters",
            f"+callbacks.rank_params.dirpath={params}", cwd=root)

    first = launch(root / "first", "pde=poisson2d", "method=sdze", "trainer=ddp",
                   "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=5", *SMALL,
                   *QUIET_CALLBACKS)
    first_files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    first_summary = json.loads((run_dir / "summary.json").read_text())
    resumed = launch(root / "resumed", "ckpt_path=last", "trainer.max_steps=8")
    return run_dir, root, first, (first_files, first_summary), resumed


def rank_states(folder: Path) -> list[dict]:
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_ddp_through_the_cli_trains_both_ranks_to_the_same_parameters(ddp_run):
    run_dir, root, first, _, _ = ddp_run
    assert first.returncode == 0, first.stderr[-3000:]
    rank0, rank1 = rank_states(root / "first")
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["global_step"] == rank1["global_step"] == 5
    assert rank0["params"].keys() == rank1["params"].keys()
    for key, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][key]), key


def test_ddp_through_the_cli_writes_one_run_record(ddp_run):
    run_dir, root, first, (first_files, written), _ = ddp_run
    assert first.returncode == 0, first.stderr[-3000:]
    [printed] = summary_lines(first.stdout)  # rank 1 prints none
    assert printed == written and written["steps"] == 5 and written["status"] == "completed"
    # one config record (rank 1 neither refused the directory nor wrote a segment of its own)
    assert ".hydra/config.yaml" in first_files and not any("segment" in f for f in first_files)
    assert yaml.safe_load((run_dir / ".hydra" / "choices.yaml").read_text())["trainer"] == "ddp"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    rank0, _ = rank_states(root / "first")
    for key, value in rank0["params"].items():
        assert torch.equal(ckpt["state_dict"][key], value), key


def test_ddp_resume_through_the_cli(ddp_run):
    run_dir, root, _, _, resumed = ddp_run
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    [printed] = summary_lines(resumed.stdout)
    assert printed == json.loads((run_dir / "summary.json").read_text())
    assert printed["steps"] == 8 and [s["steps"] for s in printed["segments"]] == [5, 8]
    rank0, rank1 = rank_states(root / "resumed")
    assert rank0["global_step"] == rank1["global_step"] == 8
    for key, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][key]), key
    segments = sorted(p.name for p in (run_dir / ".hydra").glob("segment-*"))
    assert segments == ["segment-1"]


FUSED = ["experiment=twobody_fused", "pde.dim=64", "pde.n_interior=33", "model.width=16",
         "model.depth=2", "pde.n_eval=64", "trainer.max_steps=4", "trainer.precision=64-true",
         "trainer.accelerator=cpu", *QUIET_CALLBACKS]


@pytest.mark.parametrize("world", [2])
def test_fused_adafactor_ddp_through_the_cli_equals_one_process(tmp_path, world):
    """``experiment=twobody_fused trainer=ddp trainer.devices=2``: both ranks end with the
    parameters of the one-process run on the same 33 points (shares of 17 and 16)."""
    states = {}
    for devices in (world, 1):
        params = tmp_path / f"params{devices}"
        run = sdze_train(*FUSED, *(["trainer=ddp"] if devices > 1 else []),
                         f"trainer.devices={devices}", f"hydra.run.dir={tmp_path / str(devices)}",
                         "+callbacks.rank_params._target_=cli_helpers.SaveRankParameters",
                         f"+callbacks.rank_params.dirpath={params}", cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        states[devices] = [torch.load(params / f"rank{r}.pt", weights_only=False)
                           for r in range(devices)]
    rank0, rank1 = states[world]
    assert rank0["world_size"] == world and rank0["global_step"] == rank1["global_step"] == 4
    [single] = states[1]
    for key, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][key]), key
        # float64; the ranks' factors are summed in another order (~1e-16 relative per
        # entry) and Adafactor's step G / sqrt(V) is scale-free: ~1e-16 * lr per step
        torch.testing.assert_close(value, single["params"][key], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------- sweeps
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep whose second job is refused (bad input) and whose third fails at step 2."""
    root = tmp_path_factory.mktemp("sweep")
    out = sdze_train(
        "-m", "pde._target_=sdze_lightning.problems.Poisson2D,cli_helpers.NaNAtStepTwo",
        "method=adam,fused_adafactor", "trainer.max_steps=4", *SMALL, "callbacks=none",
        f"hydra.sweep.dir={root}", cwd=root)
    return root, out


def job_summary(root: Path, num: int) -> dict:
    return json.loads((root / str(num) / "summary.json").read_text())


def test_sweep_runs_every_job_and_records_each_status(sweep):
    root, out = sweep
    # jobs: 0 Poisson2D+adam, 1 Poisson2D+fused, 2 NaN+adam, 3 NaN+fused
    assert job_summary(root, 0)["status"] == "completed"
    assert job_summary(root, 1)["status"].startswith("refused: estimator=exact")
    assert job_summary(root, 2)["status"].startswith("failed: NonFiniteLossError")
    assert job_summary(root, 3)["status"].startswith("refused: estimator=exact")
    assert job_summary(root, 0)["steps"] == 4 and job_summary(root, 2)["steps"] == 2
    assert len(summary_lines(out.stdout)) == 2  # the jobs that trained


def test_sweep_exits_1_with_one_line_per_job_that_did_not_complete(sweep):
    root, out = sweep
    assert out.returncode == 1, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("sdze-train: job ")]
    assert [ln.split(" (")[0] for ln in lines] == [
        "sdze-train: job 1", "sdze-train: job 2", "sdze-train: job 3"]
    assert "method=fused_adafactor" in lines[0] and "refused: estimator=exact" in lines[0]
    assert "cli_helpers.NaNAtStepTwo" in lines[1] and "failed: NonFiniteLossError" in lines[1]
    assert "sdze-train: 3 job(s) of the sweep did not complete." in out.stderr


def test_sweep_of_completed_jobs_exits_0(tmp_path):
    out = sdze_train("-m", "seed=0,1", "trainer.max_steps=2", *SMALL, "callbacks=none",
                     "logger=none", f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [job_summary(tmp_path, n)["status"] for n in (0, 1)] == ["completed"] * 2
    assert "did not complete" not in out.stderr


def test_sweep_refuses_jobs_that_lightning_would_launch_per_rank(tmp_path):
    out = sdze_train("-m", "seed=0,1", "trainer=ddp", "trainer.accelerator=cpu", *SMALL,
                     f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 1
    for num in (0, 1):
        assert job_summary(tmp_path, num)["status"].startswith(
            "refused: trainer.strategy=ddp with trainer.devices=2 cannot run inside a sweep")
    assert not list(tmp_path.rglob("*.ckpt")) and not summary_lines(out.stdout)


def test_single_run_keeps_its_exit_codes(tmp_path):
    refused = sdze_train("method=fused_adafactor", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert refused.returncode == BAD_INPUT_EXIT
    assert not (tmp_path / "a" / "summary.json").exists()  # as before: no run record
    failed = sdze_train("pde._target_=cli_helpers.NaNAtStepTwo", "trainer.max_steps=4", *SMALL,
                        "callbacks=none", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["status"].startswith(
        "failed: NonFiniteLossError")


# ------------------------------------------------------------------- composition errors
@pytest.mark.parametrize(("args", "message"), [
    (["method=adamw"], "Error: method=adamw is not an option of 'method'; choose one of: "
                       "adam, fused_adafactor, mezo, pde_aware, sdze."),
    (["-m", "estimator=exact,nope"], "Error: estimator=nope is not an option of 'estimator'; "
                                     "choose one of: exact, fd, hte, sdgd, stein, stein_he, "
                                     "taylor."),
    (["trainer.max_stepz=5"], "Error: trainer.max_stepz is not a key of 'trainer' (its keys: "
                              "_target_, accelerator, default_root_dir, devices, "
                              "enable_model_summary, log_every_n_steps, max_epochs, max_steps, "
                              "num_sanity_val_steps, precision); check the spelling, or add a "
                              "new key with +trainer.max_stepz=<value>."),
])
def test_composition_error_is_one_line_with_status_2(tmp_path, args, message):
    out = sdze_train(*args, f"hydra.run.dir={tmp_path / 'run'}",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert out.returncode == BAD_INPUT_EXIT
    assert out.stderr.strip() == message
    assert not (tmp_path / "run").exists()
    assert not list(tmp_path.rglob("summary.json"))  # no job of the sweep ran


def test_hydra_full_error_keeps_the_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "sdze_lightning.cli", "method=adamw"], cwd=tmp_path,
        env=dict(os.environ, HYDRA_FULL_ERROR="1"), capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" in out.stderr
    assert "MissingConfigException" in out.stderr


@pytest.mark.slow  # two spawned processes; the pickling it needs is unit-tested in CI
def test_ddp_spawn_through_the_cli_pickles_the_problem_and_its_loggers(tmp_path):
    out = sdze_train("pde=poisson_twobody", "+trainer.strategy=ddp_spawn", "trainer.devices=2",
                     "trainer.max_steps=6", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
