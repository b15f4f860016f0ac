"""Smoke runs of the performance benchmarks, called as functions.

Each script's ``--smoke`` mode runs a tiny configuration in-process; the tests
check that it produces its result files and sane rows, not the numbers (those
are meaningless at this size and timings are never asserted). The large runs
are ``slow``: they are the benchmarks themselves, reduced.
"""

from __future__ import annotations

import json
import math
import os
import shlex

import pytest
from conftest import load_benchmark


def assert_timing_provenance(saved: dict, script: str) -> None:
    """A results file of big_run / profile_sdze / scaling / step_memory starts with its
    provenance: date, commit, machine, load at start and end, threads and the command."""
    for key in ("date", "commit", "machine", "load_start", "load_end", "torch_threads_at_start"):
        assert saved[key] not in (None, ""), key
    assert "omp_num_threads_env" in saved
    assert f"benchmarks/{script}" in saved["command"] and "--smoke" in saved["command"]


@pytest.mark.slow  # a benchmark script's smoke mode (`pytest -m slow`)
def test_scaling_smoke(tmp_path):
    mod = load_benchmark("scaling")
    rows = mod.main(["--smoke", "--methods", "sdze", "adam+hte", "adam+exact",
                     "--out", str(tmp_path)])
    assert {(r["method"], r["dim"]) for r in rows} == {
        (m, d) for m in ("sdze", "adam+hte", "adam+exact") for d in (40, 80)
    }
    for r in rows:
        assert r["status"] == "ok" and r["s_per_step"] > 0 and math.isfinite(r["first_loss"])
        if r["method"] == "sdze":
            assert r["ratio_to_sdze"] == 1.0  # its own reference
        # each row names the sdze-train run it measured: its method, d and the smoke setup
        assert r["overrides"][:4] == mod.run_overrides(r["method"], r["dim"])
        assert r["sdze_train_command"] == shlex.join(["sdze-train", *r["overrides"]])
        assert set(mod.overrides_for_method(r["method"], mod.SMOKE_OVERRIDES)) <= set(
            r["overrides"])
    for ext in ("csv", "json", "png"):
        assert (tmp_path / f"scaling_smoke.{ext}").exists()
    saved = json.loads((tmp_path / "scaling_smoke.json").read_text())
    assert_timing_provenance(saved, "scaling.py")
    assert saved["overrides"] == mod.SMOKE_OVERRIDES


def test_scaling_smoke_with_prefetch_gives_the_same_losses(tmp_path):
    """--prefetch changes when batches are built, not what is computed."""
    mod = load_benchmark("scaling")
    plain = mod.main(["--smoke", "--methods", "sdze", "--out", str(tmp_path / "plain")])
    ahead = mod.main(["--smoke", "--methods", "sdze", "--prefetch", "--out", str(tmp_path)])
    assert [r["last_loss"] for r in ahead] == [r["last_loss"] for r in plain]
    assert all(r["prefetch"] and "prefetch=true" in r["overrides"] for r in ahead)
    assert not any(r["prefetch"] or "prefetch=true" in r["overrides"] for r in plain)
    assert "prefetch=true" in json.loads((tmp_path / "scaling_smoke.json").read_text())["overrides"]


def test_scaling_rejects_cuda_without_a_gpu(tmp_path, capsys):
    """--device cuda on a machine without CUDA stops before building anything."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    mod = load_benchmark("scaling")
    with pytest.raises(SystemExit) as exc:
        mod.main(["--smoke", "--device", "cuda", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "CUDA is not available" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.gpu
def test_scaling_smoke_on_cuda(tmp_path):
    """The scaling study on a GPU (CUDA peak memory, synchronised timing)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    mod = load_benchmark("scaling")
    rows = mod.main(["--smoke", "--device", "cuda", "--methods", "sdze", "adam+hte",
                     "--out", str(tmp_path)])
    for r in rows:
        assert r["status"] == "ok" and r["device"] == "cuda"
        assert r["memory"] == "CUDA peak allocated"
        # parameters and the batch are on the GPU during the step, so the peak covers them
        assert r["peak_bytes"] >= r["param_bytes"] + r["batch_bytes"]
    saved = json.loads((tmp_path / "scaling_smoke_cuda.json").read_text())
    assert saved["device"] == "cuda" and torch.cuda.get_device_name() in saved["machine"]
    assert not (tmp_path / "scaling_smoke.json").exists()  # the CPU results stay untouched


