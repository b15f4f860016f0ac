"""The regression suite's quick mode (benchmarks/regression/) runs and writes a complete file.

One pytest run of ``benchmarks/regression --regression-quick`` in a subprocess (the suite
is its own pytest run, with its own conftest and options), at its tiny d. The test checks
the results file's header and that every method has one row with finite positive time and
memory ratios; never the numbers themselves.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
METHODS = {"sdze", "mezo", "adam", "pde_aware", "fused_adafactor"}
HEADER = ("date", "commit", "machine", "load_start", "load_end", "threads", "command")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """The results file of one quick-mode run of the suite (skipped without the tool)."""
    pytest.importorskip("pytest_benchmark")
    out = tmp_path_factory.mktemp("regression") / "quick.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/regression", "--regression-quick",
         f"--benchmark-json={out}", "-q", "-p", "no:hypothesispytest", "-p", "no:anyio"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_quick_mode_writes_the_header(quick_results):
    """Date, commit, machine, load at start and end, threads and command are recorded."""
    missing = [k for k in HEADER if quick_results.get(k) in (None, "", [])]
    assert not missing, f"header fields missing: {missing}"
    assert len(quick_results["load_start"]) == 3 and len(quick_results["load_end"]) == 3
    assert quick_results["threads"] == 1
    assert "--regression-quick" in quick_results["command"]
    assert quick_results["mode"] == "quick"


def test_quick_mode_has_one_finite_row_per_method(quick_results):
    """Every method has one row, measured, with finite positive time and memory ratios."""
    rows = quick_results["rows"]
    assert sorted(r["method"] for r in rows) == sorted(METHODS)  # one row each
    for r in rows:
        assert r["status"] == "ok", r
        for key in ("time_ratio", "memory_ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["method"], key, r[key])
        assert r["overrides"][:2] == ["pde=allen_cahn_twobody", f"pde.dim={r['dim']}"]
    # pytest-benchmark's own entries: time and peak memory of every method
    names = {b["name"] for b in quick_results["benchmarks"]}
    assert names == {f"test_{kind}[{m}-1e2]" for m in METHODS
                     for kind in ("time_step", "peakmem_step")}
