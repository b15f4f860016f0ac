"""He et al. (2023) Figure 4 ablation: error of Stein estimators against K.

A fixed random MLP ``f`` (5 linear layers, width 100, tanh; Xavier init, seed 0)
with ``d = 1000`` inputs, points uniform in ``[0, 1]^d``, ``sigma = 0.1``, float64. For
K = 8, 16, ..., K_max directions we report the L1 error of the gradient (mean
over points and coordinates of ``|g_hat - g|``) and of the Laplacian (mean over
points of ``|lap_hat - lap|``), averaged over up to ``--blocks`` disjoint blocks
of K directions taken from one stream of ``K_max`` Gaussian directions.

Estimators and their targets:

* ``stein-vanilla``, ``stein-cv``, ``stein-antithetic`` (eqs. 7, 8-9, 10-11)
  estimate the derivatives of the smoothed model ``u = E f(x + delta)``; the
  reference is a Monte Carlo average over ``--ref-samples`` antithetic pairs
  ``x +- delta`` of the exact gradient (reverse mode) and of a Hutchinson
  Laplacian with ``--ref-probes`` Rademacher probes per point (exact Taylor-mode
  second derivatives along them); its standard error is reported.
* ``fd-gaussian`` (central differences, default float64 steps) and
  ``taylor-gaussian`` (exact jets) along the same Gaussian directions ``v``:
  ``mean (D_v f) v`` and ``mean D_v^2 f``; reference: exact ``grad f(x)`` and
  ``Delta f(x)`` (Taylor mode on all ``d`` coordinate axes).
* ``taylor-coordinate``: K coordinates without replacement, scaled ``d / K``
  (K <= d; at K = d it is exact).

The network is the packaged ``model`` group's, as ``_common.build_run`` builds it for
``pde=allen_cahn_twobody pde.dim=1000 model.width=100 trainer.precision=64-true`` (He et
al.'s width; the packaged depth, 4 hidden layers), at its initialisation (no output fit:
the points are the paper's, not the problem's); ``sigma`` is the packaged
``estimator=stein``'s, the seeds are the config's ``seed``. Positional arguments are
further overrides (e.g. ``seed=1``, ``estimator.sigma=0.05``). Each row records the
overrides of the estimator it measures (``estimator=stein estimator.variant=<v>
estimator.num_directions=<K>``, ...) and their ``sdze-train`` command
(``sdze_train_command``); the results file's ``meta`` records the run's provenance (date,
commit, machine, load at start and end, threads, the command line).

Results: ``results/stein_ablation.{csv,json,png}``.

    python benchmarks/stein_ablation.py            # d=1000, 32 points, K up to 32768
    python benchmarks/stein_ablation.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import json
import math
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

from sdze_lightning.directions import Directions
from sdze_lightning.estimators.fd import central_differences, default_step
from sdze_lightning.estimators.stein import VARIANTS, stein_samples, stein_terms
from sdze_lightning.model_fn import ModelFunction

RESULTS = Path(__file__).resolve().parent / "results"

#: The network's overrides: He et al.'s d and width, float64.
NETWORK: list[str] = ["pde=allen_cahn_twobody", "pde.dim=1000", "model.width=100",
                      "estimator=stein", "trainer.precision=64-true"]


def estimator_overrides(name: str, k: int) -> list[str]:
    """The ``estimator`` overrides of the estimator a row measures, with ``k`` directions."""
    if name.startswith("stein-"):
        return ["estimator=stein", f"estimator.variant={name.removeprefix('stein-')}",
                f"estimator.num_directions={k}"]
    est, dist = name.split("-")
    return [f"estimator={est}", *([] if dist == "coordinate" else
                                  [f"estimator.distribution={dist}"]),
            f"estimator.num_directions={k}"]


def row_overrides(network: list[str], name: str, k: int) -> list[str]:
    """The overrides of a row: the network's, with the estimator the row measures (a Stein
    row keeps the network's ``estimator.*`` settings, e.g. ``estimator.sigma``)."""
    base = [o for o in network if not o.startswith("estimator")]
    stein = [o for o in network if o.startswith("estimator.")] if name.startswith("stein-") else []
    return merge_overrides(base, stein, estimator_overrides(name, k))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", help="further overrides (network, seed, sigma)")
    p.add_argument("--points", type=int, default=32)
    p.add_argument("--kmax", type=int, default=32768)
    p.add_argument("--blocks", type=int, default=16, help="max disjoint blocks averaged per K")
    p.add_argument("--chunk", type=int, default=1024, help="directions per forward chunk")
    p.add_argument("--ref-samples", type=int, default=256, help="antithetic pairs (reference)")
    p.add_argument("--ref-probes", type=int, default=16, help="Hutchinson probes per batch")
    p.add_argument("--ref-batch", type=int, default=16, help="antithetic pairs per batch")
    p.add_argument("--out", type=str, default=str(RESULTS))
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    args = p.parse_args(argv)
    args.network = merge_overrides(NETWORK, args.overrides)
    if args.smoke:
        args.network = merge_overrides(args.network, ["pde.dim=50", *SMOKE_OVERRIDES])
        args.points, args.kmax, args.blocks, args.chunk = 4, 64, 2, 32
        args.ref_samples, args.ref_probes, args.ref_batch = 16, 4, 4
    return args


