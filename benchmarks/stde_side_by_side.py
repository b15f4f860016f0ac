"""Two-body Allen-Cahn at d = 1e3: the JAX STDE code and this library on one instance.

The JAX STDE code (Shi et al., NeurIPS 2024, repository sail-sg/stde) trains the
same PDE family as ``pde=allen_cahn_twobody``: ``Delta u + u - u^3 = f`` on the unit
ball, ``u = (1 - |x|^2) sum_{i<d} c_i sin(x_i + cos x_{i+1} + x_{i+1} cos x_i)``,
the hard constraint ``(1 - |x|^2) n(x)``, points ``r g / |g|`` with ``r ~ U(0, 1)``,
an MLP 4x128 tanh, 100 points per step. Its coefficients are an unseeded
``np.random.randn(1, d)`` per run, so it has no fixed instance of its own; this
script feeds it ours: the coefficients of ``TwoBody(dim, coeff_seed=<--coeff-seed>)`` and the
held-out points of our run with ``--seed``, on which both sides' final networks
are evaluated (STDE's own error on ``--n-stde-points`` points of its sampler is
reported beside it).

Run one after the other, each for ``--budget-s`` seconds of training:

* ``stde``: STDE's own ``train`` (``benchmarks/_stde_driver.py``, run by
  ``--stde-python``): sparse STDE, 16 random coordinates, Adam lr 1e-3 decayed
  linearly to 0 over its step count. Its loop runs a fixed number of steps, so a
  short calibration run measures its time per step and the real run gets
  ``budget / (s per step)`` steps; if the load changed so much that its training
  time misses the budget by more than ``--stde-tolerance``, it is run again with
  the step count its own speed implies (up to ``--stde-retries`` times). Every
  run is kept in the JSON (``stde_runs``); the row is the last one, with its
  measured training time as it is.
  One XLA thread (``--xla-threads``);
* ``fused_adafactor`` and ``adam+taylor`` of ``time_to_accuracy.py`` with
  ``--lr-decay linear`` (to 0 over the wall-time budget), each in its own subprocess,
  built from the packaged configs (``method=fused_adafactor`` / ``method=adam`` over
  ``estimator=taylor`` on ``pde=allen_cahn_twobody``, their packaged learning rates) with
  the overrides ``seed=<--seed>``, ``pde.n_eval=<--n-eval>`` and ``threads=1``
  (:func:`our_overrides`); each row records its overrides and ``sdze-train`` command.
  The held-out points handed to STDE are those of the same overrides (:func:`held_out`).

Reference lines (``floors`` of ``time_to_accuracy.py``): the best constant and best
affine ``n(x)`` on the shared held-out points, for our instance and for an
STDE-style draw (``np.random.RandomState(seed).randn(1, d)``, its first ``d - 1``).

    python benchmarks/stde_side_by_side.py --stde-path /tmp/stde \
        --stde-python /tmp/stde-venv/bin/python
    python benchmarks/stde_side_by_side.py --smoke      # our side only, tiny, no STDE needed

Result: ``results/stde_side_by_side.json`` (``stde_side_by_side_smoke.json``), with the
run's provenance (date, commit, machine, loads, threads, command); an STDE run records its
driver's command line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import time_to_accuracy as tta  # noqa: E402
from _common import (  # noqa: E402
    RESULTS,
    SMOKE_OVERRIDES,
    build_run,
    finish_provenance,
    load_average,
    script_provenance,
)

HERE = Path(__file__).resolve().parent
#: Our methods run beside STDE: the best first-order paths.
OURS = ("fused_adafactor", "adam+taylor")
#: Torch threads of our runs (``threads=``), as STDE runs on ``--xla-threads`` (one).
THREADS = 1


def our_overrides(method: str, dim: int, seed: int, n_eval: int, smoke: bool = False,
                  coeff_seed: int | None = None) -> list[str]:
    """The ``sdze-train`` overrides of our run of ``method`` (a key of :data:`OURS`).

    ``time_to_accuracy.study_overrides`` on the two-body problem with :data:`THREADS`
    torch threads; ``smoke``: the tiny sizes of every script's smoke mode;
    ``coeff_seed``: ``pde.coeff_seed`` (``None``: the packaged draw).
    """
    extra = [*(SMOKE_OVERRIDES if smoke else ()),
             *(() if coeff_seed is None else (f"pde.coeff_seed={coeff_seed}",))]
    return tta.study_overrides(method, "twobody", dim, seed, *extra, n_eval=n_eval,
                               threads=THREADS)


def held_out(overrides: list[str]):
    """The problem of ``overrides`` (built as our runs build it) and its held-out points."""
    problem = build_run(overrides).problem
    problem.fit_threads.restore()  # no training here: this process keeps its thread count
    return (problem, *eval_points(problem))


def eval_points(problem) -> tuple[np.ndarray, np.ndarray]:
    """``problem``'s held-out points and exact solution there (float64), as STDE gets them."""
    xs, refs = zip(*problem.eval_batches(), strict=True)
    return torch.cat(xs).double().numpy(), torch.cat(refs).double().numpy()


