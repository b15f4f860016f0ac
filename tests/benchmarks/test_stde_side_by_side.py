"""``benchmarks/stde_side_by_side.py``: our side in ``--smoke`` mode, and its checks.

The STDE side needs the external JAX checkout and its environment, which the test
machine does not have; what is checked here is what the script hands to it (the
instance: coefficients, held-out points, exact values) and what it refuses.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("stde_side_by_side")


@pytest.mark.slow  # a benchmark script's smoke mode (`pytest -m slow`)
def test_smoke_runs_both_of_our_methods_and_writes_the_floors(bench, tmp_path):
    result = bench.main(["--smoke", "--out", str(tmp_path)])
    assert [r["method"] for r in result["rows"]] == list(bench.OURS)
    for row in result["rows"]:
        assert row["status"] == "completed" and row["steps"] > 0
        assert math.isfinite(row["final_rel_l2"]) and row["train_s"] >= 1.0  # the 1 s budget
    for floors in result["floors"].values():
        # the affine fit contains the constant one, so it cannot be worse on the same points
        assert 0 < floors["affine"] <= floors["constant"] + 1e-9
    written = json.loads((tmp_path / "stde_side_by_side_smoke.json").read_text())
    assert written["floors"] == result["floors"] and "load_start" in written
    # provenance of the file, and each row built from the packaged configs by its overrides
    assert {"date", "commit", "machine", "load_end", "command"} <= set(written)
    assert "benchmarks/stde_side_by_side.py --smoke" in written["command"]
    for method, row in zip(bench.OURS, written["rows"], strict=True):
        assert row["overrides"] == bench.our_overrides(method, 50, 0, 64, smoke=True)
        assert row["command"] == "sdze-train " + " ".join(row["overrides"])
        assert "seed=0" in row["overrides"] and "threads=1" in row["overrides"]
        assert row["threads"] == 1
        assert any("decays linearly" in note for note in row["not_in_command"])


def test_exported_values_are_the_two_body_solution_at_the_exported_points(bench):
    """What STDE is fed: ``(1 - |x|^2) sum_i c_i sin(x_i + cos x_{i+1} + x_{i+1} cos x_i)``."""
    problem, x, u = bench.held_out(bench.our_overrides("adam+taylor", 30, 0, 64, smoke=True))
    c = problem.coeffs.double().numpy()
    a, b = x[:, :-1], x[:, 1:]
    by_hand = (1 - (x**2).sum(1)) * (np.sin(a + np.cos(b) + b * np.cos(a)) @ c)
    np.testing.assert_allclose(u, by_hand, rtol=1e-5, atol=1e-6)  # float32 problem
    assert len(c) == 29 and np.linalg.norm(x, axis=1).max() < 1  # d - 1 terms, in the ball


def test_stde_style_floors_leave_our_instance_untouched(bench):
    problem, _, _ = bench.held_out(bench.our_overrides("adam+taylor", 30, 0, 64, smoke=True))
    before = problem.coeffs.clone()
    floors = bench.instance_floors(problem, 100)
    assert (problem.coeffs == before).all()
    direct = bench.tta.floors(problem, 100)  # another thread count: equal up to rounding
    assert all(math.isclose(floors["ours"][k], v, rel_tol=1e-6) for k, v in direct.items())
    assert floors["stde_style_draw"] != floors["ours"]  # other coefficients, other floors
    drawn = bench.stde_style_coefficients(30, 0)
    np.testing.assert_array_equal(drawn, np.random.RandomState(0).randn(1, 30)[0, :-1])


def test_other_held_out_points_than_the_runs_are_refused(bench, tmp_path, monkeypatch):
    """The check that our runs were evaluated on the points handed to STDE can fail."""
    real = bench.held_out
    monkeypatch.setattr(bench, "held_out", lambda overrides: real(
        [o for o in overrides if not o.startswith("seed=")] + ["seed=1"]))
    with pytest.raises(RuntimeError, match="other held-out points"):
        bench.main(["--smoke", "--out", str(tmp_path)])


def test_a_real_run_needs_the_stde_checkout(bench, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path)])
    assert "--stde-path and --stde-python are required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--stde-path", str(tmp_path), "--stde-python", "python", "--out",
                    str(tmp_path)])
    assert "has no stde/train.py" in capsys.readouterr().err


def test_stde_runs_again_with_its_own_speed_when_the_load_changed(bench, monkeypatch):
    """STDE runs a step count: one that missed the budget by > 10 % is redone, once."""
    calls = []

    def fake(args, instance, epochs):
        calls.append(epochs)
        s_per_step = 0.05 if len(calls) == 1 else 0.04  # slower than calibrated, then not
        return {"steps": epochs, "s_per_step": s_per_step, "train_s": s_per_step * epochs}

    monkeypatch.setattr(bench, "run_stde", fake)
    args = bench.argparse.Namespace(budget_s=200.0, stde_tolerance=0.1, stde_retries=1)
    runs = bench.stde_runs(args, None, {"s_per_step": 0.04})
    assert calls == [5000, 4000]  # 200 s at the calibrated 40 ms, then at the measured 50 ms
    assert [r["train_s"] for r in runs] == [250.0, 160.0]  # kept as measured
    calls.clear()
    assert len(bench.stde_runs(args, None, {"s_per_step": 0.05})) == 1  # within 10 %: once
