"""Accuracy of the methods after a fixed step budget (issue 4): final rel. L2 error, 3 seeds.

Each run goes through the same path as `sdze-train` (`sdze_lightning.cli.run`), with
no logger and no callbacks, and reports the final (not best) relative L2 error on the
held-out points and the wall time. Usage::

    python benchmarks/method_accuracy.py                 # full grid (long)
    python benchmarks/method_accuracy.py --steps 300 --seeds 0
    python benchmarks/method_accuracy.py --smoke
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
from pathlib import Path

from sdze_lightning.cli import run

RESULTS = Path(__file__).resolve().parent / "results"

PROBLEMS: dict[str, list[str]] = {
    "poisson2d": ["pde=poisson2d", "pde.n_interior=200", "pde.n_boundary=100"],
    "allen_cahn_twobody_d1000": ["pde=allen_cahn_twobody", "pde.dim=1000"],
}
METHODS: dict[str, list[str]] = {
    "sdze+taylor": ["method=sdze", "estimator=taylor"],
    # lr 1e-4 (the config default) diverges at d = 1000: the full-space step grows with P.
    "mezo+taylor": ["method=mezo", "estimator=taylor", "method.lr=1e-6"],
    "adam+hte": ["method=adam", "estimator=hte"],
    "adam+stein": ["method=adam", "estimator=stein", "estimator.num_directions=256"],
}
COMMON = ["logger=none", "callbacks=none", "+trainer.enable_progress_bar=false"]


def one_run(problem: str, method: str, seed: int, steps: int) -> dict:
    """Train one configuration and return its summary with the labels."""
    overrides = [*COMMON, *PROBLEMS[problem], *METHODS[method], f"seed={seed}",
                 f"trainer.max_steps={steps}"]
    with tempfile.TemporaryDirectory() as run_dir:
        summary = run(overrides, run_dir)
    return {"problem": problem, "method": method, "seed": seed, **summary,
            "overrides": " ".join(overrides)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.seeds = 3, [0]
    rows = []
    for problem in args.problems:
        for method in args.methods:
            for seed in args.seeds:
                row = one_run(problem, method, seed, args.steps)
                rows.append(row)
                print(f"{problem:26s} {method:13s} seed {seed}: rel_l2 {row['rel_l2']}, "
                      f"{row['wall_time_s']:.1f} s, {row['status']}", flush=True)
    table = []
    for problem in args.problems:
        for method in args.methods:
            sel = [r for r in rows if r["problem"] == problem and r["method"] == method]
            errs = [r["rel_l2"] for r in sel if r["rel_l2"] is not None]
            table.append({
                "problem": problem, "method": method,
                "rel_l2_median": statistics.median(errs) if errs else None,
                "rel_l2_all": errs,
                "wall_time_s_median": statistics.median(r["wall_time_s"] for r in sel),
            })
    if not args.smoke:
        RESULTS.mkdir(exist_ok=True)
        with open(RESULTS / "method_accuracy.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (RESULTS / "method_accuracy.json").write_text(json.dumps(
            {"steps": args.steps, "seeds": args.seeds, "table": table}, indent=2))
    for t in table:
        print(json.dumps(t))


if __name__ == "__main__":
    main()
