"""The fused two-body source kernel against the eager code: CPU time and agreement.

The two-body problems' source term (``psi``, ``Delta psi``, ``x . grad psi`` of
:func:`sdze_lightning.problems.twobody.two_body_terms`) is the largest per-step pass over
the ``N x d`` batch that is not the network's. With ``fused_kernels=true`` (the default)
it runs as one ``torch.compile`` kernel; this script times it both ways on the same batch
in one process, one thread: the median CPU time of ``--repeats`` calls after a warm-up
(CPU time, so other processes' load does not inflate it), and the largest difference of
the results relative to their largest magnitude (the two sum in another order).
Runtime: ~1 min plus the one-time compilation::

    python benchmarks/fused_kernels.py --dims 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import RESULTS, finish_provenance, load_average, median_time, script_provenance

from sdze_lightning.problems.ball import coefficients
from sdze_lightning.problems.twobody import two_body_terms


def cpu_time(fn, repeats: int) -> float:
    """Median CPU time of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    return median_time(fn, repeats, time.process_time)


def measure(dim: int, points: int, repeats: int) -> dict:
    """Eager and fused source terms at one dimension: seconds and agreement."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(points, dim, generator=gen) / dim**0.5
    c = coefficients(dim - 1, 0)
    with torch.no_grad():
        eager = two_body_terms(x, c, fused=False)
        fused = two_body_terms(x, c, fused=True)
        row = {
            "dim": dim, "points": points,
            "eager_s": cpu_time(lambda: two_body_terms(x, c, fused=False), repeats),
            "fused_s": cpu_time(lambda: two_body_terms(x, c, fused=True), repeats),
            "max_rel_diff": max(float((a - b).abs().max() / b.abs().max())
                                for a, b in zip(eager, fused, strict=True)),
            "load": load_average(),
        }
    row["speedup"] = row["eager_s"] / row["fused_s"]
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure and write ``results/fused_kernels.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    record = script_provenance(__file__, argv)
    torch.set_num_threads(1)
    rows = []
    for dim in args.dims:
        rows.append(measure(dim, args.points, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    out = finish_provenance({**record, "threads": 1, "rows": rows})
    path = f"{args.out}/fused_kernels.json"
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
