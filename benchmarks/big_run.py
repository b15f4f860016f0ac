"""The 10-million-dimensional run on a 24 GB CPU machine.

SDZE (``taylor`` estimator, 16 coordinate directions, rank 4, Adam in the
subspace) trains two-body Allen-Cahn on the unit ball at d = 1e7 with the
shared setup (MLP 4x128 tanh, 100 fresh points per step, float32). Per step it
prints the loss, s/step and the resident memory; the summary records the
parameter count, the peak RSS of the process (``ru_maxrss``: everything,
including the d x 128 first layer and the 100 x d batch), the median s/step,
and whether the loss falls (mean of the first and the last tenth of the steps).

Then, with ``--baselines``, each back-propagation baseline (and MeZO) is tried
for one step at the same d in a fresh subprocess under an address-space cap
(``RLIMIT_AS``, ``--baseline-mem-gb``, lowered to the memory available minus
2 GiB so that the cap, not the kernel's OOM killer, stops it) and a wall-clock
cap: the status (ok / OOM and where / timeout) is recorded. The baselines run
after the SDZE run, never beside it.

    python benchmarks/big_run.py                          # d = 1e7, 200 steps
    python benchmarks/big_run.py --steps 20 --max-minutes 15 --baselines
    python benchmarks/big_run.py --smoke                  # tiny, in-process

Every run is built from the packaged configs (``_common.build_run``): the flags become
``sdze-train`` overrides (``--points``: ``pde.n_interior=``, ``--threads``: ``threads=``,
``--prefetch``: ``prefetch=true``, ``--lr``: SDZE's ``method.lr=``; ``--smoke``: the tiny
``SMOKE_OVERRIDES``), everything else is the configs' default, and ``on_fit_start``'s output
fit runs before the first step, as in ``sdze-train``. The SDZE record and every baseline row
hold their overrides and the ``sdze-train`` command that reproduces them
(``sdze_train_command``). A baseline that ``sdze-train``'s pre-flight refuses is a status row
too: ``OOM at build (pre-flight)`` where the run would not fit in the memory available,
``refused at build`` otherwise (e.g. ``estimator=exact`` past its ``max_reverse_passes``).
The results file starts with the run's provenance (date, commit, machine, load at start and
end, threads, the command line).

Results: ``results/big_run.{csv,json}`` (``big_run_smoke.*`` for the smoke mode).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra.errors import InstantiationException

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS,
    SMOKE_OVERRIDES,
    add_prefetch_flag,
    build_run,
    finish_provenance,
    limit_memory,
    load_average,
    overrides_for_method,
    peak_rss_total,
    provenance,
    rss,
    run_overrides,
    write_csv,
)

GiB = 2**30
BASELINES = ("adam+hte", "adam+sdgd", "adam+taylor", "adam+stein", "adam+exact", "mezo")


def mem_available() -> int:
    """``MemAvailable`` of the machine, bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


#: Step index of the fixed evaluation batch (never a training step's index).
EVAL_STEP = 10**9


def fixed_batch_loss(problem) -> float:
    """Loss on one fixed batch (points and estimator directions of :data:`EVAL_STEP`).

    The training losses are each on fresh points; at large d their spread across batches
    hides any trend, so whether training lowers the loss is read from this one.
    """
    with torch.no_grad(), problem.isolated_points():
        return float(problem.compute_loss(EVAL_STEP, 0))


