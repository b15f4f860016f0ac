"""``benchmarks/bench.py``, the one entry point of the studies: ``list`` names every study a
claim references, ``reproduce`` prints the command a results file records (or says it
records none), ``run`` rejects an unknown study. Reads files only; runs no benchmark."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


bench = _load("bench")
REGISTRY = bench.make_claims.load_registry()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / "bench.py"), *args],
                          capture_output=True, text=True, check=False, cwd=ROOT)


def test_list_names_every_study_a_claim_references_and_its_script_exists():
    done = cli("list")
    assert done.returncode == 0, done.stderr
    listed = dict(re.findall(r"^(\w+) \((benchmarks/\w+\.py)\): \S", done.stdout, re.M))
    scripts = {re.sub(r"[^\w-]", "", p.name): p.stem for p in BENCHMARKS.glob("*.py")}
    referenced = {scripts[c["section"]] for c in REGISTRY["claims"]
                  if c.get("section") in scripts}
    assert len(referenced) >= 20
    assert referenced <= set(listed), f"studies not listed: {referenced - set(listed)}"
    for name, script in listed.items():
        assert (ROOT / script).is_file(), script
        assert script == f"benchmarks/{name}.py"
    # every claim is named: under a study, or as a claim of no study (command lines)
    for claim in REGISTRY["claims"]:
        assert re.search(rf"\b{claim['id']}\b", done.stdout), claim["id"]
    # a results file's study comes from its name when its claim's section is another's
    assert "fused_scaling" in listed


def test_reproduce_prints_the_command_a_results_file_records():
    claim = bench.find_claim(REGISTRY, "main_job_seeds")
    (rel,) = bench.make_claims.claim_files(claim)
    recorded = json.loads((BENCHMARKS / rel).read_text())["command"]
    done = cli("reproduce", "main_job_seeds")
    assert done.returncode == 0, done.stderr
    assert f"{rel}: recorded in the file" in done.stdout
    assert recorded in done.stdout  # already from the repository root with `python`
    assert recorded.startswith("python benchmarks/main_job_ab.py ")


def test_a_recorded_interpreter_and_script_path_are_rewritten_for_the_repository_root():
    names = bench.script_names()
    got = bench.normalise("/x/.venv/bin/python scale_first.py --dims 1000 --draws 0 5", names)
    assert got == "python benchmarks/scale_first.py --dims 1000 --draws 0 5"
    # a file that records the job it times, not the script that wrote it
    assert bench.normalise("sdze-train method=sdze trainer.max_steps=300", names) is None


def test_reproduce_reports_a_results_file_without_a_command():
    claim = bench.find_claim(REGISTRY, "zoo")  # a file written before commands were recorded
    (rel,) = bench.make_claims.claim_files(claim)
    assert "command" not in json.loads((BENCHMARKS / rel).read_text())
    done = cli("reproduce", "zoo")
    assert done.returncode == 0, done.stderr
    assert f"{rel}: no command recorded in the file" in done.stdout
    # the fallback: the command the study's README section documents
    assert "python benchmarks/zoo_accuracy.py --table" in done.stdout



def test_reproduce_of_an_unbacked_claim_prints_its_reason_and_section_commands(capsys):
    claim = {"id": "example", "claim": "a run without a results file", "value": "1",
             "unbacked": "its summary.json is not under results/", "section": "cli_runspy"}
    readme = (BENCHMARKS / "README.md").read_text()
    assert bench.reproduce(claim, bench.script_names(), readme, execute=False) == 0
    out = capsys.readouterr().out
    assert "unbacked: its summary.json is not under results/" in out
    assert "sdze-train experiment=poisson2d_he" in out  # a command of that README section
    assert bench.reproduce(claim, bench.script_names(), readme, execute=True) == 1


def test_reproduce_without_a_claim_summarises_every_claim():
    done = cli("reproduce")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [ln.split(":", 1)[0] for ln in lines] == [c["id"] for c in REGISTRY["claims"]]
    assert "main_job_seeds: all: 1 of 1 files record their command" in lines


def test_run_of_an_unknown_study_is_a_one_line_error_with_status_2():
    done = cli("run", "no_such_study", "--smoke")
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1
    assert "unknown study 'no_such_study'" in done.stderr
    unknown = cli("reproduce", "no_such_claim")
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1


def test_run_passes_its_arguments_through_from_the_repository_root(monkeypatch):
    calls = []

    def fake_run(command, **kwargs):
        calls.append((command, kwargs))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    assert bench.main(["run", "crns_variance.py", "--smoke", "--out", "/tmp/x"]) == 0
    ((command, kwargs),) = calls
    assert command == [sys.executable, "benchmarks/crns_variance.py", "--smoke", "--out",
                       "/tmp/x"]
    assert kwargs["cwd"] == ROOT


def test_an_executed_command_gets_this_python_and_its_environment_words(capfd):
    status = bench.run_command(
        "OMP_NUM_THREADS=3 python -c 'import os, sys; print(os.environ[\"OMP_NUM_THREADS\"], "
        "sys.executable)'")
    assert status == 0
    out = capfd.readouterr().out.splitlines()
    assert out[-1] == f"3 {sys.executable}"
