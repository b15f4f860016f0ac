"""Variance explosion without CRNS, and its cure.

On a fixed model and a fixed batch of collocation points, with a randomized
spatial estimator, the projected-gradient scalar ``(L(c + eps u) - L(c - eps u)) / (2 eps)``
of SDZE is computed for one fixed direction ``u`` and many draws of the
estimator's random directions:

* CRNS on: both evaluations use the same estimator seed (the scalar is a
  directional derivative of ``L_hat(.; xi)``);
* CRNS off: independent seeds (the noise difference is divided by ``2 eps``).

Expected: ``Var_off / Var_on`` grows like ``1 / eps^2`` and exceeds 100 at
``eps = 1e-3``.

Every measurement is built from the packaged configs (``_common.build_run``): two-body
Allen-Cahn (``pde=allen_cahn_twobody``) with the packaged network, points and SDZE, the
estimator of ``--estimators`` (``fd``: ``estimator=fd estimator.distribution=rademacher``;
``taylor``: ``estimator=taylor``, coordinate directions), ``method.eps`` of ``--eps`` and
``trainer.precision`` of ``--dtypes``; the model is the one ``sdze-train`` takes its first
step from (cast to the precision, then ``on_fit_start``'s output fit). CRNS off is the same
build with ``method.crns=false``. Positional arguments are further overrides for every row
(e.g. ``pde.dim=1000``). Each row records its overrides (CRNS on) and ``sdze-train``
command (``sdze_train_command``); the results file records the run's provenance (date,
commit, machine, load at start and end, threads, the command line). Results:
``results/crns_variance.{csv,json,png}``.

    python benchmarks/crns_variance.py            # d = 100, 100 draws
    python benchmarks/crns_variance.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

import torch
from _common import (
    SMOKE_OVERRIDES,
    build_run,
    cast_run,
    finish_provenance,
    merge_overrides,
    script_provenance,
    write_csv,
)

from sdze_lightning.seeding import Stream

RESULTS = Path(__file__).resolve().parent / "results"

#: The estimator overrides of ``--estimators``.
ESTIMATORS: dict[str, list[str]] = {
    "fd": ["estimator=fd", "estimator.distribution=rademacher"],
    "taylor": ["estimator=taylor"],
}
#: ``trainer.precision`` of ``--dtypes``.
PRECISIONS: dict[str, str] = {"float64": "64-true", "float32": "32-true"}


def row_overrides(dtype: str, estimator: str, eps: float, extra: list[str]) -> list[str]:
    """The ``sdze-train`` overrides of one row (CRNS on): SDZE on two-body Allen-Cahn."""
    return merge_overrides(
        ["pde=allen_cahn_twobody", "method=sdze", *ESTIMATORS[estimator],
         f"method.eps={eps}", f"trainer.precision={PRECISIONS[dtype]}"], extra)


def scalar_draws(overrides: list[str], crns: bool, draws: int) -> tuple[torch.Tensor, str, int]:
    """Projected-gradient scalars of one fixed direction over ``draws`` estimator seeds.

    The run of ``overrides`` (plus ``method.crns=false`` without CRNS) at its first step:
    its optimizer's first direction, its step-0 batch, estimator seeds ``0 .. draws-1``.

    Returns:
        The scalars, the estimator's label (name, distribution, directions) and ``d``.

    """
    run = build_run(overrides + ([] if crns else ["method.crns=false"]))
    cast_run(run)
    run.fit_output()
    problem, opt = run.problem, run.optimizer
    x = problem.points(0, 0)  # fixed batch
    out = []
    for s in range(draws):

        def closure(key: int, s: int = s) -> torch.Tensor:
            gen = problem.generator(s, key, stream=Stream.ESTIMATOR)
            r = problem.residual(x, problem.derivatives(x, gen))
            return r.square().mean()

        out.append(opt.scalars(opt.estimate(closure))[0])
    est = problem.estimator
    label = f"{est.name}-{getattr(est, 'distribution', '')}-{est.num_directions}"
    opt.close()
    return torch.stack(out), label, problem.dim


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns the rows written to the CSV."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="further overrides for every row")
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--estimators", nargs="+", default=["fd"], choices=list(ESTIMATORS))
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    ap.add_argument("--dtypes", nargs="+", default=["float64", "float32"],
                    choices=list(PRECISIONS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    args = ap.parse_args(argv)
    record = script_provenance(__file__, argv)
    extra = list(args.overrides)
    if args.smoke:
        extra = merge_overrides(["pde.dim=8", *SMOKE_OVERRIDES], extra)
        args.draws, args.dtypes = 10, ["float64"]
    args.out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    rows = []
    t0 = time.perf_counter()
    try:
        for dtype_name in args.dtypes:
            for est in args.estimators:
                for eps in args.eps:
                    overrides = row_overrides(dtype_name, est, eps, extra)
                    var = {}
                    for crns in (True, False):
                        s, label, dim = scalar_draws(overrides, crns, args.draws)
                        var[crns] = float(s.to(torch.float64).var())
                    row = dict(
                        dtype=dtype_name, estimator=label, eps=eps, var_crns_on=var[True],
                        var_crns_off=var[False], ratio=var[False] / var[True],
                        draws=args.draws, dim=dim, overrides=overrides,
                        sdze_train_command=shlex.join(["sdze-train", *overrides]),
                    )
                    rows.append(row)
                    print(
                        f"[{time.perf_counter() - t0:6.1f}s] {dtype_name} {label:22s} "
                        f"eps={eps:.0e} var_on={row['var_crns_on']:.3e} "
                        f"var_off={row['var_crns_off']:.3e} ratio={row['ratio']:.3e}",
                        flush=True,
                    )
    finally:
        torch.set_num_threads(threads)  # build_run applied the runs' threads=
    stem = "crns_variance_smoke" if args.smoke else "crns_variance"
    write_csv(args.out / f"{stem}.csv", rows)
    (args.out / f"{stem}.json").write_text(json.dumps(finish_provenance({
        **record, "args": {k: (str(v) if isinstance(v, Path) else v)
                           for k, v in vars(args).items()},
        "crns_off": "each row's overrides plus method.crns=false", "rows": rows,
    }), indent=2))
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
