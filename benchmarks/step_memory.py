"""Peak memory of one training step: SDZE vs Adam+HTE.

Two-body Allen-Cahn on the unit ball (hard constraint), MLP 4x128 tanh, 100
collocation points, 16 estimator directions, d = 1e3, 1e4, 1e5, float32.
Every configuration runs in a fresh subprocess:

1. warm-up: the same configuration at d = 64 (loads kernels and allocator
   pools), then the baseline ``VmRSS``;
2. build the problem, network and optimizer, reset the peak (``VmHWM`` via
   ``/proc/self/clear_refs``) and run two steps through ``PINNProblem.run_step``,
   the entry point ``training_step`` calls (SDZE: forward-only evaluations under
   the first-layer cache; Adam: one backward pass); ``peak = VmHWM - baseline``
   (parameters, optimizer state, the batch and every transient);
3. attribution in the same process: the transient peak of sampling the batch
   alone and of the analytic source term alone, and a "method only" step with
   the batch and its source precomputed (resident, so still counted), and for
   SDZE the transient of the fold ``W += A M B^T`` (once per period).

Freed heap memory is handed back (``malloc_trim``) before each baseline, so the
figures are peaks of live memory, not of glibc's cache. Timings are not the
point here (and are noisy on a shared machine).

Every configuration is built from the packaged configs (``_common.build_run``):
``adam-hte`` is ``method=adam estimator=hte``, ``sdze`` and ``mezo`` use ``estimator=taylor``
(:data:`STUDY_METHODS`); the flags become ``sdze-train`` overrides (``--points``:
``pde.n_interior=``, ``--directions``: ``estimator.num_directions=``, ``--width`` /
``--depth``: ``model.width=`` / ``model.depth=``, ``--rank``: SDZE's ``method.rank=``,
``--threads``: ``threads=``; ``--smoke``: the tiny ``SMOKE_OVERRIDES``), everything else,
the learning rates included, is the configs' default, and ``on_fit_start``'s output fit runs
before the measured steps, as in ``sdze-train``. Every row records its overrides and the
``sdze-train`` command that builds the same run (``sdze_train_command``); the results file
starts with the run's provenance (date, commit, machine, load at start and end, threads,
the command line).

Target: SDZE peak <= 1.3 x (parameter bytes + batch input bytes),
and >= 5x below Adam+HTE at d = 1e5. Results: ``results/step_memory.{csv,json}``.

    python benchmarks/step_memory.py                     # d = 1e3, 1e4, 1e5
    python benchmarks/step_memory.py --dims 1000 --methods sdze
    python benchmarks/step_memory.py --smoke             # in-process, d = 200 (numbers meaningless)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path

from _common import (  # noqa: E402
    RESULTS,
    SMOKE_OVERRIDES,
    build_run,
    finish_provenance,
    peak,
    provenance,
    reset_peak,
    rss,
    run_overrides,
    warm_fused_kernels,
    write_csv,
)

#: The study's method names and the ``_common.METHODS`` key each is built from.
STUDY_METHODS: dict[str, str] = {"sdze": "sdze", "mezo": "mezo", "adam-hte": "adam+hte"}
METHODS = tuple(STUDY_METHODS)


def method_run_overrides(method: str, dim: int, overrides: list[str],
                         rank: int | None = None) -> list[str]:
    """The ``sdze-train`` overrides of ``method`` (a :data:`METHODS` name) at ``dim``.

    ``rank`` (``method.rank=``) applies to SDZE only; ``None`` keeps the config's.
    """
    extra = list(overrides)
    if method == "sdze" and rank is not None:
        extra.append(f"method.rank={rank}")
    return run_overrides(STUDY_METHODS[method], dim, *extra)


def measure(method: str, dim: int, overrides: list[str], rank: int | None = None) -> dict:
    """Peak-RSS measurement of one configuration in the current process."""
    from sdze_lightning.seeding import Stream

    warm = build_run(method_run_overrides(method, 64, overrides, rank))
    warm.fit_output()
    for k in range(2):
        warm.step(k)
    del warm
    warm_fused_kernels()
    reset_peak()
    base = rss()

    run = build_run(method_run_overrides(method, dim, overrides, rank))
    problem, opt = run.problem, run.optimizer
    run.fit_output()  # on_fit_start's, before the first step (its transients not counted)
    param_bytes = sum(p.numel() * p.element_size() for p in problem.net.parameters())
    points = problem.n_interior
    batch_bytes = points * dim * 4
    reset_peak()
    t0 = time.perf_counter()
    losses = [run.step(k) for k in range(2)]
    seconds = (time.perf_counter() - t0) / 2
    step_peak = peak() - base

    gen = problem.generator(7, 0, stream=Stream.INTERIOR)
    reset_peak()
    before = rss()
    x = problem.sample_interior(points, gen)
    sampling = peak() - before
    reset_peak()
    before = rss()
    f = problem.source(x)
    source = peak() - before

    # method only: batch and source precomputed (resident), so only the step's own transients
    problem.collocation.points = lambda step, key: x
    problem.source = lambda pts: f
    reset_peak()
    run.step(2)
    method_only = peak() - base
    fold = getattr(opt, "fold", None)
    fold_transient = 0
    if fold is not None:
        reset_peak()
        before = rss()
        fold()
        fold_transient = peak() - before
    return dict(
        method=method, dim=dim, overrides=run.overrides, sdze_train_command=run.command,
        threads=run.threads, param_bytes=param_bytes, batch_bytes=batch_bytes,
        peak_bytes=step_peak, ratio_to_params_batch=step_peak / (param_bytes + batch_bytes),
        sampling_transient_bytes=sampling, source_transient_bytes=source,
        method_only_peak_bytes=method_only,
        method_only_ratio=method_only / (param_bytes + batch_bytes),
        fold_transient_bytes=fold_transient,
        state_elements=getattr(opt, "state_size", lambda: None)(),
        seconds_per_step=seconds, skipped_steps=problem.skipped_steps, losses=losses,
    )


def shared_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides of every configuration (the flags, or the smoke setup), ``--rank`` aside."""
    if args.smoke:
        return list(SMOKE_OVERRIDES)
    out = [f"threads={args.threads}"]
    for flag, key in (("points", "pde.n_interior"), ("directions", "estimator.num_directions"),
                      ("width", "model.width"), ("depth", "model.depth")):
        if getattr(args, flag) is not None:
            out.append(f"{key}={getattr(args, flag)}")
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    """Run every configuration (each in a fresh subprocess unless ``--smoke``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--points", type=int, default=None,
                    help="pde.n_interior= (default: the packaged config's, 100)")
    ap.add_argument("--directions", type=int, default=None,
                    help="estimator.num_directions= (default: the config's, 16)")
    ap.add_argument("--width", type=int, default=None, help="model.width= (default: 128)")
    ap.add_argument("--depth", type=int, default=None, help="model.depth= (default: 4)")
    ap.add_argument("--rank", type=int, default=None,
                    help="SDZE's method.rank= (default: the config's, 4)")
    ap.add_argument("--threads", default="2", help="threads= (a count or auto)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true", help="in-process, d=200 (numbers meaningless)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(measure(job["method"], job["dim"], job["overrides"], job["rank"])))
        return []
    record = provenance(None if argv is None else [f"benchmarks/{Path(__file__).name}", *argv])
    overrides = shared_overrides(args)
    if args.smoke:
        args.dims = [200]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = time.perf_counter()
    for dim in args.dims:
        for method in args.methods:
            if args.smoke:
                row = measure(method, dim, overrides, args.rank)
            else:
                job = json.dumps(dict(method=method, dim=dim, overrides=overrides,
                                      rank=args.rank))
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", job], capture_output=True, text=True,
                    check=False,
                )
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    raise RuntimeError(f"worker failed for {method} d={dim}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            mb = 2**20
            print(
                f"[{time.perf_counter() - t0:6.1f}s] d={dim:>7} {method:9s} "
                f"peak={row['peak_bytes'] / mb:8.1f} MiB  params+batch="
                f"{(row['param_bytes'] + row['batch_bytes']) / mb:7.1f} MiB  "
                f"ratio={row['ratio_to_params_batch']:.2f}  method-only ratio="
                f"{row['method_only_ratio']:.2f}  sampling="
                f"{row['sampling_transient_bytes'] / mb:.1f} source="
                f"{row['source_transient_bytes'] / mb:.1f} MiB  "
                f"{row['seconds_per_step']:.2f} s/step",
                flush=True,
            )
    for dim in args.dims:
        by = {r["method"]: r for r in rows if r["dim"] == dim}
        if "sdze" in by and "adam-hte" in by:
            print(f"d={dim}: Adam+HTE / SDZE peak = "
                  f"{by['adam-hte']['peak_bytes'] / max(by['sdze']['peak_bytes'], 1):.2f}")
    stem = "step_memory_smoke" if args.smoke else "step_memory"
    fields = [k for k in rows[0] if k not in ("losses", "overrides")]
    write_csv(args.out / f"{stem}.csv", rows, fields)
    (args.out / f"{stem}.json").write_text(json.dumps(finish_provenance(
        dict(record, overrides=overrides, rank=args.rank, rows=rows)), indent=2))
    return rows


if __name__ == "__main__":
    main()