@pytest.mark.parametrize("huge_pages", [False, True])
def test_scaling_worker_environment(monkeypatch, huge_pages):
    """--huge-pages starts the workers with THP_MEM_ALLOC_ENABLE=1 and marks their rows."""
    import subprocess

    mod = load_benchmark("scaling")
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"], seen["env"] = cmd, kwargs.get("env")
        return subprocess.CompletedProcess(cmd, 0, stdout='{"status": "ok"}\n', stderr="")

    monkeypatch.setattr(mod.subprocess, "run", fake_run)
    job = dict(method="sdze", dim=10, overrides=["threads=1"], device="cpu")
    row = mod.run_worker(job, 1 << 30, 1.0, 1, 10.0, huge_pages=huge_pages)
    assert row["huge_pages"] is huge_pages
    # the worker gets the override list it builds from, not a config object
    sent = json.loads(seen["cmd"][seen["cmd"].index("--worker") + 1])
    assert sent["overrides"] == ["threads=1"] and sent["device"] == "cpu"
    if huge_pages:
        assert seen["env"]["THP_MEM_ALLOC_ENABLE"] == "1"
    else:
        assert seen["env"] is None  # the parent's environment, unchanged


def test_fit_slope_recovers_power_law():
    mod = load_benchmark("scaling")
    rows = [dict(status="ok", dim=d, t=3.0 * d**0.8) for d in (1e3, 1e4, 1e5)]
    assert mod.fit_slope(rows, "t") == pytest.approx(0.8)
    assert mod.fit_slope(rows[:1], "t") is None


def test_big_run_smoke(tmp_path):
    mod = load_benchmark("big_run")
    summary = mod.main(["--smoke", "--baselines", "--out", str(tmp_path)])
    sd = summary["sdze"]
    assert sd["steps_done"] == 6 and sd["params"] > 0 and sd["peak_rss_bytes"] > 0
    assert sd["overrides"] == mod.run_overrides("sdze", 300, *mod.SMOKE_OVERRIDES)
    assert sd["sdze_train_command"] == shlex.join(["sdze-train", *sd["overrides"]])
    (base,) = summary["baselines"]
    assert base["status"] == "ok" and base["method"] == "adam+hte"
    assert base["overrides"] == mod.run_overrides("adam+hte", 300, *mod.SMOKE_OVERRIDES)
    assert "method=adam estimator=hte" in base["sdze_train_command"]
    saved = json.loads((tmp_path / "big_run_smoke.json").read_text())
    assert saved["sdze"]["dim"] == 300
    assert_timing_provenance(saved, "big_run.py")


def test_big_run_smoke_with_prefetch_gives_the_same_losses(tmp_path):
    mod = load_benchmark("big_run")
    plain = mod.main(["--smoke", "--out", str(tmp_path / "plain")])["sdze"]
    ahead = mod.main(["--smoke", "--prefetch", "--out", str(tmp_path)])
    assert "prefetch=true" in ahead["sdze"]["overrides"] and ahead["sdze"]["prefetch"] is True
    assert "prefetch=true" not in plain["overrides"] and plain["prefetch"] is False
    assert ahead["sdze"]["fixed_batch_losses"] == plain["fixed_batch_losses"]
    assert ahead["sdze"]["loss_last_tenth"] == plain["loss_last_tenth"]