def sdze_run(
    dim: int, steps: int, max_seconds: float, overrides: list[str], log_every: int = 1,
    eval_every: int = 0,
) -> dict:
    """Train SDZE at ``dim`` for ``steps`` steps (or until ``max_seconds``); per-step log.

    The run is ``build_run(run_overrides("sdze", dim, *overrides))``, its output fitted as
    ``on_fit_start`` fits it (``output_fit_s``, not part of the step times). With
    ``eval_every > 0`` the loss on a fixed batch is evaluated before the first step, every
    ``eval_every`` steps and after the last (excluded from the step times).
    """
    t0 = time.perf_counter()
    run = build_run(run_overrides("sdze", dim, *overrides))
    build_s = time.perf_counter() - t0
    problem = run.problem
    params = sum(p.numel() for p in problem.net.parameters())
    print(f"d={dim}: {params:,} parameters, built in {build_s:.1f} s, RSS {rss() / GiB:.2f} GiB "
          f"({run.command})", flush=True)
    t0 = time.perf_counter()
    run.fit_output()
    output_fit_s = time.perf_counter() - t0
    rows = []
    evals: list[tuple[int, float]] = []
    if eval_every:
        evals.append((0, fixed_batch_loss(problem)))
        print(f"fixed-batch loss before training {evals[-1][1]:.6g}", flush=True)
    t_run = time.perf_counter()
    try:
        for k in range(steps):
            t0 = time.perf_counter()
            loss = run.step(k)
            dt = time.perf_counter() - t0
            rows.append(dict(step=k, loss=loss, seconds=dt, rss_bytes=rss()))
            if k % log_every == 0 or k == steps - 1:
                print(f"step {k:4d}  loss {loss:.5g}  {dt:.2f} s/step  RSS {rss() / GiB:.2f} GiB  "
                      f"peak {peak_rss_total() / GiB:.2f} GiB  load {load_average():.1f}",
                      flush=True)
            stop = time.perf_counter() - t_run > max_seconds and k < steps - 1
            if eval_every and ((k + 1) % eval_every == 0 or k == steps - 1 or stop):
                t_eval = time.perf_counter()
                evals.append((k + 1, fixed_batch_loss(problem)))
                t_run += time.perf_counter() - t_eval
                print(f"fixed-batch loss after {k + 1} steps {evals[-1][1]:.6g}", flush=True)
            if stop:
                print(f"stopping after {k + 1} steps: --max-minutes reached", flush=True)
                break
    finally:
        problem.stop_prefetch()
    losses = [r["loss"] for r in rows]
    tenth = max(1, len(losses) // 10)
    first, last = statistics.mean(losses[:tenth]), statistics.mean(losses[-tenth:])
    return dict(
        dim=dim, overrides=run.overrides, sdze_train_command=run.command, threads=run.threads,
        prefetch=bool(problem.prefetch), params=params, param_bytes=params * 4,
        batch_bytes=problem.n_interior * dim * 4, steps_done=len(rows), steps_requested=steps,
        build_s=build_s, output_fit_s=output_fit_s,
        median_s_per_step=statistics.median(r["seconds"] for r in rows),
        skipped_steps=problem.skipped_steps,
        peak_rss_bytes=peak_rss_total(), loss_first_tenth=first, loss_last_tenth=last,
        loss_falls=last < first, rows=rows, fixed_batch_losses=evals,
        fixed_batch_loss_falls=(evals[-1][1] < evals[0][1]) if len(evals) > 1 else None,
    )


def _failure_status(err: Exception, stage: str) -> str:
    """The status of a baseline stopped by ``err`` at ``stage``.

    ``ValueError`` is a pre-flight refusal (``sdze-train`` refuses the run before training:
    not enough memory, too many reverse passes), also where Hydra wraps the constructor's.
    """
    msg = str(err)
    if isinstance(err, ValueError):
        return (f"OOM at {stage} (pre-flight)" if "memory is available" in msg
                else f"refused at {stage}")
    if isinstance(err, MemoryError) or "memory" in msg.lower():
        return f"OOM at {stage}"
    return f"error at {stage}"


def baseline_worker(method: str, overrides: list[str]) -> dict:
    """One step of ``build_run(overrides)`` (in the current, memory-capped process).

    Stages: ``build`` (composition, construction and the pre-flight checks), ``output_fit``
    (``on_fit_start``'s output fit) and ``step``; the row records where it stopped.
    """
    out = dict(method=method, overrides=list(overrides),
               sdze_train_command=None, stage="build")
    t0 = time.perf_counter()
    try:
        run = build_run(overrides)
        out.update(sdze_train_command=run.command, threads=run.threads,
                   build_s=time.perf_counter() - t0, stage="output_fit")
        try:
            run.fit_output()
            out["stage"] = "step"
            t0 = time.perf_counter()
            out["loss"] = run.step(0)
            out["step_s"] = time.perf_counter() - t0
            out["skipped_steps"] = run.problem.skipped_steps
        finally:
            run.problem.stop_prefetch()
        out["status"] = "ok"
    except (MemoryError, RuntimeError, ValueError, InstantiationException) as err:
        if isinstance(err, InstantiationException) and err.__cause__ is not None:
            err = err.__cause__  # the constructor's own error (its pre-flight's refusal)
        msg = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        out["status"] = _failure_status(err, out["stage"])
        out["error"] = msg
    out["peak_rss_bytes"] = peak_rss_total()
    return out


def _command(overrides: list[str]) -> str:
    """The ``sdze-train`` command line of ``overrides`` (``Run.command`` without a run)."""
    return shlex.join(["sdze-train", *overrides])


def run_baselines(dim: int, overrides: list[str], mem_gb: float, timeout: float,
                  methods: tuple[str, ...] = BASELINES) -> list[dict]:
    """Each baseline for one step in a capped subprocess; status rows.

    A worker receives its full override list (``run_overrides(method, dim, ...)`` with the
    shared ``overrides`` its estimator takes).
    """
    rows = []
    for method in methods:
        cap = int(min(mem_gb * GiB, mem_available() - 2 * GiB))
        job_overrides = run_overrides(method, dim, *overrides_for_method(method, overrides))
        job = dict(method=method, overrides=job_overrides, mem_cap=cap)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)],
                                  capture_output=True, text=True, timeout=timeout, check=False)
            lines = proc.stdout.strip().splitlines()
            if proc.returncode == 0 and lines:
                row = json.loads(lines[-1])
            else:
                row = dict(method=method, status=f"crashed rc={proc.returncode}",
                           error=proc.stderr[-300:])
        except subprocess.TimeoutExpired:
            row = dict(method=method, status=f"timeout > {timeout:.0f} s")
        row["dim"] = dim
        row.setdefault("overrides", job_overrides)
        row.setdefault("sdze_train_command", None)
        row["sdze_train_command"] = row["sdze_train_command"] or _command(job_overrides)
        row["mem_cap_bytes"] = cap
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"baseline {method:12s} d={dim}: {row['status']} "
              f"(cap {cap / GiB:.1f} GiB, {row['wall_s']:.0f} s) {row.get('error', '')}",
              flush=True)
    return rows


