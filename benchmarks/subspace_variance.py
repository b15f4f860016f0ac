"""Variance of the zeroth-order gradient estimate: low-rank subspace vs full space.

Fixed model, batch and estimator seed (CRNS on), float64. The reference is the
autodiff gradient ``g`` of the *same* estimated loss ``L_hat(.; xi)``. For
SDZE at rank ``r`` (per layer ``D_l = r_a r_b + r_a`` coordinates, ``D`` in
all) and for full-space Gaussian SPSA (MeZO, ``P`` parameters), single-query
estimates are drawn and compared with:

* ``rel_var``: ``E|g_hat - g_ref|^2 / |g_ref|^2`` where ``g_ref`` is the
  gradient projected on the window's subspace (SDZE, coordinates) or ``g``
  itself (full space). Gaussian SPSA theory: ``D + 1`` and ``P + 1``: inside a
  window the noise factor is the subspace size, not the parameter count.
* ``captured``: ``|P^T g|^2 / |g|^2``, the share of the gradient a window sees
  (about ``D / P`` for a random subspace).
* ``cosine``: ``E cos(P g_hat, g)``, the mean cosine between a single-query
  estimate mapped to parameter space and the full gradient (how much descent one
  query buys; for full-space Gaussian SPSA about ``sqrt(2 / (pi P))``).

The structured subspace ``A S B^T`` is not isotropic: the output layer has one
row, so its ``A`` is ``[+-1]`` and its bias (and an ``r``-dimensional slice of
its weights) is always inside the subspace; ``captured`` is therefore far above
``D / P`` when the gradient is concentrated there.

Every estimate is built from the packaged configs: the problem, network, points and
estimator of ``_common.build_run`` (two-body Allen-Cahn, ``estimator=fd
estimator.distribution=rademacher``, ``trainer.precision=64-true``; the model is the one
``sdze-train`` takes its first step from: cast, then ``on_fit_start``'s output fit), each
method instantiated from the composed ``method`` group (``method=sdze method.rank=<r>``
with ``method.seed`` 1000 seed + window, ``method=mezo``), both with ``method.eps=1e-5``
(in float64 the difference quotient is then the directional derivative up to rounding, as
the reference assumes) and ``method.queries`` single-query estimates. Positional arguments
are further overrides for every row (e.g. ``pde.dim=1000``). Each row records its
overrides and ``sdze-train`` command (``sdze_train_command``); the results file records the
run's provenance (date, commit, machine, load at start and end, threads, the command line).

Results: ``results/subspace_variance.{csv,json}``.

    python benchmarks/subspace_variance.py           # two-body AC d=100, r=1,4,16,64
    python benchmarks/subspace_variance.py --smoke
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import time
from pathlib import Path

import torch
from _common import (
    SMOKE_OVERRIDES,
    build_run,
    cast_run,
    compose_overrides,
    finish_provenance,
    merge_overrides,
    script_provenance,
    write_csv,
)
from hydra.utils import instantiate

from sdze_lightning.methods import SDZE
from sdze_lightning.methods.base import build_optimizer

RESULTS = Path(__file__).resolve().parent / "results"


def projected(opt: SDZE, grads: dict[int, torch.Tensor]) -> torch.Tensor:
    """``P^T g`` in SDZE's coordinates (``A^T G B`` and ``A^T g_b`` per layer)."""
    out = []
    for sub in opt.subspaces():
        gw = grads[id(sub.layer.weight)]
        out.append((sub.A.T @ gw @ sub.B).reshape(-1))
        if sub.layer.bias is not None:
            out.append(sub.A.T @ grads[id(sub.layer.bias)])
    return torch.cat(out)