def stde_env(xla_threads: int) -> dict[str, str]:
    """Environment of an STDE process: JAX on the CPU with ``xla_threads`` threads."""
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_cpu_multi_thread_eigen=false "
                          f"intra_op_parallelism_threads={xla_threads}")


def stde_style_coefficients(dim: int, seed: int) -> np.ndarray:
    """A draw as STDE's ``main.py`` makes it (``randn(1, d)``, seeded here), first ``d - 1``."""
    return np.random.RandomState(seed).randn(1, dim)[0, :-1]


def instance_floors(problem, affine_max_dim: int, threads: int = 1) -> dict:
    """``floors`` of our instance and of an STDE-style draw, on the same held-out points.

    Computed with ``threads`` torch threads, as the runs compute theirs.
    """
    saved, before = problem.coeffs.clone(), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = tta.floors(problem, affine_max_dim)
        problem.coeffs.copy_(torch.from_numpy(stde_style_coefficients(problem.dim, problem.seed)))
        drawn = tta.floors(problem, affine_max_dim)
    finally:
        problem.coeffs.copy_(saved)
        torch.set_num_threads(before)
    return {"ours": ours, "stde_style_draw": drawn}


def run_stde(args, instance: Path, epochs: int) -> dict:
    """STDE's ``train`` for ``epochs`` steps through the driver; the parsed result line."""
    env = stde_env(args.xla_threads)
    cmd = [args.stde_python, str(HERE / "_stde_driver.py"), "--stde-path", str(args.stde_path),
           "--instance", str(instance), "--epochs", str(epochs), "--seed", str(args.seed),
           "--rand-batch-size", str(args.rand_batch_size), "--n-test", str(args.n_stde_points)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                         cwd=instance.parent, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("STDE "):
            return {**json.loads(line[5:]), "load": load_average(), "command": shlex.join(cmd)}
    raise RuntimeError(f"STDE run ({epochs} steps) failed:\n{out.stderr[-3000:]}")


def stde_runs(args, instance: Path, calibration: dict) -> list[dict]:
    """STDE runs until one's training time is within the tolerance of the budget."""
    runs: list[dict] = []
    s_per_step = calibration["s_per_step"]
    for _ in range(1 + args.stde_retries):
        runs.append(run_stde(args, instance, max(1, round(args.budget_s / s_per_step))))
        print(f"stde: {runs[-1]}", flush=True)
        if abs(runs[-1]["train_s"] / args.budget_s - 1) <= args.stde_tolerance:
            break
        s_per_step = runs[-1]["s_per_step"]
    return runs


def main(argv: list[str] | None = None) -> dict:
    """Run STDE (unless ``--smoke``) and our two methods; write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--stde-path", type=Path, help="checkout of sail-sg/stde")
    ap.add_argument("--stde-python", help="python of an environment with STDE's requirements")
    ap.add_argument("--dim", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--coeff-seed", type=int, default=None,
                    help="pde.coeff_seed of the instance (default: the packaged draw)")
    ap.add_argument("--budget-s", type=float, default=216.0, help="training seconds per method")
    ap.add_argument("--calibration-steps", type=int, default=300,
                    help="steps of the STDE run that measures its time per step")
    ap.add_argument("--stde-tolerance", type=float, default=0.1,
                    help="relative miss of the budget that makes STDE run again")
    ap.add_argument("--stde-retries", type=int, default=1)
    ap.add_argument("--methods", nargs="+", choices=("stde", *OURS), default=["stde", *OURS])
    ap.add_argument("--tag", default="", help="suffix of the result file")
    ap.add_argument("--rand-batch-size", type=int, default=16, help="STDE's coordinates per step")
    ap.add_argument("--xla-threads", type=int, default=1)
    ap.add_argument("--n-eval", type=int, default=2000, help="shared held-out points")
    ap.add_argument("--n-stde-points", type=int, default=20000,
                    help="points of STDE's own sampler for its native error")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--affine-max-dim", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true", help="our side only, tiny; no STDE needed")
    args = ap.parse_args(argv)
    if args.smoke:
        args.dim, args.budget_s, args.n_eval, args.eval_every = 50, 1.0, 64, 5
    elif "stde" in args.methods and not (args.stde_path and args.stde_python):
        ap.error("--stde-path and --stde-python are required (or --smoke)")
    elif "stde" in args.methods and not (args.stde_path / "stde" / "train.py").is_file():
        ap.error(f"--stde-path {args.stde_path} has no stde/train.py")
    record = script_provenance(__file__, argv)
    overrides = {m: our_overrides(m, args.dim, args.seed, args.n_eval, args.smoke,
                               args.coeff_seed) for m in OURS}
    problem, x_eval, u_eval = held_out(overrides[OURS[0]])
    result = {**record, "dim": args.dim, "seed": args.seed, "coeff_seed": args.coeff_seed,
              "budget_s": args.budget_s,
              "n_eval": args.n_eval,
              "floors": instance_floors(problem, args.affine_max_dim, THREADS),
              "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.smoke and "stde" in args.methods:
            instance = Path(tmp) / "instance.npz"
            np.savez(instance, coeffs=problem.coeffs.double().numpy(), x_eval=x_eval,
                     u_eval=u_eval)
            result["stde_calibration"] = run_stde(args, instance, args.calibration_steps)
            result["stde_runs"] = stde_runs(args, instance, result["stde_calibration"])
            result["rows"].append({"method": "stde", **result["stde_runs"][-1]})
            write(args, result)
    for method in (m for m in OURS if m in args.methods):
        job = dict(method=method, overrides=overrides[method], budget_s=args.budget_s,
                   every=args.eval_every, problem_name="twobody",
                   affine_max_dim=args.affine_max_dim, lr_decay="linear")
        row = tta.run_isolated(job)
        if not same_points(row["floors"], result["floors"]["ours"]):
            raise RuntimeError(f"{method} ran on other held-out points than STDE's evaluation")
        result["rows"].append({k: row[k] for k in (
            "method", "status", "steps", "train_s", "s_per_step", "final_rel_l2", "lr",
            "peak_rss_bytes", "load", "threads", "overrides", "command", "not_in_command",
            "curve")})
        write(args, result)  # each finished run is on disk at once
        print(f"{method}: {row['steps']} steps, {row['train_s']:.0f} s, final rel L2 "
              f"{row['final_rel_l2']:.3e}", flush=True)
    write(args, finish_provenance(result))
    return result


def same_points(a: dict, b: dict) -> bool:
    """Whether two ``floors`` results come from the same held-out points.

    The best constant is a closed form on the points, equal up to the rounding of
    its sums (another thread count sums in another order); other points of the
    same distribution change it in the second or third digit.
    """
    return all(math.isclose(a[k], b[k], rel_tol=1e-6) for k in ("constant", "constant_value"))


def write(args, result: dict) -> None:
    """Write ``result`` to ``results/stde_side_by_side[_smoke][_<tag>].json``."""
    args.out.mkdir(parents=True, exist_ok=True)
    name = "stde_side_by_side" + ("_smoke" if args.smoke else "") + (
        f"_{args.tag}" if args.tag else "") + ".json"
    (args.out / name).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
