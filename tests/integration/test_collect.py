"""``sdze-collect DIR`` on what ``sdze-train`` writes: a multirun sweep and a resumed run.

The runs are real ``sdze-train`` processes (two module fixtures: a 2x2 sweep of 20 steps,
one run of 20 steps resumed to 40); ``sdze-collect`` runs in-process through its
console entry point, and once as ``python -m`` for the exit status.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdze_lightning.collect import COLUMNS, console, curve, find_runs, plot, run_row, sort_rows

SMALL = [
    "pde=poisson2d",
    "model.width=16",
    "model.depth=2",
    "pde.n_interior=64",
    "pde.n_boundary=16",
    "pde.n_eval=256",
    "logger=csv",
]
METHODS, SEEDS = ("adam", "sdze"), (0, 1)
#: A total that no fresh clock reaches in a test: written into the checkpoint before the
#: resume, it must reappear in every time/wall_s logged after it.
STORED_S = 1e6


def sdze_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "sdze_lightning.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def sweep(base) -> Path:
    """``sdze-train -m method=adam,sdze seed=0,1``: four jobs of 20 steps."""
    out = sdze_train("-m", *SMALL, "trainer.max_steps=20", "callbacks=none",
                     f"method={','.join(METHODS)}", f"seed={','.join(map(str, SEEDS))}",
                     f"hydra.sweep.dir={base / 'sweep'}", cwd=base)
    assert out.returncode == 0, out.stderr[-3000:]
    return base / "sweep"


@pytest.fixture(scope="module")
def resumed(base) -> Path:
    """One run of 20 steps (validated every 5), resumed with ``ckpt_path=last`` to 40.

    Before the resume, the checkpoint's elapsed time is set to :data:`STORED_S`.
    """
    run_dir = base / "resumed"
    out = sdze_train(*SMALL, "trainer.max_steps=20", "+trainer.val_check_interval=5",
                     "~callbacks.progress", "~callbacks.memory", f"hydra.run.dir={run_dir}",
                     cwd=base)
    assert out.returncode == 0, out.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["callbacks"]["ElapsedTime"]["wall_s"] < STORED_S
    checkpoint["callbacks"]["ElapsedTime"]["wall_s"] = STORED_S
    torch.save(checkpoint, last)
    out = sdze_train(f"hydra.run.dir={run_dir}", "ckpt_path=last", "trainer.max_steps=40",
                     cwd=base)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def collect(*args: str, capsys) -> tuple[int, str, str]:
    status = console([str(a) for a in args])
    out = capsys.readouterr()
    return status, out.out, out.err


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def elapsed_by_step(run_dir: Path) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["time/wall_s"]))
            for r in read_csv(run_dir / "csv" / "metrics.csv") if r.get("time/wall_s")]


def test_sweep_table_sorted_by_error_with_each_runs_values(sweep, capsys):
    status, out, err = collect(sweep, capsys=capsys)
    assert status == 0, err
    rows = read_csv(sweep / "runs.csv")
    assert len(rows) == 4 and list(rows[0]) == list(COLUMNS)
    errors = [float(r["rel_l2"]) for r in rows]
    assert errors == sorted(errors) and len(set(errors)) == 4
    # Hydra numbers the jobs in the order of the sweep's product
    jobs = dict(enumerate(itertools.product(METHODS, SEEDS)))
    for row in rows:
        run_dir = sweep / row["run"]
        assert float(row["rel_l2"]) == summary(run_dir)["rel_l2"]
        assert (row["method"], int(row["seed"])) == jobs[int(row["run"])]
        assert (row["pde"], row["estimator"], row["status"]) == ("poisson2d", "exact", "completed")
        assert f"method={row['method']}" in row["overrides"].split()
        assert int(row["steps"]) == 20 and row["segments"] == "1"
    markdown = (sweep / "runs.md").read_text()
    assert out == markdown
    lines = markdown.splitlines()
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |" and len(lines) == 2 + 4
    assert [line.split(" | ")[0].strip("| ") for line in lines[2:]] == [r["run"] for r in rows]


def test_sort_descending_puts_missing_values_last(base, sweep, resumed, capsys, tmp_path):
    table = tmp_path / "t.csv"
    status, _, err = collect(base, "--sort", "steps", "--descending", "--csv", table,
                             "--markdown", tmp_path / "t.md", capsys=capsys)
    assert status == 0, err
    rows = read_csv(table)
    assert [(r["run"], r["steps"]) for r in rows][:2] == [("resumed", "40"), ("sweep/0", "20")]
    assert len(rows) == 5 and not (base / "runs.csv").exists()
    rows = sort_rows([{"x": 1.0}, {"x": None}, {"x": 3.0}, {"x": float("nan")}], "x", True)
    assert [r["x"] for r in rows][:3] == [3.0, 1.0, None]


def test_unknown_sort_column_is_one_line_and_exit_2(sweep, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "sdze_lightning.collect", str(sweep), "--sort", "accuracy",
         "--csv", str(tmp_path / "t.csv")],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("Error: --sort accuracy") and len(out.stderr.splitlines()) == 1
    assert out.stdout == "" and not (tmp_path / "t.csv").exists()


def test_directory_without_runs_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no runs here")
    status, out, err = collect(tmp_path, capsys=capsys)
    assert status == 2 and out == ""
    assert err.startswith("Error: no runs below") and len(err.splitlines()) == 1
    assert not (tmp_path / "runs.csv").exists()


def test_a_runs_own_files_are_never_overwritten(sweep, capsys):
    before = (sweep / "0" / "summary.json").read_bytes()
    status, _, err = collect(sweep, "--csv", sweep / "0" / "summary.json", capsys=capsys)
    assert status == 2 and err.startswith("Error: ") and len(err.splitlines()) == 1
    assert (sweep / "0" / "summary.json").read_bytes() == before


def test_killed_and_refused_runs_are_listed_and_not_plotted(sweep, tmp_path, capsys):
    root = shutil.copytree(sweep, tmp_path / "sweep")
    killed = root / "killed"
    shutil.copytree(sweep / "0" / ".hydra", killed / ".hydra")
    refused = root / "refused"
    refused.mkdir()
    (refused / "summary.json").write_text(json.dumps({"status": "refused: out of memory"}))
    png = tmp_path / "curves.png"
    status, _, err = collect(root, "--plot", png, capsys=capsys)
    assert status == 0, err
    rows = {r["run"]: r for r in read_csv(root / "runs.csv")}
    assert len(rows) == 6
    assert rows["killed"]["status"] == "unknown" and rows["killed"]["method"] == "adam"
    assert rows["killed"]["rel_l2"] == "" and rows["refused"]["rel_l2"] == ""
    assert rows["refused"]["status"] == "refused: out of memory"
    assert list(rows)[-2:] in (["killed", "refused"], ["refused", "killed"])  # no rel_l2: last
    assert "Note: killed has no val/rel_l2" in err and "Note: refused has no" in err
    assert "Plotted 4 of 6 runs" in err
    assert png.read_bytes().startswith(b"\x89PNG")


def test_plot_has_one_line_per_run_ending_at_its_final_error(sweep, tmp_path):
    runs = find_runs(sweep)
    rows = [run_row(r, sweep) for r in runs]
    fig = plot(rows, sweep, tmp_path / "curves.png")
    lines = fig.axes[0].lines
    assert len(lines) == 4 and (tmp_path / "curves.png").stat().st_size > 0
    assert fig.axes[0].get_yscale() == "log"
    jobs = {f"method={m} seed={s}": str(n)
            for n, (m, s) in enumerate(itertools.product(METHODS, SEEDS))}
    assert sorted(line.get_label() for line in lines) == sorted(jobs)
    for line in lines:
        run_dir = sweep / jobs[line.get_label()]
        assert list(line.get_ydata()) == [e for _, e in curve(run_dir)]
        assert line.get_ydata()[-1] == pytest.approx(summary(run_dir)["rel_l2"], rel=1e-6)


def test_elapsed_time_increases_with_step_in_each_run(sweep):
    for run_dir in find_runs(sweep):
        logged = elapsed_by_step(run_dir)
        assert len(logged) == 2, logged  # validation at steps 10 and 20
        seconds = [s for _, s in sorted(logged)]
        assert seconds == sorted(seconds) and seconds[0] > 0


def test_elapsed_time_continues_across_a_resume(resumed, capsys):
    logged = sorted(elapsed_by_step(resumed))
    before = [s for step, s in logged if step < 20]
    after = [s for step, s in logged if step >= 20]
    assert len(before) == 4 and len(after) == 4, logged
    assert [s for _, s in logged] == sorted(s for _, s in logged)
    assert max(before) < STORED_S <= min(after)
    # the resumed run as a table of one: root itself is the run
    status, _, err = collect(resumed, capsys=capsys)
    assert status == 0, err
    (row,) = read_csv(resumed / "runs.csv")
    assert (row["run"], row["steps"], row["segments"]) == (".", "40", "2")
    assert float(row["rel_l2"]) == summary(resumed)["rel_l2"]
