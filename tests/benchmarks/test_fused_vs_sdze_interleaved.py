"""Smoke run of ``benchmarks/fused_vs_sdze_interleaved.py``: the results file's fields.

Numbers are meaningless at d = 64 and timings are never asserted.
"""

from __future__ import annotations

import json

import torch
from conftest import load_benchmark


def test_interleaved_smoke_writes_its_fields(tmp_path):
    before = torch.get_num_threads()
    mod = load_benchmark("fused_vs_sdze_interleaved")
    result = mod.main(["--smoke", "--out", str(tmp_path)])
    assert torch.get_num_threads() == before  # the run's thread counts are undone
    path = tmp_path / "fused_vs_sdze_interleaved_smoke.json"
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(result))
    for key in ("date", "commit", "machine", "load_start", "load_end", "command",
                "torch_threads_at_start", "methods", "warmup", "pairs"):
        assert key in data, key
    assert data["pairs"] == 2 and data["warmup"] == 1 and "--smoke" in data["command"]
    # 1-minute loads under load_* (as make_claims.py reads them), 1/5/15 under loadavg_*
    assert isinstance(data["load_start"], float) and isinstance(data["load_end"], float)
    assert len(data["loadavg_start"]) == 3 and len(data["loadavg_end"]) == 3
    (entry,) = data["dims"]
    assert entry["dim"] == 64 and entry["status"] == "ok"
    methods = entry["methods"]
    assert set(methods) == {"fused_adafactor", "sdze"}
    assert methods["fused_adafactor"]["overrides"] == ["experiment=twobody_fused", "pde.dim=64"]
    assert methods["sdze"]["overrides"] == ["experiment=twobody_sdze_large", "pde.dim=64"]
    # the packaged configs: the fused preset's scheduler, SDZE's prefetching
    assert methods["fused_adafactor"]["optimizer"] == "FusedAdafactor"
    assert methods["fused_adafactor"]["scheduler"] == "LinearLR"
    assert methods["sdze"]["optimizer"] == "SDZE" and methods["sdze"]["prefetch"] is True
    for m in methods.values():
        assert m["threads"] >= 1
        assert len(m["warmup"]) == 1 and len(m["steps"]) == 2
        assert [s["step"] for s in m["warmup"] + m["steps"]] == [0, 1, 2]  # own counter
        for s in m["warmup"] + m["steps"]:
            assert s["wall_s"] > 0 and s["cpu_s"] >= 0 and s["loss"] == s["loss"]
        for clock in ("wall_s", "cpu_s"):
            stats = m[clock]
            assert stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["max"]
    # pairs alternate the order; the ratios are computed from the recorded steps
    assert [p["order"] for p in entry["pairs"]] == [
        ["fused_adafactor", "sdze"], ["sdze", "fused_adafactor"]]
    for i, p in enumerate(entry["pairs"]):
        fused, sdze = methods["fused_adafactor"]["steps"][i], methods["sdze"]["steps"][i]
        assert p["ratio_wall"] == fused["wall_s"] / sdze["wall_s"]
        assert p["ratio_cpu"] == fused["cpu_s"] / sdze["cpu_s"]
        assert isinstance(p["load"], float)
    assert entry["ratio_of_medians_wall"] == (
        methods["fused_adafactor"]["wall_s"]["median"] / methods["sdze"]["wall_s"]["median"])
    for key in ("ratio_of_medians_cpu", "pair_ratio_wall", "pair_ratio_cpu", "load_before",
                "load_after", "peak_rss_gib", "mem_available_gib_before"):
        assert key in entry, key
    table = mod.markdown([path])
    assert "fused_adafactor" in table and "sdze" in table
