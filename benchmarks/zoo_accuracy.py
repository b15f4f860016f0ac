"""Relative L2 error of every shipped problem with its default config (issue 5).

Each run composes the packaged Hydra config exactly as ``sdze-train`` does
(``pde=<name> method=<m> estimator=<e>``), builds the problem with
``sdze_lightning.cli.build_problem``, trains it with a quiet CPU ``Trainer``
for ``--steps`` steps, and evaluates the final (not best) model on the
problem's held-out points. Results go to ``benchmarks/results/zoo_accuracy.{csv,json}``.

    python benchmarks/zoo_accuracy.py                       # all problems, adam+exact
    python benchmarks/zoo_accuracy.py --runs adam:exact sdze:taylor --problems burgers1d
    python benchmarks/zoo_accuracy.py --smoke               # seconds: tiny sizes, 3 steps
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

from sdze_lightning.cli import build_problem

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
RESULTS = REPO / "benchmarks" / "results"

PROBLEMS = [
    "poisson2d",
    "hjb_lqg",
    "poisson_twobody",
    "allen_cahn_twobody",
    "sine_gordon_twobody",
    "poisson_threebody",
    "allen_cahn_threebody",
    "sine_gordon_threebody",
    "biharmonic",
    "burgers1d",
    "allen_cahn1d",
    "kdv1d",
    "allen_cahn_cube",
]
#: Smallest sensible dimension per problem for --smoke (fixed-dimension problems absent).
SMOKE_DIM = {
    "hjb_lqg": 3,
    "biharmonic": 4,
    "allen_cahn_cube": 3,
    **{f"{op}_{fam}": 4 for op in ("poisson", "allen_cahn", "sine_gordon")
       for fam in ("twobody", "threebody")},
}
#: Problems with a boundary/initial loss term (the others impose it exactly).
SOFT_BOUNDARY = {"poisson2d", "hjb_lqg", "burgers1d", "allen_cahn1d", "kdv1d", "allen_cahn_cube"}
SMOKE_PDE = {
    "hjb_lqg": ["pde.reference_samples=1024"],
    "allen_cahn1d": ["pde.reference_points=128", "pde.reference_dt=5e-3"],
}


def compose_config(pde: str, method: str, estimator: str, overrides: list[str]):
    """The packaged config with ``pde``, ``method`` and ``estimator`` chosen."""
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose(
            "config",
            overrides=[f"pde={pde}", f"method={method}", f"estimator={estimator}", *overrides],
        )


def run_one(
    pde: str, method: str, estimator: str, steps: int, overrides: list[str], seed: int = 0
) -> dict:
    """Train one problem with one method/estimator and return its record."""
    cfg = compose_config(pde, method, estimator, [f"seed={seed}", *overrides])
    problem = build_problem(cfg)
    trainer = L.Trainer(
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
    )
    start = time.perf_counter()
    trainer.fit(problem)
    wall = time.perf_counter() - start
    start = time.perf_counter()
    rel_l2 = problem.relative_l2_error()
    return {
        "problem": pde,
        "dim": problem.dim,
        "method": method,
        "estimator": estimator,
        "seed": seed,
        "steps": int(trainer.global_step),
        "wall_s": round(wall, 2),
        "s_per_step": round(wall / max(1, trainer.global_step), 4),
        "eval_s": round(time.perf_counter() - start, 2),
        "loss": problem.last_loss,
        "rel_l2": rel_l2,
    }


def write(records: list[dict], out: Path, stem: str) -> None:
    """Write the records as CSV and JSON under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(records, indent=1))
    with open(out / f"{stem}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="*", default=PROBLEMS)
    parser.add_argument(
        "--runs", nargs="*", default=["adam:exact"], help="method:estimator pairs"
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 3 steps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--stem", default=None, help="output file stem")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 suits a shared CPU)"
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    steps = 3 if args.smoke else args.steps
    records = []
    for pde in args.problems:
        extra = list(args.override)
        if args.smoke:
            extra += ["model.width=8", "model.depth=1", "pde.n_interior=16", "pde.n_eval=64"]
            extra += [f"pde.dim={SMOKE_DIM[pde]}"] if pde in SMOKE_DIM else []
            extra += SMOKE_PDE.get(pde, [])
            extra += ["pde.n_boundary=8"] if pde in SOFT_BOUNDARY else []
        for run in args.runs:
            method, estimator = run.split(":")
            for seed in args.seeds:
                rec = run_one(pde, method, estimator, steps, extra, seed)
                records.append(rec)
                print(
                    f"{pde:>22} d={rec['dim']:<6} {method}+{estimator} seed={seed}: "
                    f"rel_l2={rec['rel_l2']:.3e} loss={rec['loss']:.3e} steps={rec['steps']} "
                    f"wall={rec['wall_s']:.1f}s eval={rec['eval_s']:.1f}s",
                    flush=True,
                )
    stem = args.stem or ("zoo_accuracy_smoke" if args.smoke else "zoo_accuracy")
    write(records, args.out, stem)
    return records


if __name__ == "__main__":
    main()
