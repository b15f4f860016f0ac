"""The README's test command is exactly what CI runs."""

import math
from pathlib import Path

import pytest
from conftest import relative_l2_by_hand

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: 1 thread is faster here

ROOT = Path(__file__).resolve().parents[1]


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
    # folded in), and training moved it away from the untrained network's
    assert math.isclose(summary["rel_l2"], relative_l2_by_hand(problem), rel_tol=1e-5)
    assert summary["rel_l2"] != untrained