def exact_plain(model: ModelFunction, x: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``grad f`` ``(N, d)`` and ``d^2 f / dx_j^2`` ``(d, N)`` by Taylor mode."""
    jets = model.jets(x, Directions(d, index=torch.arange(d)), 2)
    return jets[1].T.contiguous(), jets[2]


def smoothed_reference(
    model: ModelFunction,
    x: torch.Tensor,
    lap_x: torch.Tensor,
    args: argparse.Namespace,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Monte Carlo ``E grad f(x + delta)`` and ``E Delta f(x + delta)``, with standard error.

    The Laplacian uses the exact ``Delta f(x)`` as a control variate:
    ``E Delta f(x + delta) = Delta f(x) + E[Delta f(x + delta) - Delta f(x)]``, the
    difference estimated with Rademacher probes shared by ``x`` and ``x +- delta``
    (the probe noise nearly cancels in the difference). Batches of
    ``--ref-batch`` antithetic pairs share one set of probes, so the standard
    error is computed over batch means.
    """
    d, n = args.dim, x.shape[0]
    batch = min(args.ref_batch, args.ref_samples)
    g_means, lap_means = [], []
    for _ in range(max(1, args.ref_samples // batch)):
        delta = args.sigma * torch.randn(batch, 1, d, generator=gen, dtype=x.dtype)
        xs = torch.cat([x[None] + delta, x[None] - delta]).reshape(-1, d)  # (2 B N, d)
        with torch.enable_grad():
            xs.requires_grad_(True)
            g = torch.autograd.grad(model(xs).sum(), xs)[0]
        probes = 2.0 * torch.randint(0, 2, (args.ref_probes, d), generator=gen) - 1
        dirs = Directions(d, dense=probes.to(x.dtype))
        with torch.no_grad():
            d2 = model.jets(xs.detach(), dirs, 2)[2].reshape(-1, 2 * batch, n)
            d2_x = model.jets(x, dirs, 2)[2]  # (J, N)
        g_means.append(g.reshape(2 * batch, n, d).mean(0))
        lap_means.append((d2 - d2_x[:, None, :]).mean(dim=(0, 1)))
        print(f"  reference batch {len(g_means)}", end="\r", flush=True)
    lap = torch.stack(lap_means)
    return {
        "grad": torch.stack(g_means).mean(0),
        "laplacian": lap_x + lap.mean(0),
        "laplacian_se": lap.std(0) / math.sqrt(lap.shape[0]),
    }


@torch.no_grad()
def per_direction_terms(
    model: ModelFunction, x: torch.Tensor, args: argparse.Namespace, gen: torch.Generator
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """One stream of K_max Gaussian directions: per-direction gradient and Laplacian terms."""
    d, n, dtype = args.dim, x.shape[0], x.dtype
    f0 = model(x)
    xi_all = torch.empty(args.kmax, d, dtype=torch.float32)
    names = [f"stein-{v}" for v in VARIANTS] + ["fd-gaussian", "taylor-gaussian"]
    terms = {
        k: (torch.empty(args.kmax, n, dtype=dtype), torch.empty(args.kmax, n, dtype=dtype))
        for k in names
    }
    steps = {1: default_step(dtype, 1), 2: default_step(dtype, 2)}
    start = time.time()
    for lo in range(0, args.kmax, args.chunk):
        hi = min(lo + args.chunk, args.kmax)
        xi = torch.randn(hi - lo, d, generator=gen, dtype=dtype)
        xi_all[lo:hi] = xi.float()
        dirs = Directions(d, dense=xi)
        with model.shared_first_layer():
            f_plus, f_minus = stein_samples(model, x, dirs, args.sigma, antithetic=True)
            for variant in VARIANTS:
                a, lap = stein_terms(
                    f_plus,
                    f_minus if variant == "antithetic" else None,
                    f0,
                    (xi * xi).sum(1),
                    args.sigma,
                    d,
                    variant,
                )
                terms[f"stein-{variant}"][0][lo:hi] = a
                terms[f"stein-{variant}"][1][lo:hi] = lap
            _, fd = central_differences(model, x, dirs, steps, f0)
            terms["fd-gaussian"][0][lo:hi], terms["fd-gaussian"][1][lo:hi] = fd[1], fd[2]
            jets = model.jets(x, dirs, 2)
            terms["taylor-gaussian"][0][lo:hi], terms["taylor-gaussian"][1][lo:hi] = (
                jets[1],
                jets[2],
            )
        print(f"  directions {hi}/{args.kmax} ({time.time() - start:.0f} s)", flush=True)
    return xi_all, terms


def k_values(kmax: int) -> list[int]:
    out, k = [], 8
    while k <= kmax:
        out.append(k)
        k *= 2
    return out


def block_errors(
    a: torch.Tensor,
    lap: torch.Tensor,
    xi: torch.Tensor,
    k: int,
    blocks: int,
    g_ref: torch.Tensor,
    lap_ref: torch.Tensor,
) -> tuple[float, float, int]:
    """Mean L1 errors over ``blocks`` disjoint blocks of ``k`` directions."""
    nb = min(blocks, a.shape[0] // k)
    ge, le = [], []
    for b in range(nb):
        sl = slice(b * k, (b + 1) * k)
        g = a[sl].T.float() @ xi[sl] / k
        ge.append((g.double() - g_ref).abs().mean().item())
        le.append((lap[sl].mean(0) - lap_ref).abs().mean().item())
    return sum(ge) / nb, sum(le) / nb, nb


def coordinate_errors(
    g_x: torch.Tensor, d2_x: torch.Tensor, k: int, blocks: int, gen: torch.Generator
) -> tuple[float, float, int]:
    """Sparse coordinate estimator from exact per-coordinate derivatives at x."""
    d = d2_x.shape[0]
    lap_ref = d2_x.sum(0)
    ge, le = [], []
    for _ in range(blocks):
        j = torch.randperm(d, generator=gen)[:k]
        g = torch.zeros_like(g_x)
        g[:, j] = g_x[:, j] * (d / k)
        ge.append((g - g_x).abs().mean().item())
        le.append((d2_x[j].sum(0) * (d / k) - lap_ref).abs().mean().item())
    return sum(ge) / blocks, sum(le) / blocks, blocks


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    record = script_provenance(__file__, argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    try:
        return ablation(args, record, out)
    finally:
        torch.set_num_threads(threads)  # build_run applied the run's threads=


def ablation(args: argparse.Namespace, record: dict, out: Path) -> list[dict]:
    """Measure with parsed ``args`` and write the results; returns the rows.

    Sets ``args.dim``, ``args.sigma`` and ``args.seed`` from the built run (the network's
    inputs, the packaged Stein noise level, the problem's ``pde.seed``: the top-level
    ``seed``), which seed the points, the reference and the directions.
    """
    run = build_run(args.network)
    dtype = cast_run(run)  # only the network is used (the packaged method=adam: no hooks)
    net = run.problem.net
    problem = run.problem
    args.dim, args.sigma, args.seed = problem.dim, problem.estimator.sigma, problem.seed
    for p in net.parameters():
        p.requires_grad_(False)
    model = ModelFunction(net)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.rand(args.points, args.dim, generator=gen, dtype=dtype)

    t0 = time.time()
    print(f"reference: exact plain derivatives, d={args.dim}, N={args.points}", flush=True)
    with torch.no_grad():
        g_x, d2_x = exact_plain(model, x, args.dim)
    lap_x = d2_x.sum(0)
    print(f"reference: smoothed model, {args.ref_samples} antithetic pairs", flush=True)
    ref = smoothed_reference(model, x, lap_x, args, torch.Generator().manual_seed(args.seed + 2))
    t_ref = time.time() - t0
    print(f"per-direction terms, K_max={args.kmax}", flush=True)
    t0 = time.time()
    xi, terms = per_direction_terms(model, x, args, torch.Generator().manual_seed(args.seed + 3))
    t_terms = time.time() - t0

    rows = []
    for name, (a, lap) in terms.items():
        smooth = name.startswith("stein")
        g_ref = ref["grad"] if smooth else g_x
        l_ref = ref["laplacian"] if smooth else lap_x
        for k in k_values(args.kmax):
            ge, le, nb = block_errors(a, lap, xi, k, args.blocks, g_ref, l_ref)
            rows.append({"estimator": name, "K": k, "blocks": nb, "grad_l1": ge, "lap_l1": le})
    cgen = torch.Generator().manual_seed(args.seed + 4)
    for k in [k for k in k_values(args.kmax) if k <= args.dim] + [args.dim]:
        ge, le, nb = coordinate_errors(g_x, d2_x, k, args.blocks, cgen)
        rows.append(
            {"estimator": "taylor-coordinate", "K": k, "blocks": nb, "grad_l1": ge, "lap_l1": le}
        )
    scale = {
        "grad_smoothed": ref["grad"].abs().mean().item(),
        "lap_smoothed": ref["laplacian"].abs().mean().item(),
        "grad_plain": g_x.abs().mean().item(),
        "lap_plain": lap_x.abs().mean().item(),
    }
    for r in rows:
        smooth = r["estimator"].startswith("stein")
        r["grad_rel"] = r["grad_l1"] / scale["grad_smoothed" if smooth else "grad_plain"]
        r["lap_rel"] = r["lap_l1"] / scale["lap_smoothed" if smooth else "lap_plain"]
    for r in rows:
        r["overrides"] = row_overrides(args.network, r["estimator"], r["K"])
        r["sdze_train_command"] = shlex.join(["sdze-train", *r["overrides"]])
    meta = {
        **record,
        "args": vars(args),
        "torch": torch.__version__,
        "scale_mean_abs": scale,
        "reference_laplacian_se_mean": ref["laplacian_se"].mean().item(),
        "smoothing_bias_laplacian_l1": (ref["laplacian"] - lap_x).abs().mean().item(),
        "smoothing_bias_grad_l1": (ref["grad"] - g_x).abs().mean().item(),
        "seconds_reference": t_ref,
        "seconds_terms": t_terms,
    }
    stem = "stein_ablation_smoke" if args.smoke else "stein_ablation"
    write_csv(out / f"{stem}.csv", rows)
    (out / f"{stem}.json").write_text(
        json.dumps({"meta": finish_provenance(meta), "rows": rows}, indent=1))
    print(json.dumps(meta, indent=1, default=str))
    print(f"{'estimator':18s} {'K':>6s} {'grad L1':>10s} {'lap L1':>10s} {'lap rel':>9s}")
    for r in rows:
        print(
            f"{r['estimator']:18s} {r['K']:6d} {r['grad_l1']:10.3e} {r['lap_l1']:10.3e} "
            f"{r['lap_rel']:9.2e}"
        )
    if not args.smoke:
        plot(rows, out / f"{stem}.png", args.dim)
    return rows


def plot(rows: list[dict], path: Path, dim: int) -> None:
    """Log-log error curves (the exact K = d coordinate point is left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["estimator"] for r in rows):
        rs = [
            r
            for r in rows
            if r["estimator"] == name and not (name.endswith("coordinate") and r["K"] >= dim)
        ]
        for ax, key in zip(axes, ("grad_l1", "lap_l1"), strict=True):
            ax.loglog([r["K"] for r in rs], [r[key] for r in rs], "o-", label=name, ms=3)
    for ax, title in zip(axes, ("gradient L1 error", "Laplacian L1 error"), strict=True):
        ax.set_xlabel("K (directions)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
