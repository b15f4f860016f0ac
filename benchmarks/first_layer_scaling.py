"""Cost of a forward-only Laplacian estimate against one forward pass, d = 1e3 .. 1e6.

At a fixed number of directions K and batch N, a forward-only Laplacian
estimate through the first-layer shortcut costs one product ``W x`` for the
batch (as a plain forward pass does) plus a remainder that does not grow with d
for coordinate directions (``W e_j`` is a column lookup) and grows like
``K * d`` (not ``K * N * d``) for dense directions (``W v`` once per direction).
The ratio ``time(estimate) / time(forward)`` should therefore not grow with d.

Measured under ``torch.no_grad()`` (the zeroth-order setting), float32, one intra-op thread
by default (``threads=1``: stabler on a shared CPU), median of ``--reps`` interleaved
repetitions after one warm-up call.

Built from the packaged configs: per d, the network and the batch (the step-0 interior
points) of ``_common.build_run`` on two-body Allen-Cahn (``pde=allen_cahn_twobody
pde.dim=<d>``), and each estimator instantiated from the composed ``estimator`` group:
``fd`` and ``taylor`` (coordinate directions), ``fd`` with
``estimator.distribution=rademacher``, ``stein`` (antithetic, Gaussian directions,
necessarily dense); N and K are the configs' ``pde.n_interior`` and
``estimator.num_directions``. Positional arguments are further overrides for every row
(e.g. ``model.width=64``). Each row records its overrides and ``sdze-train`` command
(``sdze_train_command``); the results file's ``meta`` records the run's provenance (date,
commit, machine, load at start and end, threads, the command line). Results:
``results/first_layer_scaling.{csv,json}``.

    python benchmarks/first_layer_scaling.py           # d = 1e3, 1e4, 1e5, 1e6
    python benchmarks/first_layer_scaling.py --smoke   # seconds
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import time
from pathlib import Path

import torch
from _common import (
    SMOKE_OVERRIDES,
    build_run,
    compose_overrides,
    finish_provenance,
    merge_overrides,
    script_provenance,
    write_csv,
)
from hydra.utils import instantiate

from sdze_lightning.model_fn import ModelFunction

RESULTS = Path(__file__).resolve().parent / "results"

#: The estimators compared, by (name, distribution): their ``estimator`` overrides.
ESTIMATORS: dict[tuple[str, str], list[str]] = {
    ("fd", "coordinate"): ["estimator=fd"],
    ("taylor", "coordinate"): ["estimator=taylor"],
    ("fd", "rademacher"): ["estimator=fd", "estimator.distribution=rademacher"],
    ("stein", "gaussian"): ["estimator=stein"],
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", help="further overrides for every row")
    p.add_argument("--dims", type=int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--threads", default="1", help="threads= (a count or auto)")
    p.add_argument("--out", type=str, default=str(RESULTS))
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    args = p.parse_args(argv)
    args.extra = merge_overrides([f"threads={args.threads}"], args.overrides)
    if args.smoke:
        args.extra = merge_overrides(args.extra, SMOKE_OVERRIDES)
        args.dims, args.reps = [100, 1000], 2
    return args


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def row_overrides(d: int, estimator: tuple[str, str], extra: list[str]) -> list[str]:
    """The ``sdze-train`` overrides of one row: two-body Allen-Cahn at ``d``, the estimator."""
    return merge_overrides(["pde=allen_cahn_twobody", f"pde.dim={d}", *ESTIMATORS[estimator]],
                           extra)


@torch.no_grad()
def measure(d: int, args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    first = next(iter(ESTIMATORS))
    run = build_run(row_overrides(d, first, args.extra), device=args.device)
    model = ModelFunction(run.problem.net)
    x = run.problem.points(0, 0)
    n = x.shape[0]
    ops = ("laplacian",)

    def forward() -> None:
        model(x)

    calls = {("forward", "-"): forward}
    overrides, ests = {}, {}
    for key in ESTIMATORS:
        overrides[key] = row_overrides(d, key, args.extra)
        ests[key] = est = instantiate(compose_overrides(overrides[key]).estimator)
        calls[key] = lambda est=est: est.estimate(
            model, x, ops, torch.Generator(device=device).manual_seed(1), d
        )
    times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for fn in calls.values():
        fn()  # warm-up
    for _ in range(args.reps):
        for key, fn in calls.items():
            times[key].append(timed(fn, device))
    t_fwd = statistics.median(times[("forward", "-")])
    rows = []
    for (name, dist), ts in times.items():
        if name == "forward":
            continue
        t = statistics.median(ts)
        rows.append(
            {
                "d": d,
                "estimator": name,
                "distribution": dist,
                "K": ests[(name, dist)].num_directions,
                "N": n,
                "forward_ms": 1e3 * t_fwd,
                "estimate_ms": 1e3 * t,
                "ratio": t / t_fwd,
                "threads": run.threads,
                "overrides": overrides[(name, dist)],
                "sdze_train_command": shlex.join(["sdze-train", *overrides[(name, dist)]]),
            }
        )
        print(
            f"d={d:>8d} {name:6s} {dist:10s} forward {1e3 * t_fwd:8.2f} ms  "
            f"estimate {1e3 * t:8.2f} ms  ratio {t / t_fwd:6.2f}",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    record = script_provenance(__file__, argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    rows = []
    try:
        for d in args.dims:
            rows.extend(measure(d, args))
    finally:
        torch.set_num_threads(threads)  # build_run applied the runs' threads=
    stem = "first_layer_scaling_smoke" if args.smoke else "first_layer_scaling"
    write_csv(out / f"{stem}.csv", rows)
    meta = finish_provenance({**record, "args": vars(args), "torch": torch.__version__})
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
