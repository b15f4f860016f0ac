"""Variance explosion without CRNS, and its cure.

On a fixed model and a fixed batch of collocation points, with a randomized
spatial estimator, the projected-gradient scalar ``(L(c + eps u) - L(c - eps u)) / (2 eps)``
of SDZE is computed for one fixed direction ``u`` and many draws of the
estimator's random directions:

* CRNS on: both evaluations use the same estimator seed (the scalar is a
  directional derivative of ``L_hat(.; xi)``);
* CRNS off: independent seeds (the noise difference is divided by ``2 eps``).

Expected: ``Var_off / Var_on`` grows like ``1 / eps^2`` and exceeds 100 at
``eps = 1e-3``. Problem: two-body Allen-Cahn (unit ball, hard constraint),
MLP tanh. Results: ``results/crns_variance.{csv,json,png}``.

    python benchmarks/crns_variance.py            # d=100, MLP 4x128, 100 points, 100 draws
    python benchmarks/crns_variance.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import write_csv

from sdze_lightning.estimators.fd import FiniteDifferenceEstimator
from sdze_lightning.estimators.taylor import TaylorEstimator
from sdze_lightning.methods import SDZE
from sdze_lightning.nn import MLP
from sdze_lightning.problems import TwoBody
from sdze_lightning.seeding import Stream

RESULTS = Path(__file__).resolve().parent / "results"


def estimators(k: int, names: list[str]) -> dict[str, object]:
    """The randomized forward-only estimators compared."""
    make = {
        "fd": lambda: FiniteDifferenceEstimator(k, distribution="rademacher"),
        "taylor": lambda: TaylorEstimator(k, distribution="coordinate"),
    }
    labels = {"fd": f"fd-rademacher-{k}", "taylor": f"taylor-coordinate-{k}"}
    return {labels[n]: make[n]() for n in names}


def scalar_draws(
    problem: TwoBody, eps: float, crns: bool, draws: int, rank: int, seed: int
) -> torch.Tensor:
    """Projected-gradient scalars of one fixed direction over ``draws`` estimator seeds."""
    x = problem.points(0, 0)  # fixed batch
    opt = SDZE(problem.net, rank=rank, eps=eps, queries=1, crns=crns, seed=seed)
    out = []
    for s in range(draws):

        def closure(key: int, s: int = s) -> torch.Tensor:
            gen = problem.generator(s, key, stream=Stream.ESTIMATOR)
            r = problem.residual(x, problem.derivatives(x, gen))
            return r.square().mean()

        out.append(opt.scalars(opt.estimate(closure))[0])
    return torch.stack(out)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns the rows written to the CSV."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dim", type=int, default=100)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--points", type=int, default=100)
    ap.add_argument("--directions", type=int, default=16)
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--estimators", nargs="+", default=["fd"], choices=["fd", "taylor"])
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    ap.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (small tensors)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    args = ap.parse_args(argv)
    if args.smoke:
        args.dim, args.width, args.depth, args.points, args.draws = 8, 16, 2, 16, 10
        args.directions, args.dtypes = 4, ["float64"]
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    rows = []
    t0 = time.perf_counter()
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for est_name, est in estimators(args.directions, args.estimators).items():
            net = MLP(args.dim, width=args.width, depth=args.depth, seed=args.seed)
            problem = TwoBody(
                dim=args.dim, operator="allen_cahn", net=net, estimator=est,
                n_interior=args.points, n_eval=0, seed=args.seed,
            ).to(dtype)
            for eps in args.eps:
                var = {}
                for crns in (True, False):
                    s = scalar_draws(problem, eps, crns, args.draws, args.rank, args.seed)
                    var[crns] = float(s.to(torch.float64).var())
                row = dict(
                    dtype=dtype_name, estimator=est_name, eps=eps, var_crns_on=var[True],
                    var_crns_off=var[False], ratio=var[False] / var[True],
                    draws=args.draws, dim=args.dim,
                )
                rows.append(row)
                print(
                    f"[{time.perf_counter() - t0:6.1f}s] {dtype_name} {est_name:22s} eps={eps:.0e} "
                    f"var_on={row['var_crns_on']:.3e} var_off={row['var_crns_off']:.3e} "
                    f"ratio={row['ratio']:.3e}",
                    flush=True,
                )
    stem = "crns_variance_smoke" if args.smoke else "crns_variance"
    write_csv(args.out / f"{stem}.csv", rows)
    (args.out / f"{stem}.json").write_text(json.dumps({"args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
    }, "rows": rows}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4))
        for key in sorted({(r["dtype"], r["estimator"]) for r in rows}):
            sel = [r for r in rows if (r["dtype"], r["estimator"]) == key]
            ax.loglog([r["eps"] for r in sel], [r["ratio"] for r in sel], "o-", label=" ".join(key))
        e = sorted(args.eps)
        ref = [rows[0]["ratio"] * (rows[0]["eps"] / v) ** 2 for v in e]
        ax.loglog(e, ref, "k:", label="1/eps^2")
        ax.set_xlabel("eps")
        ax.set_ylabel("Var(CRNS off) / Var(CRNS on)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out / f"{stem}.png", dpi=120)
    except ImportError:
        pass
    return rows


if __name__ == "__main__":
    main()
