"""Scale first, and no per-d rate: final error at a fixed wall time, through ``sdze-train``.

Every run is ``sdze-train experiment=twobody_fused`` (``pde=allen_cahn_cube`` for the
cube) with the packaged defaults and a variant's overrides, on one torch thread
(``threads=1``), cut at ``--budget-s`` seconds of training (``trainer.max_time``) when
its 3000 default steps take longer. The variants of one (problem, d, draw, seed) run at
the same time, side by side, one per core, so they see the same load; their final
held-out error is ``summary.json``'s ``rel_l2``. Beside each row: the relative L2 error of
the best constant network output on the same held-out points (``floors`` of
``time_to_accuracy.py``, closed form, float64), and its constant; up to ``d = 2000`` also
that of the best affine output (least squares on ``4 d`` other points).

Studies (``--study``):

* ``output_fit``: two-body Allen-Cahn, ``output_fit=constant`` (the default) against
  ``output_fit=none`` (the initialisation's offset, ~0);
* ``input_rate``: the cube, the fused method's input-layer rate from the points' norm
  (the default, ``input_lr: null``) against the hand-set rates ``1e-4`` and ``1e-3``;
* ``levers``: two-body, steps to accuracy beyond the defaults: 4x the batch
  (``pde.n_interior=400``), 3x the rate (``method.lr=3e-3``), both, Shampoo's direction on
  the small layers (``method.small_layers=shampoo``) and a rate that follows the loss
  (``ReduceLROnPlateau`` on the training loss in place of the linear decay).

    python benchmarks/scale_first.py --study output_fit --dims 1000 --draws 0 5 9 --budget-s 216
    python benchmarks/scale_first.py --study output_fit --dims 100000 --draws 8 --budget-s 600
    python benchmarks/scale_first.py --study input_rate --dims 10000 --budget-s 216
    python benchmarks/scale_first.py --table results/scale_first_*.json     # Markdown
    python benchmarks/scale_first.py --smoke                # d = 40, 3 steps, numbers meaningless

Results: ``results/scale_first_<study>_<dims>.json`` (``--name`` replaces the suffix),
rewritten after every pair of runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path

from _common import MACHINE, RESULTS, git_commit, load_average  # noqa: E402

#: A learning rate that follows the training loss: halved after 100 steps without a new low.
PLATEAU = ("+scheduler={_target_:torch.optim.lr_scheduler.ReduceLROnPlateau,_partial_:true,"
           "factor:0.5,patience:100}")
#: Variants of each study: name -> overrides.
STUDIES: dict[str, dict[str, list[str]]] = {
    "output_fit": {"output_fit=constant": [], "output_fit=none": ["output_fit=none"]},
    "input_rate": {"input_lr=null": [], "input_lr=1e-4": ["method.input_lr=1e-4"],
                   "input_lr=1e-3": ["method.input_lr=1e-3"]},
    "levers": {"defaults": [], "n_interior=400": ["pde.n_interior=400"],
               "lr=3e-3": ["method.lr=3e-3"], "n_interior=400,lr=3e-3": [
                   "pde.n_interior=400", "method.lr=3e-3"],
               "small_layers=shampoo": ["method.small_layers=shampoo"],
               "scheduler=plateau": ["~scheduler", PLATEAU]},
}
#: The problem of each study.
PDES = {"output_fit": "allen_cahn_twobody", "input_rate": "allen_cahn_cube",
        "levers": "allen_cahn_twobody"}


def overrides(study: str, dim: int, draw: int, seed: int, budget_s: float,
              steps: int | None = None) -> list[str]:
    """The ``sdze-train`` overrides shared by the variants of one row."""
    budget = int(budget_s)
    max_time = f"00:00:{budget // 60:02d}:{budget % 60:02d}"
    out = ["experiment=twobody_fused", f"pde={PDES[study]}", f"pde.dim={dim}",
           f"pde.coeff_seed={draw}", f"seed={seed}", "threads=1",
           f"+trainer.max_time={max_time}", "logger=csv"]
    return out + ([f"trainer.max_steps={steps}", "pde.n_eval=64"] if steps else [])


def constant_floor(common: list[str]) -> dict:
    """Best constant (and, up to d = 2000, affine) network output's error (float64)."""
    from time_to_accuracy import floors

    from sdze_lightning.builders import build_problem, compose_config

    with tempfile.TemporaryDirectory() as tmp:
        problem = build_problem(compose_config(common, tmp))
    found = floors(problem, affine_max_dim=2000)
    return {"constant_floor": found["constant"], "constant_value": found["constant_value"],
            "affine_floor": found["affine"]}


