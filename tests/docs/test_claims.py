"""The claims of ``benchmarks/README.md`` are data: every entry of ``benchmarks/claims.yaml``
names a results file that exists and holds its figure with the stated value, and the
README's claims table (and its other generated tables) is what ``make_claims.py`` writes.
Reads files only; runs no benchmark."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"

#: Claims that no results file backs, each with its reason in the registry. A new entry
#: here is a claim the README shows as not backed: add its results file instead where one
#: exists.
UNBACKED: set[str] = set()


def _load():
    spec = importlib.util.spec_from_file_location("make_claims", BENCHMARKS / "make_claims.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_claims", module)
    spec.loader.exec_module(module)
    return module


mc = _load()
REGISTRY = mc.load_registry()
CLAIMS = REGISTRY["claims"]


def test_the_registry_lists_claims():
    assert len(CLAIMS) >= 30
    ids = [c["id"] for c in CLAIMS]
    assert len(ids) == len(set(ids)), "claim ids repeat"


@pytest.mark.parametrize("claim", [c for c in CLAIMS if "unbacked" not in c],
                         ids=lambda c: c["id"])
def test_every_results_file_exists(claim):
    files = mc.claim_files(claim)
    assert files, f"{claim['id']} names no results file"
    missing = [f for f in files if not (BENCHMARKS / f).is_file()]
    assert not missing, f"{claim['id']}: results files missing: {missing}"


@pytest.mark.parametrize("claim", [c for c in CLAIMS if "unbacked" not in c],
                         ids=lambda c: c["id"])
def test_every_figure_is_in_its_file_with_the_stated_value(claim):
    quoted = REGISTRY["quoted"]
    wrong = []
    for name, figure in claim["figures"].items():
        got = mc.compute_figure(figure, quoted, {})
        if got != str(figure["stated"]):
            wrong.append(f"{name}: file {got!r}, stated {figure['stated']!r}")
    assert not wrong, f"{claim['id']}: " + "; ".join(wrong)


def test_unbacked_claims_give_a_reason_and_are_the_listed_ones():
    unbacked = {c["id"]: str(c["unbacked"]).strip() for c in CLAIMS if "unbacked" in c}
    listing = "\n".join(f"  {k}: {v}" for k, v in sorted(unbacked.items()))
    assert all(unbacked.values()), f"unbacked claims without a reason:\n{listing}"
    assert set(unbacked) == UNBACKED, f"unbacked claims (update UNBACKED):\n{listing}"
    for claim in CLAIMS:
        if "unbacked" in claim:
            assert not claim.get("figures"), f"{claim['id']} is unbacked but lists figures"


def test_the_registry_has_no_problems():
    problems, _ = mc.check_registry(mc.load_registry())
    assert not problems, "\n".join(problems)


def test_the_readme_tables_are_the_generated_ones():
    assert mc.main(["--check"]) == 0, (
        "benchmarks/README.md differs from the tables make_claims.py generates: run "
        "python benchmarks/make_claims.py")


def test_the_readme_shows_unbacked_claims_as_such():
    table = mc.render_claims(REGISTRY)
    for claim in CLAIMS:
        if "unbacked" in claim:
            row = next(line for line in table.splitlines()
                       if line.startswith("| " + mc._cell(claim["claim"])))
            assert "not backed by a results file" in row


def test_check_fails_on_a_figure_that_differs_from_its_file(tmp_path):
    text = (BENCHMARKS / "claims.yaml").read_text()
    assert 'stated: "52.7"' in text
    registry = tmp_path / "claims.yaml"
    registry.write_text(text.replace('stated: "52.7"', 'stated: "50.0"'))
    problems, _ = mc.check_registry(mc.load_registry(registry))
    assert any("adam_hte_memory.ratio" in p and "'52.7'" in p for p in problems)
    assert mc.main(["--check", "--registry", str(registry)]) == 1


def test_check_fails_on_a_missing_results_file(tmp_path):
    text = (BENCHMARKS / "claims.yaml").read_text()
    registry = tmp_path / "claims.yaml"
    registry.write_text(text.replace("results/step_memory.json", "results/no_such_file.json"))
    problems, _ = mc.check_registry(mc.load_registry(registry))
    assert any("adam_hte_memory" in p and "does not exist" in p for p in problems)


def test_check_fails_on_an_edited_readme_table(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(BENCHMARKS / "README.md", readme)
    text = readme.read_text()
    table = mc.render_claims(REGISTRY)
    assert table in text
    readme.write_text(text.replace("52.7x", "62.7x", 1))
    assert mc.main(["--check", "--readme", str(readme)]) == 1


def test_formats():
    assert mc.fmt_value(0.0090281, "e1") == "9.0e-3"
    assert mc.fmt_value(5.443e-3, "e2") == "5.44e-3"
    assert mc.fmt_value((422.9, 603.0), "sig2") == "420-600"
    assert mc.fmt_value((1.554, 1.546), ".2f") == "1.55"
    assert mc.fmt_value(1.004, "#.3g") == "1.00"
    assert mc.fmt_value(117268, "int,") == "117,268"
    assert mc.fmt_value(0.0667447, ".3g") == "0.0667"


def test_metadata_comes_from_the_file_where_it_records_it():
    cache: dict = {}
    meta = mc.file_meta("results/checkpoint_peak_1e6.json", cache)
    assert meta["date"] == "2026-12-07" and meta["commit"] and meta["command"]
    assert min(meta["loads"]) == pytest.approx(0.828, abs=1e-3)
    claim = next(c for c in CLAIMS if c["id"] == "zoo")  # its file records no date
    cells = mc.claim_meta(claim, cache)
    assert cells["date"].endswith(mc.NOT_IN_FILE), "a date the file lacks is marked"
