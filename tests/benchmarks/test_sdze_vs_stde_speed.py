"""``benchmarks/sdze_vs_stde_speed.py``: the SDZE side in ``--smoke`` mode and its record."""

from __future__ import annotations

import json

from conftest import load_benchmark


def test_smoke_row_is_built_from_the_packaged_config_and_records_its_run(tmp_path):
    result = load_benchmark("sdze_vs_stde_speed").main(
        ["--smoke", "--smoke-seconds", "0.3", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "sdze_vs_stde_speed_smoke.json").read_text())
    assert saved == json.loads(json.dumps(result))  # the file holds what main returned
    (row,) = saved["rows"]
    assert row["sdze_command"].startswith(
        "sdze-train pde=allen_cahn_twobody pde.dim=64 method=sdze estimator=taylor threads=1")
    assert row["sdze_threads"] == 1
    assert row["sdze_steps_in_window"] >= 1
    assert row["sdze_s_per_step"] > 0
    assert row["stde"] is None and "sdze_over_stde_it_per_s" not in row
    for key in ("date", "commit", "machine", "load_start", "load_end", "command"):
        assert saved[key] not in (None, "")
    assert "benchmarks/sdze_vs_stde_speed.py --smoke" in saved["command"]
