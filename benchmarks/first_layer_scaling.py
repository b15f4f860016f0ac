"""Cost of a forward-only Laplacian estimate against one forward pass, d = 1e3 .. 1e6.

At a fixed number of directions K and batch N, a forward-only Laplacian
estimate through the first-layer shortcut costs one product ``W x`` for the
batch (as a plain forward pass does) plus a remainder that does not grow with d
for coordinate directions (``W e_j`` is a column lookup) and grows like
``K * d`` (not ``K * N * d``) for dense directions (``W v`` once per direction).
The ratio ``time(estimate) / time(forward)`` should therefore not grow with d.

Measured under ``torch.no_grad()`` (the zeroth-order setting), float32, MLP
tanh, one intra-op thread by default (stabler on a shared CPU), median of
``--reps`` interleaved repetitions after one warm-up call.
Estimators: ``fd`` and ``taylor`` with coordinate directions, ``fd`` with
Rademacher directions, ``stein`` (antithetic, Gaussian directions, necessarily
dense). Results: ``results/first_layer_scaling.{csv,json}``.

    python benchmarks/first_layer_scaling.py           # d = 1e3, 1e4, 1e5, 1e6
    python benchmarks/first_layer_scaling.py --smoke   # seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _common import write_csv

from sdze_lightning.estimators.base import Estimator
from sdze_lightning.estimators.fd import FiniteDifferenceEstimator
from sdze_lightning.estimators.stein import SteinEstimator
from sdze_lightning.estimators.taylor import TaylorEstimator
from sdze_lightning.model_fn import ModelFunction
from sdze_lightning.nn import MLP

RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000])
    p.add_argument("--points", type=int, default=64, help="batch N")
    p.add_argument("--directions", type=int, default=16, help="K")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    p.add_argument("--out", type=str, default=str(RESULTS))
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.dims, args.points, args.directions, args.width, args.reps = [100, 1000], 8, 4, 16, 2
    return args


def estimators(k: int) -> dict[tuple[str, str], Estimator]:
    return {
        ("fd", "coordinate"): FiniteDifferenceEstimator(k, "coordinate"),
        ("taylor", "coordinate"): TaylorEstimator(k, "coordinate"),
        ("fd", "rademacher"): FiniteDifferenceEstimator(k, "rademacher"),
        ("stein", "gaussian"): SteinEstimator(k, sigma=0.1, variant="antithetic"),
    }


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def measure(d: int, args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    net = MLP(d, width=args.width, depth=args.depth, seed=0).to(device)
    model = ModelFunction(net)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.points, d, generator=gen, device=device) / d**0.5
    ests = estimators(args.directions)
    ops = ("laplacian",)

    def forward() -> None:
        model(x)

    calls = {("forward", "-"): forward}
    for key, est in ests.items():
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
                "K": args.directions,
                "N": args.points,
                "forward_ms": 1e3 * t_fwd,
                "estimate_ms": 1e3 * t,
                "ratio": t / t_fwd,
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
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for d in args.dims:
        rows.extend(measure(d, args))
    stem = "first_layer_scaling_smoke" if args.smoke else "first_layer_scaling"
    write_csv(out / f"{stem}.csv", rows)
    meta = {"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
