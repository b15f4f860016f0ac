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

Results: ``results/subspace_variance.{csv,json}``.

    python benchmarks/subspace_variance.py           # two-body AC d=100, MLP 4x128, r=1,4,16,64
    python benchmarks/subspace_variance.py --smoke
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch
from _common import write_csv

from sdze_lightning.estimators.fd import FiniteDifferenceEstimator
from sdze_lightning.methods import SDZE, MeZO
from sdze_lightning.nn import MLP
from sdze_lightning.problems import TwoBody

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


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; returns the rows written to the CSV."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dim", type=int, default=100)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--points", type=int, default=100)
    ap.add_argument("--directions", type=int, default=16)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--windows", type=int, default=4, help="fresh subspaces per rank")
    ap.add_argument("--queries", type=int, default=25, help="single-query estimates per window")
    ap.add_argument("--eps", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (small tensors)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    args = ap.parse_args(argv)
    if args.smoke:
        args.dim, args.width, args.depth, args.points, args.directions = 6, 16, 2, 16, 4
        args.ranks, args.windows, args.queries = [1, 4], 2, 10
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    net = MLP(args.dim, width=args.width, depth=args.depth, seed=args.seed)
    problem = TwoBody(
        dim=args.dim, operator="allen_cahn", net=net, n_interior=args.points, n_eval=0,
        estimator=FiniteDifferenceEstimator(args.directions, distribution="rademacher"),
        seed=args.seed,
    ).double()
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
        rel, capt, cosines, size = [], [], [], 0
        for w in range(args.windows):
            opt = SDZE(problem.net, rank=r, eps=args.eps, queries=args.queries, crns=True,
                       seed=1000 * args.seed + w)
            s = opt.scalars(opt.estimate(loss_at))
            p = projected(opt, grads)
            size = p.numel()
            p2 = float(p.square().sum())
            capt.append(p2 / g2)
            for j in range(args.queries):
                gh = float(s[j]) * torch.cat(opt._directions[j])
                rel.append(float((gh - p).square().sum()) / p2)
                cosines.append(float(gh @ p) / (float(gh.norm()) * g2**0.5))
        row = dict(method=f"sdze r={r}", coords=size, params=n_params,
                   rel_var=sum(rel) / len(rel), theory_rel_var=size + 1,
                   captured=sum(capt) / len(capt), cosine=sum(cosines) / len(cosines),
                   samples=len(rel))
        rows.append(row)
        print(f"[{time.perf_counter() - t0:6.1f}s] {row}", flush=True)

    n = args.windows * args.queries
    opt = MeZO(problem.net, lr=0.0, eps=args.eps, queries=n, crns=True, seed=args.seed)
    s = opt.scalars(opt.estimate(loss_at))
    rel, cosines = [], []
    for j in range(n):
        z = torch.cat([opt.direction(j, i).reshape(-1) for i in range(len(params))])
        gh = float(s[j]) * z
        rel.append(float((gh - g_full).square().sum()) / g2)
        cosines.append(float(gh @ g_full) / (float(gh.norm()) * g2**0.5))
    row = dict(method="full space (MeZO)", coords=n_params, params=n_params,
               rel_var=sum(rel) / n, theory_rel_var=n_params + 1, captured=1.0,
               cosine=sum(cosines) / n, samples=n)
    rows.append(row)
    print(f"[{time.perf_counter() - t0:6.1f}s] {row}", flush=True)

    stem = "subspace_variance_smoke" if args.smoke else "subspace_variance"
    write_csv(args.out / f"{stem}.csv", rows)
    (args.out / f"{stem}.json").write_text(json.dumps({"args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
    }, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
