"""The README's test command is exactly what CI runs."""

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import relative_l2_by_hand

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: 1 thread is faster here

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    command = [line for line in ci_lines if "pytest" in line and not line.startswith("#")]
    assert len(command) == 1
    assert command[0] in (ROOT / "README.md").read_text().splitlines()


def test_readme_subclassing_example_runs(monkeypatch, tmp_path):
    text = (ROOT / "README.md").read_text()
    block = text.split("## Write a new PDE", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "L.Trainer(max_steps=2000)" in block
    block = block.replace(
        "L.Trainer(max_steps=2000)",
        "L.Trainer(max_steps=50, logger=False, enable_checkpointing=False, "
        "enable_progress_bar=False, accelerator='cpu')",
    )
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    problem = namespace["problem"]
    untrained = type(problem)(dim=1, n_interior=128, n_boundary=16, estimator="exact")
    # the printed error is the trained network's, and 50 Adam steps more than halve the
    # untrained one (seeded, measured on the 2-core CPU: 0.998 -> 0.386)
    error = problem.relative_l2_error()
    assert math.isclose(error, relative_l2_by_hand(problem), rel_tol=1e-5)
    assert error < 0.5 * untrained.relative_l2_error()


def test_readme_train_command_is_an_sdze_run_that_reports_its_error(tmp_path, monkeypatch):
    from sdze_lightning import cli
    from sdze_lightning.cli import build_problem, run

    lines = [
        line for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("python3 -m venv") and "sdze-train" in line
    ]
    assert len(lines) == 1
    overrides = lines[0].split("sdze-train", 1)[1].split()
    assert "method=sdze" in overrides
    # the same job, 5 steps instead of 2000, without files and progress bar
    overrides = [o for o in overrides if not o.startswith("trainer.max_steps=")]
    built = []

    def build_and_keep(cfg):
        problem = build_problem(cfg)
        built.append((problem, problem.relative_l2_error()))
        return problem

    monkeypatch.setattr(cli, "build_problem", build_and_keep)
    summary = run([*overrides, "trainer.max_steps=5", "logger=none", "callbacks=none"], tmp_path)
    assert summary["status"] == "completed" and summary["steps"] == 5
    (problem, untrained), = built
    # the summary reports the error of the network the run leaves behind (SDZE's offset
    # folded in), and the run at least halved the untrained network's error: that one
    # outputs about 0 (error ~1), and the output fit alone moves the mean output to the
    # loss-minimising constant; on Poisson 2D (u* = sin(x1 + x2) on [0, 1]^2) the best
    # constant's error is sqrt(1 - E[u*]^2 / E[u*^2]) = sqrt(1 - 0.7737^2 / 0.6474) = 0.27
    assert math.isclose(summary["rel_l2"], relative_l2_by_hand(problem), rel_tol=1e-5)
    assert summary["rel_l2"] < 0.5 * untrained


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _console(name: str) -> list[str]:
    """The installed console script ``name``, else the same entry point through python -m."""
    script = Path(sys.executable).with_name(name)
    module = {"sdze-train": "sdze_lightning.cli", "sdze-collect": "sdze_lightning.collect"}
    return [str(script)] if script.exists() else [sys.executable, "-m", module[name]]


def test_readme_sweep_table_and_trained_network(tmp_path, monkeypatch, capsys):
    """The README's sweep, its table and the loaded network, run as written (20 steps)."""
    section = _readme_section("A sweep, its table, and the trained network")
    bash = section.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    python = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert [shlex.split(line)[0] for line in bash] == ["sdze-train", "sdze-collect"]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    for line in bash:
        args = shlex.split(line.replace("trainer.max_steps=2000", "trainer.max_steps=20"))
        out = subprocess.run([*_console(args[0]), *args[1:]], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    sweep = tmp_path / "multirun" / "methods"
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert len(summaries) == 9 and {s["status"] for s in summaries} == {"completed"}
    assert (sweep / "error_vs_time.png").stat().st_size > 0
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    best, problem = namespace["best"], namespace["problem"]
    # the table's first row is the sweep's lowest error, and the loaded network is that run's
    assert float(best["rel_l2"]) == min(s["rel_l2"] for s in summaries)
    assert math.isclose(problem.relative_l2_error(), float(best["rel_l2"]), rel_tol=1e-6)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"{best['method']} {best['seed']} {best['rel_l2']}"
    assert printed[1].startswith("tensor([") and "nan" not in printed[1]