def test_big_run_baseline_records_a_preflight_refusal(monkeypatch):
    """A baseline that sdze-train's pre-flight refuses is a status row, not a crash."""
    import sdze_lightning.memory_budget as budget

    mod = load_benchmark("big_run")
    # estimator=exact past max_reverse_passes: refused before the network is allocated
    smoke = mod.overrides_for_method("adam+exact", mod.SMOKE_OVERRIDES)
    assert not any(o.startswith("estimator.num_directions=") for o in smoke)  # exact has none
    row = mod.baseline_worker("adam+exact", mod.run_overrides("adam+exact", 30000, *smoke))
    assert row["status"] == "refused at build" and "max_reverse_passes" in row["error"]
    assert "pde.dim=30000" in row["overrides"]
    # not enough memory for the run: the memory pre-flight's refusal counts as out of memory
    monkeypatch.setattr(budget, "available_bytes", lambda device="cpu": 1)
    row = mod.baseline_worker("adam+hte", mod.run_overrides("adam+hte", 50, *mod.SMOKE_OVERRIDES))
    assert row["status"] == "OOM at build (pre-flight)" and "memory is available" in row["error"]


def test_profile_smoke(tmp_path):
    mod = load_benchmark("profile_sdze")
    (row,) = mod.main(["--smoke", "--out", str(tmp_path)])
    totals = row["totals"]
    # the batch product x W^T is a d-dependent matrix product: it must be classed as input pass
    assert totals.get("input_pass", 0) > 0 and totals.get("dimension_free", 0) > 0
    assert (tmp_path / "profile_sdze_d300.txt").exists()
    assert row["overrides"] == mod.run_overrides("sdze", 300, *mod.SMOKE_OVERRIDES)
    assert row["sdze_train_command"] == shlex.join(["sdze-train", *row["overrides"]])
    saved = json.loads((tmp_path / "profile_sdze_smoke.json").read_text())
    assert_timing_provenance(saved, "profile_sdze.py")
    assert saved["rows"][0]["sdze_train_command"] == row["sdze_train_command"]


