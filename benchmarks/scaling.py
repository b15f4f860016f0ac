"""Per-step time and peak memory against the dimension d.

Two-body Allen-Cahn on the unit ball (hard constraint), MLP 4x128 tanh, 100
collocation points, 16 estimator directions, float32, for

* ``sdze``, ``mezo``: forward-only, ``taylor`` estimator on coordinate directions;
* ``adam+hte``, ``adam+sdgd``, ``adam+taylor``, ``adam+stein``, ``adam+exact``:
  back-propagation baselines.

Every (method, d) runs in a fresh subprocess (so peak RSS is its own) under an
address-space cap (``--mem-cap-gb``, out of memory = ``MemoryError``) and a
wall-clock cap (``--cap`` seconds per step; a configuration whose step is
predicted, from the previous d and linear growth, to exceed it is skipped and
marked ``past cap``). In each worker:

1. warm-up at d = 64, ``malloc_trim``, baseline RSS;
2. build the method at d, reset the peak (``VmHWM``), run one step: ``peak``
   = VmHWM - baseline (parameters, optimizer state, batch, every transient);
3. build an SDZE reference on the same d in the same process and time steps of
   the method and of SDZE interleaved (median of each): ``ratio_to_sdze`` is
   a ratio measured inside one process, the figure to trust on a loaded machine;
4. time one plain forward pass ``net(x)`` of the batch (no grad) and the sampling
   of the batch: the target "SDZE step <= 3x one forward pass" at d = 1e6.

``--huge-pages`` starts the workers with ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch
puts CPU tensors of 2 MiB and more on transparent huge pages: fewer page faults
for the fresh ``N x d`` batch of every step, same results; every method gets it).
``--prefetch`` builds every problem with ``prefetch=True``: the next step's batch is
sampled on a background thread while the step runs, and its source is split between
that thread and the main one (same numbers; one more batch in memory, which the peak
includes; ``prefetch_share`` is the share of source rows left to the background thread).

``--device cuda`` runs the same on a GPU: the steps are timed with
``torch.cuda.synchronize()`` around them, ``peak`` is the CUDA peak allocated memory
(``torch.cuda.max_memory_allocated``) above what was allocated before the build,
no address-space cap is set (CUDA maps far more virtual memory than it uses), and
running out of GPU memory becomes an ``OOM (CUDA)`` row; results go to
``scaling_cuda.*``. ``--threads`` (``threads=``) leaves the host's threads alone there,
as ``sdze-train`` does off the CPU; ``--prefetch`` is refused there (the prefetch
thread's kernels share the step's CUDA stream, so per-step times would mix the two).

Every run is built from the packaged configs (``_common.build_run``) with
``run_overrides(method, d, ...)``: ``--threads`` becomes ``threads=``, ``--prefetch``
``prefetch=true``, ``--smoke`` adds the tiny ``SMOKE_OVERRIDES``; everything else, the
learning rates included, is the configs' default, and ``on_fit_start``'s output fit runs
before the first step, as in ``sdze-train``. A worker receives its override list; every row
records its overrides and the ``sdze-train`` command that builds the same run
(``sdze_train_command``), and the results file starts with the run's provenance (date,
commit, machine, load at start and end, threads, the command line).

Slopes: least-squares slope of log(time) and log(peak) against log(d) over
d >= 1e3 (at smaller d the dimension-free remainder dominates).

    python benchmarks/scaling.py                       # d = 1e2..1e5 all, 1e6 SDZE
    python benchmarks/scaling.py --dims 100 1000 --methods sdze adam+hte
    python benchmarks/scaling.py --smoke               # in-process, tiny (numbers meaningless)
    python benchmarks/scaling.py --device cuda --sdze-dims 1000000 10000000   # on a GPU

Results: ``results/scaling.{csv,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    MACHINE,
    METHODS,
    RESULTS,
    SMOKE_OVERRIDES,
    add_prefetch_flag,
    build_run,
    finish_provenance,
    forward_pass,
    limit_memory,
    load_average,
    machine,
    overrides_for_method,
    peak,
    provenance,
    reset_peak,
    rss,
    run_overrides,
    sync,
    warm_fused_kernels,
    write_csv,
)

MiB = 2**20


def _on_cuda(device: str) -> bool:
    return device.startswith("cuda")


def _reset_peak(device: str) -> int:
    """Reset the peak counter of ``device``; returns the memory in use now (bytes)."""
    if _on_cuda(device):
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    reset_peak()
    return rss()


def _peak(device: str) -> int:
    """Peak memory of ``device`` since :func:`_reset_peak` (CUDA allocated, or RSS)."""
    if _on_cuda(device):
        sync(device)
        return torch.cuda.max_memory_allocated(device)
    return peak()


def _timed_step(run, k: int, device: str) -> tuple[float, float]:
    """``(loss, seconds)`` of training step ``k`` of ``run``, the device's queue drained at
    both ends."""
    sync(device)
    t0 = time.perf_counter()
    loss = run.step(k)  # float(loss) also waits for the device
    sync(device)
    return loss, time.perf_counter() - t0


def method_run_overrides(method: str, dim: int, overrides: list[str]) -> list[str]:
    """``run_overrides(method, dim, ...)`` with the shared ``overrides`` that ``method``'s
    estimator takes (``adam+exact`` has no ``estimator.num_directions``)."""
    return run_overrides(method, dim, *overrides_for_method(method, overrides))


def train_command(overrides: list[str]) -> str:
    """The ``sdze-train`` command line of ``overrides`` (``Run.command`` without a run)."""
    return shlex.join(["sdze-train", *overrides])


def measure(method: str, dim: int, overrides: list[str], device: str, cap: float,
            reps: int) -> dict:
    """Peak memory and interleaved step times of ``method`` vs SDZE at ``dim`` (this process).

    Every run is ``build_run(method_run_overrides(m, d, overrides), device=device)``.
    """
    for m in {method, "sdze"}:
        warm = build_run(method_run_overrides(m, 64, overrides), device=device)
        warm.fit_output()
        for k in range(2):
            warm.step(k)
        warm.problem.stop_prefetch()
        del warm
    warm_fused_kernels(device)
    base = _reset_peak(device)
    run = build_run(method_run_overrides(method, dim, overrides), device=device)
    problem = run.problem
    row = dict(method=method, dim=dim, status="ok", load=load_average(),
               prefetch=bool(problem.prefetch), device=device, threads=run.threads,
               overrides=run.overrides, sdze_train_command=run.command,
               memory=("CUDA peak allocated" if _on_cuda(device) else "peak RSS"))
    run.fit_output()  # on_fit_start's, before the first step (the peak below is the step's)
    row["params"] = sum(p.numel() for p in problem.net.parameters())
    row["param_bytes"] = row["params"] * 4
    row["batch_bytes"] = problem.n_interior * dim * 4
    _reset_peak(device)
    row["first_loss"], row["first_step_s"] = _timed_step(run, 0, device)
    row["peak_bytes"] = _peak(device) - base
    row["peak_ratio_params_batch"] = row["peak_bytes"] / (row["param_bytes"] + row["batch_bytes"])

    ref = None
    if method != "sdze":
        ref = build_run(method_run_overrides("sdze", dim, overrides), device=device)
        ref.fit_output()
        ref.step(0)
    times, ref_times = [], []
    t_start = time.perf_counter()
    for k in range(1, reps + 1):
        row["last_loss"], seconds = _timed_step(run, k, device)
        times.append(seconds)
        if ref is not None:
            ref_times.append(_timed_step(ref, k, device)[1])
        if time.perf_counter() - t_start > cap:
            break
    row["s_per_step"] = statistics.median(times)
    row["sdze_s_per_step"] = statistics.median(ref_times) if ref_times else row["s_per_step"]
    row["ratio_to_sdze"] = row["s_per_step"] / row["sdze_s_per_step"]
    row["steps_timed"] = len(times)
    row["skipped_steps"] = problem.skipped_steps  # non-finite steps (evaluated, not applied)
    # share of the source's rows the prefetch thread prepared at the end (PreparePlacement)
    row["prefetch_share"] = problem.collocation.placement.share if problem.prefetch else None
    problem.stop_prefetch()  # no background build during the forward timing below
    if ref is not None:
        ref.problem.stop_prefetch()
    fp = ref.problem if ref is not None else problem
    fwd = [forward_pass(fp, 100 + i) for i in range(2)]
    row["sample_s"] = min(f[0] for f in fwd)
    row["forward_s"] = min(f[1] for f in fwd)
    row["sdze_over_forward"] = row["sdze_s_per_step"] / row["forward_s"]
    row["sdze_over_sample_forward"] = row["sdze_s_per_step"] / (row["sample_s"] + row["forward_s"])
    return row


#: Worker environment of ``--huge-pages`` (read by PyTorch at its first allocation).
HUGE_PAGES_ENV = {"THP_MEM_ALLOC_ENABLE": "1"}


def run_worker(job: dict, mem_cap: int, cap: float, reps: int, timeout: float,
               huge_pages: bool = False) -> dict:
    """Run :func:`measure` in a fresh subprocess; OOM / timeout become status rows.

    ``job``: ``method``, ``dim``, ``overrides`` (the shared ones, without the method and
    the dimension) and ``device``. ``mem_cap`` (an address-space cap) applies to CPU jobs
    only.
    """
    job = dict(job, mem_cap=mem_cap, cap=cap, reps=reps)
    env = dict(os.environ, **HUGE_PAGES_ENV) if huge_pages else None
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)],
                              capture_output=True, text=True, timeout=timeout, check=False,
                              env=env)
    except subprocess.TimeoutExpired:
        return dict(method=job["method"], dim=job["dim"], status=f"timeout>{timeout:.0f}s")
    out = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and out:
        return dict(json.loads(out[-1]), huge_pages=huge_pages)
    err = proc.stderr
    if "CUDA out of memory" in err or "OutOfMemoryError" in err:
        status = "OOM (CUDA)"
    elif "MemoryError" in err or "DefaultCPUAllocator" in err or "not enough memory" in err:
        status = f"OOM (RLIMIT_AS {mem_cap / 2**30:.0f} GiB)"
    elif "memory is available" in err:
        status = "OOM (pre-flight)"
    elif "ValueError" in err:
        status = "refused (pre-flight)"
        print(err[-2000:], file=sys.stderr)
    else:
        status = f"error rc={proc.returncode}"
        print(err[-2000:], file=sys.stderr)
    return dict(method=job["method"], dim=job["dim"], status=status)


def fit_slope(rows: list[dict], key: str, min_dim: int = 1000) -> float | None:
    """Least-squares slope of ``log(key)`` against ``log(d)`` over ``d >= min_dim``."""
    pts = [(math.log(r["dim"]), math.log(r[key])) for r in rows
           if r.get("status") == "ok" and r["dim"] >= min_dim and r.get(key, 0) > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def markdown_table(rows: list[dict]) -> str:
    """Markdown table of the rows (d, method, s/step, x SDZE, peak, peak / (params + batch))."""
    out = ["| d | method | s/step | x SDZE (same process) | peak MiB | peak / (params+batch) "
           "| SDZE / forward |", "| --- | --- | --- | --- | --- | --- | --- |"]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(rows, key=lambda r: (r["dim"], order.get(r["method"], 99))):
        if r["status"] != "ok":
            out.append(f"| {r['dim']:.0e} | {r['method']} | {r['status']} | | | | |")
            continue
        out.append(f"| {r['dim']:.0e} | {r['method']} | {r['s_per_step']:.3g} | "
                   f"{r['ratio_to_sdze']:.2f} | {r['peak_bytes'] / MiB:.1f} | "
                   f"{r['peak_ratio_params_batch']:.2f} | {r['sdze_over_forward']:.1f} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path, where: str = MACHINE) -> None:
    """Log-log plots: s/step, peak memory and time ratio to SDZE against d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for method in METHODS:
        ok = sorted((r for r in rows if r["method"] == method and r["status"] == "ok"),
                    key=lambda r: r["dim"])
        if not ok:
            continue
        d = [r["dim"] for r in ok]
        axes[0].loglog(d, [r["s_per_step"] for r in ok], "o-", label=method)
        axes[1].loglog(d, [max(r["peak_bytes"], 1) / MiB for r in ok], "o-", label=method)
        axes[2].loglog(d, [r["ratio_to_sdze"] for r in ok], "o-", label=method)
    sd = sorted((r for r in rows if r["method"] == "sdze" and r["status"] == "ok"),
                key=lambda r: r["dim"])
    if sd:
        axes[1].loglog([r["dim"] for r in sd],
                       [(r["param_bytes"] + r["batch_bytes"]) / MiB for r in sd], "k:",
                       label="params + batch")
    for ax, title in zip(axes, ("s / step (absolute)", "peak memory of a step (MiB)",
                                "step time / SDZE step time (same process)"), strict=True):
        ax.set_xlabel("d")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle("Two-body Allen-Cahn, MLP 4x128 tanh, 100 points, 16 directions; " + where)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the study (each configuration in a fresh subprocess unless ``--smoke``)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[100, 1000, 10000, 100000])
    ap.add_argument("--sdze-dims", type=int, nargs="*", default=[1000000],
                    help="extra dims for sdze only")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--cap", type=float, default=60.0, help="seconds per step before skipping")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per configuration (max)")
    ap.add_argument("--mem-cap-gb", type=float, default=16.0)
    ap.add_argument("--threads", default="1",
                    help="threads= (a count or auto); 1: on a shared 2-core machine 2 threads "
                         "spin and slow down 10x")
    add_prefetch_flag(ap)
    ap.add_argument("--huge-pages", action="store_true",
                    help="workers with THP_MEM_ALLOC_ENABLE=1 (transparent huge pages)")
    ap.add_argument("--device", default="cpu",
                    help="cpu, or cuda[:N] (timed with synchronisation, CUDA peak memory)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true", help="in-process, tiny (numbers meaningless)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other rows of an earlier results file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    on_cuda = _on_cuda(args.device)
    if on_cuda and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available on this machine")
    if on_cuda and args.prefetch:
        ap.error("--prefetch with --device cuda: the prefetch thread queues its kernels on the "
                 "step's CUDA stream, so the per-step times would mix the two; measure without")
    if args.worker:
        job = json.loads(args.worker)
        if not _on_cuda(job["device"]):
            limit_memory(int(job["mem_cap"]))
        print(json.dumps(measure(job["method"], job["dim"], job["overrides"], job["device"],
                                 job["cap"], job["reps"])))
        return []
    record = provenance(None if argv is None else [f"benchmarks/{Path(__file__).name}", *argv])
    record["machine"] = machine(args.device)
    overrides = list(SMOKE_OVERRIDES) if args.smoke else [f"threads={args.threads}"]
    if args.prefetch:
        overrides.append("prefetch=true")
    if args.smoke:
        args.dims, args.sdze_dims, args.reps = [40, 80], [], 1
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(m, d) for d in args.dims for m in args.methods]
    jobs += [("sdze", d) for d in args.sdze_dims if "sdze" in args.methods]
    rows: list[dict] = []
    last: dict[str, dict] = {}
    t0 = time.perf_counter()
    for method, dim in jobs:
        prev = last.get(method)
        if prev is not None and prev["status"] != "ok":
            row = dict(method=method, dim=dim, status=f"skipped ({prev['status']} at smaller d)")
        elif prev is not None and prev["s_per_step"] * dim / prev["dim"] > args.cap:
            pred = prev["s_per_step"] * dim / prev["dim"]
            row = dict(method=method, dim=dim, status=f"past cap (predicted {pred:.0f} s/step)")
        elif args.smoke:
            row = measure(method, dim, overrides, args.device, args.cap, args.reps)
        else:
            job = dict(method=method, dim=dim, overrides=overrides, device=args.device)
            row = run_worker(job, int(args.mem_cap_gb * 2**30), args.cap, args.reps,
                             timeout=4 * args.cap + 120, huge_pages=args.huge_pages)
        # rows that did not run (skipped, OOM, timeout) record the run they stand for too
        row.setdefault("overrides", method_run_overrides(method, dim, overrides))
        row.setdefault("sdze_train_command", train_command(row["overrides"]))
        rows.append(row)
        last[method] = row
        if row["status"] == "ok":
            print(f"[{time.perf_counter() - t0:6.0f}s] d={dim:>8} {method:12s} "
                  f"{row['s_per_step']:8.3f} s/step  x{row['ratio_to_sdze']:7.2f} SDZE  "
                  f"peak {row['peak_bytes'] / MiB:9.1f} MiB "
                  f"(x{row['peak_ratio_params_batch']:.2f} params+batch)  "
                  f"SDZE/forward {row['sdze_over_forward']:.2f}  load {row['load']:.1f}",
                  flush=True)
        else:
            print(f"[{time.perf_counter() - t0:6.0f}s] d={dim:>8} {method:12s} {row['status']}",
                  flush=True)
    slopes = {m: dict(time=fit_slope([r for r in rows if r["method"] == m], "s_per_step"),
                      memory=fit_slope([r for r in rows if r["method"] == m], "peak_bytes"))
              for m in args.methods}
    for m, s in slopes.items():
        print(f"slope vs d (d >= 1e3) {m:12s} time {s['time']}  memory {s['memory']}")
    # GPU runs get their own files (never merged with, or written over, the CPU ones)
    stem = ("scaling_smoke" if args.smoke else "scaling") + ("_cuda" if on_cuda else "")
    merged_from = None
    if args.merge and (args.out / f"{stem}.json").exists():
        done = {(r["method"], r["dim"]) for r in rows}
        old_file = json.loads((args.out / f"{stem}.json").read_text())
        merged_from = {k: old_file.get(k) for k in ("date", "commit", "command")}
        rows = [r for r in old_file["rows"] if (r["method"], r["dim"]) not in done
                and r.get("device", "cpu") == args.device] + rows
        slopes = {m: dict(time=fit_slope([r for r in rows if r["method"] == m], "s_per_step"),
                          memory=fit_slope([r for r in rows if r["method"] == m], "peak_bytes"))
                  for m in METHODS}
    fields = sorted({k for r in rows for k in r if k != "overrides"},
                    key=lambda k: (k not in ("method", "dim"), k))
    write_csv(args.out / f"{stem}.csv", rows, fields)
    (args.out / f"{stem}.json").write_text(json.dumps(finish_provenance(dict(
        record, overrides=overrides, device=args.device, cap_s=args.cap,
        huge_pages=args.huge_pages, merged_rows_from=merged_from, rows=rows, slopes=slopes)),
        indent=2))
    plot(rows, args.out / f"{stem}.png", machine(args.device))
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
