"""Accuracy of the methods after a fixed step budget: final rel. L2 error, 3 seeds.

Each run goes through the same path as `sdze-train` (`sdze_lightning.cli.run`), with
no logger and no callbacks, and reports the final (not best) relative L2 error on the
held-out points and the wall time (set-up, training and the final evaluation). Every
method runs with its shipped config (``configs/method/*.yaml``) unless ``--variants``
adds overrides. Usage::

    python benchmarks/method_accuracy.py                  # full grid -> results/method_accuracy.*
    python benchmarks/method_accuracy.py --steps 300 --seeds 0 --tag quick
    python benchmarks/method_accuracy.py --methods mezo+taylor --tag mezo_lr \\
        --variants "method.lr=1e-6" "method.lr=1e-5"     # a sweep: one row set per variant
    python benchmarks/method_accuracy.py --smoke
    python benchmarks/method_accuracy.py --table benchmarks/results/method_accuracy.json

Results: ``results/method_accuracy[_<tag>].csv`` (one row per run) and ``.json``
(the per-cell median, all values, and the command line).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import write_csv

from sdze_lightning.cli import run

RESULTS = Path(__file__).resolve().parent / "results"

PROBLEMS: dict[str, list[str]] = {
    # He et al. (2023) 5.1 on [0,1]^2, with a smaller batch than the config (1000 + 200).
    "poisson2d": ["pde=poisson2d", "pde.n_interior=200", "pde.n_boundary=100"],
    # Two-body Allen-Cahn on the unit ball, hard constraint, 100 points per step.
    "allen_cahn_twobody_d1000": ["pde=allen_cahn_twobody", "pde.dim=1000"],
    # not in the default grid: the PDE-aware paper's problem (checks of its defaults)
    "allen_cahn1d": ["pde=allen_cahn1d", "pde.n_interior=200", "pde.n_boundary=100"],
}
#: The problems of the accuracy grid (``--problems`` to choose others).
GRID_PROBLEMS = ["poisson2d", "allen_cahn_twobody_d1000"]


def methods(stein_directions: int) -> dict[str, list[str]]:
    """Method name -> overrides (shipped method configs; only the estimator is chosen)."""
    return {
        "sdze+taylor": ["method=sdze", "estimator=taylor"],
        "mezo+taylor": ["method=mezo", "estimator=taylor"],
        "adam+hte": ["method=adam", "estimator=hte"],
        "adam+stein": ["method=adam", "estimator=stein",
                       f"estimator.num_directions={stein_directions}"],
        # not in the default grid: per-point residual gradients (vmap over the points)
        "pde_aware+exact": ["method=pde_aware", "estimator=exact"],
        "adam+exact": ["method=adam", "estimator=exact"],
    }


#: The method grid (``--methods`` to choose others).
GRID = ["sdze+taylor", "mezo+taylor", "adam+hte", "adam+stein"]


COMMON = ["logger=none", "callbacks=none", "+trainer.enable_progress_bar=false"]


def one_run(problem: str, method: str, overrides: list[str], variant: str, seed: int,
            steps: int) -> dict:
    """Train one configuration and return its summary with the labels.

    Args:
        problem: Key of :data:`PROBLEMS`.
        method: Method label.
        overrides: The method's overrides.
        variant: Extra space-separated overrides ("" for none).
        seed: Seed of the run (network, points, directions).
        steps: ``trainer.max_steps``.

    Returns:
        The run summary (``rel_l2``, ``loss``, ``steps``, ``wall_time_s``, ``status``, ...)
        with the labels and the full override list.

    """
    extra = shlex.split(variant)
    all_overrides = [*COMMON, *PROBLEMS[problem], *overrides, *extra, f"seed={seed}",
                     f"trainer.max_steps={steps}"]
    with tempfile.TemporaryDirectory() as run_dir:
        summary = run(all_overrides, run_dir)
    return {"problem": problem, "method": method, "variant": variant, "seed": seed,
            **summary, "overrides": " ".join(all_overrides)}


def summarise(rows: list[dict]) -> list[dict]:
    """Median / all values of the final rel. L2 and of the wall time per cell."""
    table = []
    keys = dict.fromkeys((r["problem"], r["method"], r["variant"]) for r in rows)
    for problem, method, variant in keys:
        sel = [r for r in rows
               if (r["problem"], r["method"], r["variant"]) == (problem, method, variant)]
        errs = [r["rel_l2"] for r in sel if r["rel_l2"] is not None]
        table.append({
            "problem": problem, "method": method, "variant": variant,
            "rel_l2_median": statistics.median(errs) if errs else None,
            "rel_l2_all": [r["rel_l2"] for r in sel],
            "final_loss_all": [r["loss"] for r in sel],
            "status_all": [r["status"] for r in sel],
            "wall_time_s_median": statistics.median(r["wall_time_s"] for r in sel),
            "wall_time_s_all": [r["wall_time_s"] for r in sel],
        })
    return table


def markdown(table: list[dict]) -> str:
    """The per-cell table as Markdown (final rel. L2 per seed, median, wall time)."""

    def fmt(x: float | None) -> str:
        return "failed" if x is None else f"{x:.3g}"

    lines = ["| problem | method | variant | rel. L2 per seed | median | wall s per run (median) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for t in table:
        lines.append(f"| {t['problem']} | {t['method']} | {t['variant'] or '-'} | "
                     f"{' / '.join(fmt(x) for x in t['rel_l2_all'])} | "
                     f"{fmt(t['rel_l2_median'])} | {t['wall_time_s_median']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the grid (problems x methods x variants x seeds) and write the results.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        The per-run rows.

    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--problems", nargs="+", default=GRID_PROBLEMS, choices=list(PROBLEMS))
    parser.add_argument("--methods", nargs="+", default=None,
                        help=f"default: {' '.join(GRID)}; also: pde_aware+exact adam+exact")
    parser.add_argument("--stein-directions", type=int, default=64,
                        help="Stein samples K for adam+stein (config default: 1024)")
    parser.add_argument("--variants", nargs="+", default=[""],
                        help="space-separated extra overrides, one string per variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="", help="results/method_accuracy_<tag>.*")
    parser.add_argument("--smoke", action="store_true", help="3 steps, seed 0, nothing written")
    parser.add_argument("--table", metavar="JSON",
                        help="print the Markdown table of a results JSON and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())["table"]))
        return []
    torch.set_num_threads(args.threads)
    all_methods = methods(args.stein_directions)
    names = args.methods or GRID
    unknown = set(names) - set(all_methods)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {list(all_methods)}")
    if args.smoke:
        args.steps, args.seeds = 3, [0]
    rows = []
    for problem in args.problems:
        for method in names:
            for variant in args.variants:
                for seed in args.seeds:
                    row = one_run(problem, method, all_methods[method], variant, seed,
                                  args.steps)
                    rows.append(row)
                    print(f"{problem:26s} {method:12s} [{variant}] seed {seed}: "
                          f"rel_l2 {row['rel_l2']}, loss {row['loss']}, "
                          f"{row['wall_time_s']:.1f} s, {row['status']}", flush=True)
    table = summarise(rows)
    if not args.smoke:
        RESULTS.mkdir(exist_ok=True)
        stem = "method_accuracy" + (f"_{args.tag}" if args.tag else "")
        write_csv(RESULTS / f"{stem}.csv", rows)
        meta = {
            "command": "python benchmarks/method_accuracy.py " + shlex.join(sys.argv[1:]
                                                                          if argv is None
                                                                          else argv),
            "steps": args.steps, "seeds": args.seeds, "stein_directions": args.stein_directions,
            "threads": args.threads, "torch": torch.__version__,
            "machine": platform.machine(), "date_utc": time.strftime("%Y-%m-%d %H:%M",
                                                                     time.gmtime()),
        }
        (RESULTS / f"{stem}.json").write_text(json.dumps({**meta, "table": table}, indent=2))
    print(markdown(table))
    return rows


if __name__ == "__main__":
    main()
