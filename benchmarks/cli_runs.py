"""Named ``sdze-train`` runs whose claim is the run itself: its summary and its peak memory.

Each run is the ``sdze-train`` command a user types, started as a subprocess in a
temporary run directory (W&B disabled). The results file keeps the run's
``summary.json`` (status, rel. L2, loss, steps, training wall time), the process's peak
resident memory (``ru_maxrss`` of the child, from ``os.wait4``: parameters, batch,
held-out set and everything else the process held), its wall time from start to exit,
and the load average before and after, beside the provenance (date, commit, machine,
load, threads, command line).

    python benchmarks/cli_runs.py poisson2d_he            # exact Laplacian + Adam, ~10 min
    python benchmarks/cli_runs.py twobody_1e7_defaults    # d = 1e7, 3 steps, ~11 GiB, ~30 min
    python benchmarks/cli_runs.py --smoke                 # d = 40, 3 steps, to a temp file

Results: ``results/cli_<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path

from _common import RESULTS, finish_provenance, load_average, script_provenance  # noqa: E402

#: Each named run's ``sdze-train`` overrides.
RUNS: dict[str, list[str]] = {
    "poisson2d_he": ["experiment=poisson2d_he", "callbacks=none"],
    "twobody_1e7_defaults": ["pde=allen_cahn_twobody", "pde.dim=10000000", "method=sdze",
                             "estimator=taylor", "trainer.max_steps=3"],
    "smoke": ["pde=allen_cahn_twobody", "pde.dim=40", "pde.n_eval=64",
              "trainer.max_steps=3", "callbacks=none"],
}


def run_cli(overrides: list[str], run_dir: Path) -> dict:
    """Run ``sdze-train <overrides> hydra.run.dir=<run_dir>``; its summary and costs."""
    cmd = ["sdze-train", *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    log_path = run_dir.parent / f"{run_dir.name}.log"
    load_before, start = load_average(), time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        # wait4, not wait: this child's own rusage (RUSAGE_CHILDREN would mix runs)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return {
        "exit_code": os.waitstatus_to_exitcode(status),
        "summary": summary,
        "process_wall_s": round(wall, 1),
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "load_before": round(load_before, 2), "load_after": round(load_average(), 2),
        "log_tail": log_path.read_text()[-2000:] if not summary else "",
    }


def main(argv: list[str] | None = None) -> dict:
    """Run one named run (or the smoke run) and write its results file; returns it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", choices=sorted(RUNS), help="the run")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--smoke", action="store_true",
                        help="d = 40, 3 steps, to a temporary results directory")
    args = parser.parse_args(argv)
    if args.smoke:
        args.name, args.out = "smoke", Path(tempfile.mkdtemp())
    if args.name is None:
        parser.error("name a run (or --smoke)")
    overrides = RUNS[args.name]
    result = {**script_provenance(__file__, argv), "run": args.name, "overrides": overrides,
              "sdze_train_command": shlex.join(["sdze-train", *overrides])}
    with tempfile.TemporaryDirectory() as tmp:
        result.update(run_cli(overrides, Path(tmp) / args.name))
    finish_provenance(result)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cli_{args.name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    summary = result["summary"]
    print(f"{args.name}: exit {result['exit_code']}, status {summary.get('status')}, "
          f"rel_l2 {summary.get('rel_l2')}, peak RSS {result['peak_rss_bytes'] / 2**30:.2f} "
          f"GiB, {result['process_wall_s']} s; wrote {path}")
    return result


if __name__ == "__main__":
    main()
