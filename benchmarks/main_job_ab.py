"""The README main job on two commits, run alternately: does a change slow it down?

Each commit is installed (non-editable, no dependencies) into its own folder under a
temporary directory, then the README's main job (``sdze-train method=sdze
estimator=taylor trainer.max_steps=2000``) runs as a subprocess, alternating between the
two commits (A B A B ...) so that both see the same load over time. Each run records its
process wall time, the training wall time and relative L2 error from its summary, and the
load average before and after.

    python benchmarks/main_job_ab.py --base f2ba4ef --head HEAD --runs 3
    python benchmarks/main_job_ab.py --base 4026bcc --head HEAD --runs 1 --seeds 0 1 2 \
        --out benchmarks/results/main_job_ab_output_fit.json
    python benchmarks/main_job_ab.py --smoke    # 20 steps, one run each, to a temp file
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from _common import MACHINE, RESULTS, load_average

REPO = Path(__file__).resolve().parents[1]
#: The README's main job (its overrides after ``sdze-train``).
MAIN_JOB = ["method=sdze", "estimator=taylor", "trainer.max_steps=2000"]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD~1", help="the commit compared against")
    parser.add_argument("--head", default="HEAD", help="the commit measured")
    parser.add_argument("--runs", type=int, default=3, help="runs of each commit")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seed= of the runs")
    parser.add_argument("--steps", type=int, default=2000, help="trainer.max_steps")
    parser.add_argument("--out", type=Path, default=RESULTS / "main_job_ab.json")
    parser.add_argument("--smoke", action="store_true", help="20 steps, 1 run each, temp out")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.runs = 20, 1
        args.out = Path(tempfile.mkdtemp()) / "main_job_ab_smoke.json"
    return args


def resolve(rev: str) -> str:
    return subprocess.run(["git", "rev-parse", rev], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout.strip()


def install(commit: str, root: Path) -> Path:
    """``commit``'s package installed into ``root/<commit>/pkg`` (its own files only)."""
    src, pkg = root / commit / "src", root / commit / "pkg"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(pkg), str(src)], check=True)
    return pkg


def main_job(pkg: Path, run_dir: Path, steps: int, seed: int = 0) -> dict:
    """One run of the main job with the package in ``pkg``; its summary and timings."""
    overrides = [o for o in MAIN_JOB if not o.startswith("trainer.max_steps=")]
    cmd = [sys.executable, "-m", "sdze_lightning.cli", *overrides, f"trainer.max_steps={steps}",
           f"seed={seed}", f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, PYTHONPATH=str(pkg), WANDB_MODE="disabled")
    load_start, start = load_average(), time.perf_counter()
    out = subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True,
                         check=False)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 2), "train_s": summary["wall_time_s"],
            "rel_l2": summary["rel_l2"], "threads": summary["threads"],
            "load_start": round(load_start, 2), "load_end": round(load_average(), 2)}


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    commits = {"base": resolve(args.base), "head": resolve(args.head)}
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": resolve("HEAD"), "machine": MACHINE, "commits": commits,
        "command": " ".join(["python", "benchmarks/main_job_ab.py", *(argv or sys.argv[1:])]),
        "job": ["sdze-train", *MAIN_JOB[:-1], f"trainer.max_steps={args.steps}"],
        "load_start": round(load_average(), 2), "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pkgs = {side: install(commit, root) for side, commit in commits.items()}
        for i in range(args.runs):
            for seed in args.seeds:
                for side in ("base", "head"):  # alternated: both sides see the same load
                    row = main_job(pkgs[side], root / f"{side}-{i}-{seed}", args.steps, seed)
                    record["rows"].append({"side": side, "run": i, "seed": seed, **row})
                    print(json.dumps(record["rows"][-1]), flush=True)
    record["load_end"] = round(load_average(), 2)
    for side in ("base", "head"):
        rows = [r for r in record["rows"] if r["side"] == side]
        record[f"{side}_median_wall_s"] = statistics.median(r["wall_s"] for r in rows)
        record[f"{side}_median_train_s"] = statistics.median(r["train_s"] for r in rows)
    record["head_over_base_wall"] = round(record["head_median_wall_s"]
                                          / record["base_median_wall_s"], 3)
    record["head_over_base_train"] = round(record["head_median_train_s"]
                                           / record["base_median_train_s"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}", flush=True)
    return record


if __name__ == "__main__":
    main()