def method_of(overrides: list[str], net: torch.nn.Module) -> torch.optim.Optimizer:
    """The composed config's ``method`` group, built on ``net`` as ``configure_optimizers``
    builds it."""
    return build_optimizer(instantiate(compose_overrides(overrides).method), net)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns the rows written to the CSV."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="further overrides for every row")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--windows", type=int, default=4, help="fresh subspaces per rank")
    ap.add_argument("--queries", type=int, default=25, help="single-query estimates per window")
    ap.add_argument("--eps", type=float, default=1e-5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    args = ap.parse_args(argv)
    record = script_provenance(__file__, argv)
    extra = list(args.overrides)
    if args.smoke:
        extra = merge_overrides(["pde.dim=6", *SMOKE_OVERRIDES], extra)
        args.ranks, args.windows, args.queries = [1, 4], 2, 10
    args.out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    try:
        rows = measure(args, extra)
    finally:
        torch.set_num_threads(threads)  # build_run applied the run's threads=
    stem = "subspace_variance_smoke" if args.smoke else "subspace_variance"
    write_csv(args.out / f"{stem}.csv", rows)
    (args.out / f"{stem}.json").write_text(json.dumps(finish_provenance({
        **record, "args": {k: (str(v) if isinstance(v, Path) else v)
                           for k, v in vars(args).items()}, "rows": rows,
    }), indent=2))
    return rows


def measure(args: argparse.Namespace, extra: list[str]) -> list[dict]:
    """The rows: one per rank, then the full space."""
    t0 = time.perf_counter()
    base = merge_overrides(
        ["pde=allen_cahn_twobody", "estimator=fd", "estimator.distribution=rademacher",
         "trainer.precision=64-true", "method=sdze", f"method.eps={args.eps}"], extra)
    run = build_run(base)
    cast_run(run)
    run.fit_output()
    run.optimizer.close()  # the run's own SDZE: only its problem is used
    problem, seed = run.problem, int(compose_overrides(base).seed)
    params = list(problem.net.parameters())
    n_params = sum(p.numel() for p in params)
    with torch.enable_grad():
        gvals = torch.autograd.grad(problem.compute_loss(0, 0), params)
    grads = {id(p): g for p, g in zip(params, gvals, strict=True)}
    g_full = torch.cat([g.reshape(-1) for g in gvals])
    g2 = float(g_full.square().sum())

    loss_at = functools.partial(problem.compute_loss, 0)  # fixed step, the method's keys

    rows = []
    for r in args.ranks:
        overrides = merge_overrides(base, [f"method.rank={r}", f"method.queries={args.queries}"])
        seeds = [1000 * seed + w for w in range(args.windows)]
        rel, capt, cosines, size = [], [], [], 0
        for window_seed in seeds:
            opt = method_of([*overrides, f"method.seed={window_seed}"], problem.net)
            s = opt.scalars(opt.estimate(loss_at))
            p = projected(opt, grads)
            size = p.numel()
            p2 = float(p.square().sum())
            capt.append(p2 / g2)
            for j in range(args.queries):
                gh = float(s[j]) * torch.cat(opt._directions[j])
                rel.append(float((gh - p).square().sum()) / p2)
                cosines.append(float(gh @ p) / (float(gh.norm()) * g2**0.5))
            opt.close()
        row = dict(method=f"sdze r={r}", coords=size, params=n_params,
                   rel_var=sum(rel) / len(rel), theory_rel_var=size + 1,
                   captured=sum(capt) / len(capt), cosine=sum(cosines) / len(cosines),
                   samples=len(rel), overrides=overrides, method_seeds=seeds,
                   sdze_train_command=shlex.join(["sdze-train", *overrides]))
        rows.append(row)
        print(f"[{time.perf_counter() - t0:6.1f}s] {row}", flush=True)

    n = args.windows * args.queries
    overrides = merge_overrides(base, ["method=mezo", f"method.queries={n}"])
    opt = method_of(overrides, problem.net)
    s = opt.scalars(opt.estimate(loss_at))
    rel, cosines = [], []
    for j in range(n):
        z = torch.cat([opt.direction(j, i).reshape(-1) for i in range(len(params))])
        gh = float(s[j]) * z
        rel.append(float((gh - g_full).square().sum()) / g2)
        cosines.append(float(gh @ g_full) / (float(gh.norm()) * g2**0.5))
    row = dict(method="full space (MeZO)", coords=n_params, params=n_params,
               rel_var=sum(rel) / n, theory_rel_var=n_params + 1, captured=1.0,
               cosine=sum(cosines) / n, samples=n, overrides=overrides, method_seeds=[seed],
               sdze_train_command=shlex.join(["sdze-train", *overrides]))
    rows.append(row)
    print(f"[{time.perf_counter() - t0:6.1f}s] {row}", flush=True)
    return rows


if __name__ == "__main__":
    main()