def run_pair(commands: dict[str, list[str]], root: Path) -> dict[str, dict]:
    """Run the variants' ``sdze-train`` commands at the same time; their summaries."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    procs = {}
    for name, args in commands.items():
        run_dir = root / re.sub(r"[^A-Za-z0-9._-]", "-", name)  # no "=" or "," for Hydra
        log = open(root / f"{run_dir.name}.log", "w")  # noqa: SIM115 (closed below)
        procs[name] = (subprocess.Popen(["sdze-train", *args, f"hydra.run.dir={run_dir}"],
                                        stdout=log, stderr=subprocess.STDOUT, env=env),
                       run_dir, log)
    out = {}
    for name, (proc, run_dir, log) in procs.items():
        proc.wait()
        log.close()
        summary = run_dir / "summary.json"
        out[name] = json.loads(summary.read_text()) if summary.exists() else {
            "status": f"exit {proc.returncode}"}
    return out


def pairs(variants: list[str], per_run: int) -> list[list[str]]:
    """The variants in groups run side by side (two at a time on this 2-core machine)."""
    return [variants[i:i + per_run] for i in range(0, len(variants), per_run)]


def main(argv: list[str] | None = None) -> dict | None:
    """Run the study (or print ``--table``); the results written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=sorted(STUDIES), default="output_fit")
    parser.add_argument("--dims", type=int, nargs="+", default=[1000])
    parser.add_argument("--draws", type=int, nargs="+", default=[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", help="default: all of the study's")
    parser.add_argument("--budget-s", type=float, default=216.0)
    parser.add_argument("--side-by-side", type=int, default=2, help="runs at the same time")
    parser.add_argument("--name", help="results file suffix (default: the dims)")
    parser.add_argument("--table", nargs="+", type=Path, help="print results as Markdown")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--smoke", action="store_true",
                        help="d = 40, 3 steps, 64 held-out points (numbers meaningless)")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(args.table))
        return None
    steps = 3 if args.smoke else None
    if args.smoke:
        args.dims, args.name = [40], args.name or "smoke"
    variants = args.variants or list(STUDIES[args.study])
    name = args.name or "_".join(str(d) for d in args.dims)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"scale_first_{args.study}_{name}.json"
    result = {"date": datetime.date.today().isoformat(), "commit": git_commit(),
              "machine": MACHINE, "load_start": load_average(), "threads": 1,
              "command": shlex.join([sys.executable, *sys.argv]), "budget_s": args.budget_s,
              "rows": []}
    for dim in args.dims:
        for draw in args.draws:
            for seed in args.seeds:
                common = overrides(args.study, dim, draw, seed, args.budget_s, steps)
                floor = constant_floor(common)
                for group in pairs(variants, args.side_by_side):
                    load = load_average()
                    with tempfile.TemporaryDirectory() as tmp:
                        summaries = run_pair(
                            {v: common + STUDIES[args.study][v] for v in group}, Path(tmp))
                    for variant, summary in summaries.items():
                        row = {"pde": PDES[args.study], "dim": dim, "coeff_seed": draw,
                               "seed": seed, "variant": variant,
                               "overrides": common + STUDIES[args.study][variant],
                               "side_by_side": group, "load_before": load,
                               "load_after": load_average(), **floor,
                               **{k: summary.get(k) for k in
                                  ("rel_l2", "steps", "wall_time_s", "status")}}
                        result["rows"].append(row)
                        print(json.dumps({k: row[k] for k in (
                            "dim", "coeff_seed", "seed", "variant", "rel_l2", "steps",
                            "wall_time_s", "constant_floor")}), flush=True)
                    result["load_end"] = load_average()
                    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return result


def markdown(paths: list[Path]) -> str:
    """One Markdown table of the rows of ``paths``: error, floor, ratio, steps, time."""
    lines = ["| pde | d | draw (constant) | seed | variant | rel L2 | best constant | "
             "best affine | ratio to constant | steps | train s | load |", "|" + "---|" * 12]
    for path in paths:
        data = json.loads(path.read_text())
        for r in data["rows"]:
            err = r["rel_l2"]
            ratio = f"{err / r['constant_floor']:.3g}" if err is not None else "-"
            affine = r.get("affine_floor")
            affine = "-" if affine is None else f"{affine:.3g}"
            lines.append(
                f"| {r['pde']} | {r['dim']:.0e} | {r['coeff_seed']} ({r['constant_value']:.1f}) "
                f"| {r['seed']} | {r['variant']} | "
                f"{'-' if err is None else f'{err:.3g}'} | {r['constant_floor']:.3g} | "
                f"{affine} | {ratio} "
                f"| {r['steps']} | {r['wall_time_s']} | {r['load_before']:.1f}-"
                f"{r['load_after']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