@pytest.mark.slow  # a benchmark script's smoke mode (`pytest -m slow`)
def test_time_to_accuracy_smoke(tmp_path):
    mod = load_benchmark("time_to_accuracy")
    # two runs at once (--jobs 2): the rows still come back in job order
    rows = mod.main(["--smoke", "--jobs", "2", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == list(mod.METHODS)  # every method, one subprocess each
    # each run in a process of its own, so its peak RSS is its own, not a running maximum
    pids = {r["pid"] for r in rows}
    assert len(pids) == len(rows) and os.getpid() not in pids
    for r in rows:
        assert r["steps"] > 0 and r["peak_rss_bytes"] > 0
        if r["status"] == "completed":
            assert r["curve"]
            # the last recorded error is the final one, on the same held-out points (SDZE folds
            # its offset into the weights at the end: the same function up to rounding)
            assert r["final_rel_l2"] == pytest.approx(r["curve"][-1][2], rel=1e-4)
        else:  # MeZO's plain SPSA may diverge on the tiny network; reported, not hidden
            assert r["method"] == "mezo" and r["status"].startswith("diverged at step")
        # c = 0 has error exactly 1, so the least-squares constant is at most 1; at d = 50 the
        # solution's x-dependent part is large enough that an affine output does far better.
        floor = r["floors"]
        assert 0 < floor["constant"] <= 1
        assert floor["affine"] is not None and floor["affine"] < 0.5 * floor["constant"]
        # built from the packaged configs: the row's overrides and sdze-train command
        opt, est = mod.PAIRS[r["method"]]
        assert r["overrides"][:4] == ["pde=allen_cahn_twobody", "pde.dim=50", f"method={opt}",
                                      f"estimator={est}"]
        assert {"seed=0", "pde.n_eval=64", "threads=1", "model.width=16"} <= set(r["overrides"])
        assert r["command"] == "sdze-train " + " ".join(r["overrides"]) and r["threads"] == 1
        assert r["not_in_command"] and r["init"] == "xavier_normal"
    assert (tmp_path / "time_to_accuracy_smoke.png").exists()
    saved = json.loads((tmp_path / "time_to_accuracy_smoke.json").read_text())
    assert {"date", "commit", "machine", "load_start", "load_end", "command"} <= set(saved)
    assert "benchmarks/time_to_accuracy.py --smoke --jobs 2" in saved["command"]
    assert set(saved["floors"]["50"]) == {"constant", "affine"}
    mod.main(["--frontier", str(tmp_path / "time_to_accuracy_smoke.json"), "--out",
              str(tmp_path)])
    assert (tmp_path / "frontier.png").stat().st_size > 0
    assert (tmp_path / "error_vs_time_twobody.png").stat().st_size > 0
    text = mod.table([tmp_path / "time_to_accuracy_smoke.json"])
    for r in rows:  # one line per method, with its final error
        assert f"| 5e1 | {r['method']} |" in text and f"{r['final_rel_l2']:.3g}" in text
    assert f"constant {saved['floors']['50']['constant']:.3g}" in text
    # the frontier compares runs at equal time: a longer run in the list is left out
    longer = {**saved, "budget_s": 2 * saved["budget_s"]}
    kept = mod.frontier_rows([saved, longer])
    assert kept == [r for r in saved["rows"] if r.get("peak_rss_bytes")] and kept


def test_time_to_accuracy_adam_input_lr(tmp_path):
    """``--adam-input-lr`` reaches Adam's input layer as ``method.input_lr`` (the rate left
    unset is the packaged one) and labels the row as its own variant."""
    mod = load_benchmark("time_to_accuracy")
    (row,) = mod.main(["--smoke", "--methods", "adam+taylor", "--adam-input-lr", "1e-4",
                       "--in-process", "--out", str(tmp_path)])
    assert row["input_lr"] == 1e-4 and row["lr"] == 1e-3  # configs/method/adam.yaml's lr
    assert "method.input_lr=0.0001" in row["overrides"]
    assert not any(o.startswith("method.lr=") for o in row["overrides"])
    assert mod.variant(row) == "adam+taylor, input lr 1e-04"
    plain = {**row, "input_lr": None}
    other = {**row, "input_lr": 3e-5}
    colors = mod.palette([row, plain, other])  # each variant its own colour
    assert len(set(colors.values())) == 3 and colors["adam+taylor"] == mod.COLORS["adam+taylor"]
    from _common import build_run

    # the overrides of a run with both rates set: the optimizer of the built run has them
    lrs = {"adam": 3e-3, "adam_input": 1e-4}
    overrides = mod.study_overrides("adam+hte", "twobody", 6, 0,
                                    *mod.method_overrides("adam+hte", lrs), n_eval=8)
    assert overrides[:4] == ["pde=allen_cahn_twobody", "pde.dim=6", "method=adam", "estimator=hte"]
    run = build_run(overrides)
    run.problem.fit_threads.restore()
    assert [g["lr"] for g in run.optimizer.param_groups] == [1e-4, 3e-3]


def test_time_to_accuracy_overrides():
    """The study's overrides: a flag left out adds none, a smoke size replaces the study's
    value in place, the cube takes the study's 100 + 100 points, SDZE's settings reach SDZE
    only."""
    mod = load_benchmark("time_to_accuracy")
    sdze = {"rank": 16, "period": None, "queries": 4, "cosine_steps": 2500}
    assert mod.method_overrides("sdze", {}, sdze) == [
        "method.rank=16", "method.queries=4",
        "scheduler={_target_:torch.optim.lr_scheduler.CosineAnnealingLR,_partial_:true,"
        "T_max:2500}"]
    assert mod.method_overrides("mezo", {"mezo": 1e-3, "sdze": 0.1}, sdze) == ["method.lr=0.001"]
    assert mod.method_overrides("fused_adafactor", {}) == []
    cube = mod.study_overrides("fused_adafactor", "cube", 1000, 2, "pde.n_boundary=8",
                               n_eval=500, threads=2)
    assert cube == ["pde=allen_cahn_cube", "pde.dim=1000", "pde.n_interior=100",
                    "pde.n_boundary=8", "method=fused_adafactor", "estimator=taylor", "seed=2",
                    "pde.n_eval=500", "threads=2"]


@pytest.mark.parametrize("bad", [["--jobs", "0"], ["--jobs", "2", "--in-process"]])
def test_time_to_accuracy_refuses_bad_jobs(bad, capsys):
    mod = load_benchmark("time_to_accuracy")
    with pytest.raises(SystemExit) as exc:
        mod.main(["--smoke", *bad])
    assert exc.value.code == 2 and "--jobs" in capsys.readouterr().err


@pytest.mark.slow
def test_sdze_memory_below_adam_hte_at_1e4(tmp_path):
    """Peak RSS of one step at d = 1e4 (fresh subprocesses): SDZE below Adam+HTE."""
    mod = load_benchmark("scaling")
    rows = mod.main(["--dims", "10000", "--sdze-dims", "--methods", "sdze", "adam+hte",
                     "--reps", "1", "--out", str(tmp_path)])
    by = {r["method"]: r for r in rows}
    assert by["sdze"]["peak_bytes"] < by["adam+hte"]["peak_bytes"]


def test_floors_of_an_affine_solution():
    """``floors`` of a solution ``e(x) (2 + a.x)``: exact affine fit, inexact constant one."""
    import torch

    from sdze_lightning.constraints import BallConstraint

    mod = load_benchmark("time_to_accuracy")
    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    class Affine:
        constraint = BallConstraint(1.0)

        def sample_interior(self, n, gen):
            return torch.rand(n, 3, generator=gen, dtype=torch.float64) - 0.5

        def exact_solution(self, x):
            return (self.constraint.value(x).reshape(-1) * (2 + x @ a))[:, None]

        def eval_batches(self):
            x = self.sample_interior(500, torch.Generator().manual_seed(1))
            yield x, self.exact_solution(x)

    floor = mod.floors(Affine())
    assert floor["affine"] < 1e-10
    # No constant does better on the held-out points (least squares), and x-dependence is left.
    x, ref = next(Affine().eval_batches())
    e, ref = BallConstraint(1.0).value(x).reshape(-1), ref.reshape(-1)
    for c in torch.linspace(0.0, 4.0, 81, dtype=torch.float64):
        assert floor["constant"] <= float((e * c - ref).norm() / ref.norm()) + 1e-12
    best = float((e * floor["constant_value"] - ref).norm() / ref.norm())
    assert floor["constant"] == pytest.approx(best) and floor["constant"] > 0.1


def test_fused_scaling_smoke(tmp_path):
    """Both methods train through Trainer.fit in one process; memory and ratio are reported."""
    mod = load_benchmark("fused_scaling")
    rows = mod.main(["--smoke", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == ["sdze", "fused_adafactor"]
    for r in rows:
        # peak_bytes is counted from the RSS before the network is built, so the peak holds at
        # least its parameters and one batch (float32): peak_ratio >= 1 (the Trainer and the
        # step's transients add far more at this size)
        assert r["steps"] == 3 and r["s_per_step"] > 0
        assert r["peak_bytes"] >= r["param_bytes"] + r["batch_bytes"]
        assert r["last_loss"] < r["first_loss"]  # both learn something in three steps
        assert r["command"] == "sdze-train " + " ".join(r["overrides"])
        assert f"method={r['method']}" in r["overrides"] and "pde.n_eval=0" in r["overrides"]
    fused = rows[1]
    assert fused["ratio_to_sdze"] == fused["s_per_step"] / rows[0]["s_per_step"]
    saved = json.loads((tmp_path / "fused_scaling_smoke.json").read_text())
    assert saved["rows"] == rows
    assert {"date", "commit", "machine", "load_start", "load_end", "command"} <= set(saved)


@pytest.mark.slow  # a benchmark script's smoke mode (`pytest -m slow`)
def test_threads_smoke():
    """benchmarks/threads.py: the main job through the CLI next to a busy process."""
    mod = load_benchmark("threads")
    (row,) = mod.main(["--smoke"])
    assert row["run"] == "auto-busy" and row["busy_process"] is True and row["steps"] == 5
    assert row["threads"] >= 1 and row["wall_s"] > row["train_s"] > 0


def test_fused_kernels_smoke(tmp_path):
    """The fused two-body source agrees with the eager code (float32 sums in another order:
    a few 1e-6 of the largest magnitude at this size) and both are timed."""
    mod = load_benchmark("fused_kernels")
    (row,) = mod.main(["--dims", "9000", "--points", "4", "--repeats", "1",
                       "--out", str(tmp_path)])
    assert row["eager_s"] > 0 and row["fused_s"] > 0
    assert row["max_rel_diff"] < 1e-4
    saved = json.loads((tmp_path / "fused_kernels.json").read_text())
    assert saved["rows"] == [row]
    assert saved["command"].endswith("benchmarks/fused_kernels.py --dims 9000 --points 4 "
                                     f"--repeats 1 --out {tmp_path}")
    assert saved["commit"] and saved["load_end"] is not None and saved["threads"] == 1


@pytest.mark.slow  # two sdze-train processes: a benchmark's smoke, kept out of CI's budget
def test_scale_first_smoke(tmp_path):
    """Both variants run side by side through sdze-train; rows carry the floors."""
    mod = load_benchmark("scale_first")
    result = mod.main(["--smoke", "--out", str(tmp_path)])
    rows = result["rows"]
    assert [r["variant"] for r in rows] == ["output_fit=constant", "output_fit=none"]
    for r in rows:
        assert r["status"] == "completed" and r["steps"] == 3 and math.isfinite(r["rel_l2"])
        assert 0 < r["constant_floor"] <= 1 and r["affine_floor"] is not None
        assert r["side_by_side"] == ["output_fit=constant", "output_fit=none"]
    for key in ("date", "commit", "machine", "load_start", "load_end", "threads", "command"):
        assert key in result
    assert (tmp_path / "scale_first_output_fit_smoke.json").exists()
    assert "| allen_cahn_twobody | 4e+01 |" in mod.markdown(
        [tmp_path / "scale_first_output_fit_smoke.json"])


@pytest.mark.slow  # two short fits: a benchmark's smoke, kept out of CI's budget
def test_overhead_smoke_times_both_loops_on_the_packaged_config():
    result = load_benchmark("overhead").main(["--smoke"])
    (row,) = result["rows"]
    assert row["plain_its"] > 0 and row["lightning_its"] > 0
    assert row["ratio"] == row["lightning_its"] / row["plain_its"] == result["median_ratio"]
    assert result["overrides"][0] == "pde=poisson2d"
    assert "benchmarks/overhead.py --smoke" in result["command"] and result["commit"]


@pytest.mark.slow  # one sdze-train process: a benchmark's smoke, kept out of CI's budget
def test_cli_runs_smoke_records_the_summary_and_the_child_peak():
    result = load_benchmark("cli_runs").main(["--smoke"])
    assert result["exit_code"] == 0 and result["summary"]["status"] == "completed"
    assert result["summary"]["steps"] == 3 and math.isfinite(result["summary"]["rel_l2"])
    # the child's own peak: at least torch's import (> 100 MiB), far below this machine's RAM
    assert 100 * 2**20 < result["peak_rss_bytes"] < 8 * 2**30
    assert result["sdze_train_command"].startswith("sdze-train pde=allen_cahn_twobody")
    assert_timing_provenance(result, "cli_runs.py")