def shared_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides every run of this invocation shares (the flags, or the smoke setup)."""
    if args.smoke:
        out = list(SMOKE_OVERRIDES)
    else:
        out = [f"threads={args.threads}"]
        if args.points is not None:
            out.append(f"pde.n_interior={args.points}")
    if args.prefetch:
        out.append("prefetch=true")
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the big SDZE run (and the baselines); write ``results/big_run.*``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dim", type=int, default=10_000_000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--max-minutes", type=float, default=1e9, help="stop the SDZE run after this")
    ap.add_argument("--threads", default="1", help="threads= (a count or auto)")
    ap.add_argument("--lr", type=float, default=None,
                    help="SDZE's method.lr= (default: the packaged config's)")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="loss on a fixed batch every this many steps (0: off)")
    ap.add_argument("--points", type=int, default=None,
                    help="pde.n_interior= (default: the packaged config's, 100)")
    add_prefetch_flag(ap)
    ap.add_argument("--baselines", action="store_true", help="try each baseline for one step")
    ap.add_argument("--skip-sdze", action="store_true", help="only the baselines")
    ap.add_argument("--baseline-mem-gb", type=float, default=20.0)
    ap.add_argument("--baseline-timeout", type=float, default=600.0)
    ap.add_argument("--baseline-methods", nargs="+", default=list(BASELINES), choices=BASELINES)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true", help="tiny, in-process")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        limit_memory(job["mem_cap"])
        print(json.dumps(baseline_worker(job["method"], job["overrides"])))
        return {}
    record = provenance(None if argv is None else [f"benchmarks/{Path(__file__).name}", *argv])
    overrides = shared_overrides(args)
    if args.smoke:
        args.dim, args.steps, args.eval_every = 300, 6, 3
    sdze_overrides = overrides + ([f"method.lr={args.lr}"] if args.lr is not None else [])
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = dict(record, overrides=overrides)
    stem = "big_run_smoke" if args.smoke else "big_run"
    if not args.smoke and args.points is not None and args.points != 100:
        stem += f"_{args.points}pts"
    if not args.smoke and args.eval_every:
        stem += "_eval"
    if not args.smoke and args.prefetch:
        stem += "_prefetch"
    if not args.skip_sdze:
        res = sdze_run(args.dim, args.steps, args.max_minutes * 60, sdze_overrides,
                       eval_every=args.eval_every)
        rows = res.pop("rows")
        summary["sdze"] = res
        write_csv(args.out / f"{stem}.csv", rows)
        print(f"SDZE d={args.dim}: {res['params']:,} params, {res['steps_done']} steps, "
              f"median {res['median_s_per_step']:.2f} s/step, peak RSS "
              f"{res['peak_rss_bytes'] / GiB:.2f} GiB (params+batch "
              f"{(res['param_bytes'] + res['batch_bytes']) / GiB:.2f} GiB), loss "
              f"{res['loss_first_tenth']:.4g} -> {res['loss_last_tenth']:.4g}", flush=True)
    if args.baselines:
        if args.smoke:
            summary["baselines"] = [
                dict(baseline_worker(
                    m, run_overrides(m, args.dim, *overrides_for_method(m, overrides))),
                    dim=args.dim)
                for m in BASELINES[:1]]
        else:
            summary["baselines"] = run_baselines(args.dim, overrides, args.baseline_mem_gb,
                                                 args.baseline_timeout,
                                                 tuple(args.baseline_methods))
    path = args.out / f"{stem}.json"
    if path.exists() and not args.smoke:  # keep the other half of an earlier run
        old = json.loads(path.read_text())
        for key in ("sdze", "baselines"):
            if key not in summary and key in old:
                summary[key] = old[key]
                summary.setdefault("kept_from_earlier_run", []).append(
                    {"part": key, "date": old.get("date"), "commit": old.get("commit"),
                     "command": old.get("command")})
    path.write_text(json.dumps(finish_provenance(summary), indent=2))
    return summary


if __name__ == "__main__":
    main()
