"""``torch.profiler`` of the SDZE step at d = 1e5 and 1e6.

Shared setup (two-body Allen-Cahn, MLP 4x128 tanh, 100 points, ``taylor`` with
16 coordinate directions, SDZE rank 4). After one warm-up step, ``--steps``
steps run under the profiler with input shapes recorded. Every operator event
is classed by its input shapes:

* **d-dependent**: an input has a dimension of at least ``min(d - 2, 8192)`` (the batch ``N x d``,
  the first-layer weight ``128 x d``, the basis ``d x r``, the source terms);
  these are split into the *input pass* (the products ``x W^T`` and ``x B`` that
  a forward pass must do) and *other passes over d* (sampling, the analytic
  source, the constraint ``|x|^2``, copies, ...);
* **dimension-free**: everything else (jets of the 16 directions through the
  hidden layers, SDZE's core updates).

The table of the top operators by self CPU time goes to stdout and
``results/profile_sdze_d<d>.txt``, the class totals to ``results/profile_sdze.json``.

Each run is built from the packaged configs (``_common.build_run``) with
``run_overrides("sdze", d, ...)``: ``--threads`` becomes ``threads=``, ``--smoke`` adds the
tiny ``SMOKE_OVERRIDES``, everything else is the configs' default; ``on_fit_start``'s output
fit runs before the warm-up step, as in ``sdze-train``. Every row records its overrides and
the ``sdze-train`` command that builds the same run (``sdze_train_command``); the results file
starts with the run's provenance (date, commit, machine, load at start and end, threads, the
command line).

    python benchmarks/profile_sdze.py                 # d = 1e5, 1e6
    python benchmarks/profile_sdze.py --dims 100000 --steps 3
    python benchmarks/profile_sdze.py --smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS,
    SMOKE_OVERRIDES,
    build_run,
    finish_provenance,
    forward_pass,
    provenance,
    run_overrides,
    warm_fused_kernels,
)

#: Operators that make up the input pass (matrix products with the batch).
INPUT_PASS_OPS = ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear")


def classify(events, dim: int) -> dict:
    """Self CPU time (s) per class and per d-dependent operator."""
    totals: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    for ev in events:
        shapes = ev.input_shapes or []
        # d - 2 .. d + 1: the source terms work on x[:, :-1] (two-body) or x[:, :-2] (three-body);
        # >= 8192: column chunks of the source at large d (hidden shapes are <= K N = 1600)
        has_d = any(n >= min(dim - 2, 8192) for s in shapes if isinstance(s, (list, tuple))
                    for n in s if isinstance(n, int))
        t = ev.self_cpu_time_total / 1e6
        if ev.key.startswith("## Call CompiledFxGraph"):  # the fused source: shapes not recorded
            totals["other_passes_over_d"] += t
            by_op["fused two-body source (torch.compile)"] += t
            continue
        if not has_d:
            totals["dimension_free"] += t
            continue
        key = "input_pass" if ev.key in INPUT_PASS_OPS else "other_passes_over_d"
        totals[key] += t
        by_op[f"{ev.key} {shapes}"] += t
    return dict(totals=dict(totals),
                d_dependent_ops=dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:15]))


def profile_dim(dim: int, overrides: list[str], steps: int, out: Path) -> dict:
    """Profile ``steps`` SDZE steps of ``build_run(run_overrides("sdze", dim, *overrides))``.

    Returns the class totals, with the run's overrides and ``sdze-train`` command.
    """
    run = build_run(run_overrides("sdze", dim, *overrides))
    problem = run.problem
    run.fit_output()
    warm_fused_kernels()
    run.step(0)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for k in range(1, steps + 1):
            run.step(k)
    wall = (time.perf_counter() - t0) / steps
    problem.stop_prefetch()  # no background build during the forward timing below
    sample_s, forward_s = forward_pass(problem, 1000)
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40,
        max_shapes_column_width=60)
    (out / f"profile_sdze_d{dim}.txt").write_text(table)
    print(f"=== d = {dim}: {wall:.3f} s/step (under the profiler)\n{table}", flush=True)
    res = classify(prof.key_averages(group_by_input_shape=True), dim)
    res.update(dim=dim, overrides=run.overrides, sdze_train_command=run.command,
               threads=run.threads, steps=steps, s_per_step_profiled=wall, sample_s=sample_s,
               forward_s=forward_s)
    tot = res["totals"]
    per = {k: v / steps for k, v in tot.items()}
    print(f"per step: input pass {per.get('input_pass', 0):.3f} s, other passes over d "
          f"{per.get('other_passes_over_d', 0):.3f} s, dimension-free "
          f"{per.get('dimension_free', 0):.3f} s; one forward pass {forward_s:.3f} s "
          f"(+ sampling {sample_s:.3f} s)", flush=True)
    for k, v in list(res["d_dependent_ops"].items())[:10]:
        print(f"  {v / steps:7.3f} s/step  {k}")
    return res


def main(argv: list[str] | None = None) -> list[dict]:
    """Profile every requested dimension."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[100000, 1000000])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", default="1", help="threads= (a count or auto)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    record = provenance(None if argv is None else [f"benchmarks/{Path(__file__).name}", *argv])
    overrides = [f"threads={args.threads}"]
    if args.smoke:
        overrides = list(SMOKE_OVERRIDES)
        args.dims, args.steps = [300], 1
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [profile_dim(d, overrides, args.steps, args.out) for d in args.dims]
    stem = "profile_sdze_smoke" if args.smoke else "profile_sdze"
    (args.out / f"{stem}.json").write_text(json.dumps(
        finish_provenance(dict(record, overrides=overrides, rows=rows)), indent=2))
    return rows


if __name__ == "__main__":
    main()
