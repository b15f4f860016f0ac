"""Steps per second of SDZE and of the JAX STDE code, side by side on one instance.

Both run at the same time, each on one core of this machine, on the two-body
Allen-Cahn instance of ``pde=allen_cahn_twobody pde.dim=<d>`` (its coefficients are
handed to STDE as ``benchmarks/stde_side_by_side.py`` hands them):

* STDE: its own ``stde.train.train`` through ``benchmarks/_stde_driver.py`` (sparse
  STDE, 16 random coordinates, 100 points, Adam), one XLA thread, ``--stde-steps``
  steps; its time per step is measured by the driver from the first step's hook to
  the last (compilation excluded);
* SDZE: ``sdze-train method=sdze estimator=taylor pde=allen_cahn_twobody pde.dim=<d>
  threads=1`` (the packaged defaults, built by :func:`_common.build_run`), stepped in
  this process for as long as the STDE process runs; its time per step is the median
  of the steps that started after STDE's first step and ended before its last one
  (read from the driver's timestamps).

Running both at once keeps the two at equal load; ``--repeats`` repeats the pair. The
ratio is SDZE's steps per second over STDE's.

    python benchmarks/sdze_vs_stde_speed.py --stde-path /tmp/stde \
        --stde-python /tmp/stde-venv/bin/python --dims 10000 100000 --repeats 2
    python benchmarks/sdze_vs_stde_speed.py --smoke    # SDZE side only, tiny, no STDE

Result: ``results/sdze_vs_stde_speed.json`` (``..._smoke.json``) with the run's
provenance (date, commit, machine, loads, threads, command) and each side's command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS,
    SMOKE_OVERRIDES,
    build_run,
    finish_provenance,
    load_average,
    run_overrides,
    script_provenance,
)
from stde_side_by_side import eval_points, stde_env  # noqa: E402

HERE = Path(__file__).resolve().parent


def sdze_overrides(dim: int, smoke: bool) -> list[str]:
    """``sdze-train`` overrides of the SDZE side: packaged defaults, one thread."""
    return run_overrides("sdze", dim, "threads=1", "pde.n_eval=64",
                         *(SMOKE_OVERRIDES if smoke else ()))


def stde_command(args, instance: Path, steps: int) -> list[str]:
    """The driver's command line for ``steps`` steps on ``instance``."""
    return [args.stde_python, str(HERE / "_stde_driver.py"), "--stde-path", str(args.stde_path),
            "--instance", str(instance), "--epochs", str(steps), "--n-test", "200"]


def step_while(run, alive, limit_s: float) -> list[tuple[float, float]]:
    """Step ``run`` while ``alive()`` (at most ``limit_s``); each step's (start, end)."""
    spans: list[tuple[float, float]] = []
    t_end = time.time() + limit_s
    k = 0
    while alive() and time.time() < t_end:
        t0 = time.time()
        run.step(k)
        spans.append((t0, time.time()))
        k += 1
    return spans


def measure_pair(args, dim: int, tmp: Path) -> dict:
    """One round at ``dim``: STDE in a subprocess, SDZE here, at the same time."""
    overrides = sdze_overrides(dim, args.smoke)
    run = build_run(overrides)
    run.fit_output()
    run.step(0)  # first step outside the window (kernels, caches)
    row: dict = {"dim": dim, "sdze_overrides": overrides, "sdze_command": run.command,
                 "sdze_threads": run.threads, "load_start": round(load_average(), 2)}
    if args.smoke:
        spans = step_while(run, lambda: True, args.smoke_seconds)
        window = (spans[0][0], spans[-1][1])
        stde = None
    else:
        instance = tmp / f"instance_{dim}.npz"
        x_eval, u_eval = eval_points(run.problem)
        np.savez(instance, coeffs=run.problem.coeffs.double().numpy(), x_eval=x_eval,
                 u_eval=u_eval)
        cmd = stde_command(args, instance, args.stde_steps[str(dim)])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=tmp, env=stde_env(args.xla_threads))
        spans = step_while(run, lambda: proc.poll() is None, args.max_seconds)
        out, err = proc.communicate()
        line = next((x for x in out.splitlines() if x.startswith("STDE ")), None)
        if line is None:
            raise RuntimeError(f"STDE at d = {dim} failed:\n{err[-3000:]}")
        stde = json.loads(line[5:])
        stde["command"] = shlex.join(cmd)
        window = (stde["first_step_time"], stde["last_step_time"])
    inside = [b - a for a, b in spans if a >= window[0] and b <= window[1]]
    row.update({
        "sdze_steps_in_window": len(inside),
        "sdze_s_per_step": statistics.median(inside) if inside else None,
        "stde": stde,
        "stde_s_per_step": None if stde is None else stde["s_per_step"],
        "load_end": round(load_average(), 2),
    })
    if stde is not None and inside:
        row["sdze_over_stde_it_per_s"] = stde["s_per_step"] / row["sdze_s_per_step"]
    run.problem.collocation.stop_prefetch()
    return row


def main(argv: list[str] | None = None) -> dict:
    """Measure every ``--dims`` ``--repeats`` times; write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--stde-path", type=Path, help="checkout of sail-sg/stde")
    ap.add_argument("--stde-python", help="python of an environment with STDE's requirements")
    ap.add_argument("--dims", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--stde-steps", type=json.loads,
                    default={"10000": 400, "100000": 120},
                    help='STDE steps per d, JSON, e.g. \'{"10000": 400}\'')
    ap.add_argument("--repeats", "--rounds", dest="repeats", type=int, default=2,
                    help="pairs per d")
    ap.add_argument("--xla-threads", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=1800.0,
                    help="stop SDZE's side after this long whatever STDE does")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true", help="SDZE side only, tiny; no STDE")
    ap.add_argument("--smoke-seconds", type=float, default=1.0)
    args = ap.parse_args(argv)
    if args.smoke:
        args.dims, args.repeats = [64], 1
    elif not (args.stde_path and args.stde_python):
        ap.error("--stde-path and --stde-python are required (or --smoke)")
    elif any(str(d) not in args.stde_steps for d in args.dims):
        ap.error("--stde-steps needs an entry for every --dims value")
    torch.set_num_threads(1)
    result = {**script_provenance(__file__, argv), "rows": []}
    path = args.out / f"sdze_vs_stde_speed{'_smoke' if args.smoke else ''}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.repeats):
            for dim in args.dims:
                row = {"round": rnd, **measure_pair(args, dim, Path(tmp))}
                result["rows"].append(row)
                path.write_text(json.dumps(result, indent=1))
                print(json.dumps({k: row[k] for k in (
                    "dim", "round", "sdze_s_per_step", "stde_s_per_step", "load_start",
                    "load_end")}), flush=True)
    path.write_text(json.dumps(finish_provenance(result), indent=1))
    return result


if __name__ == "__main__":
    main()
