"""The thread policy on a busy machine: the README's main job through the CLI.

Runs ``sdze-train method=sdze estimator=taylor trainer.max_steps=<steps>`` (the README's
main job) as a user would, each time in a fresh process, under

* ``threads=auto`` (the default), ``threads=1`` (pinned) and ``threads=<cores>``
  (torch's own default, what every run used before the policy existed),
* with one core kept busy by a competing process (a Python spin loop) and without it.

and records the wall time of the whole command (start-up included), the training
time and the threads from ``summary.json``, and the machine's load average before each
run (other users' load is not controlled: report it). Targets: with a busy core,
``auto`` within 1.5x of ``threads=1``; without it, ``auto`` no slower than torch's default.

    python benchmarks/threads.py                       # 2000 steps, all five runs
    python benchmarks/threads.py --steps 500 --runs auto-busy,one-busy
    python benchmarks/threads.py --smoke               # 5 steps (the test suite)

The results file starts with the provenance (date, commit, machine, load at start and end,
threads, the command line); ``sdze_train_command`` is the job each row ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import finish_provenance, load_average, script_provenance, write_csv

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
JOB = ["method=sdze", "estimator=taylor", "logger=none"]
CORES = os.cpu_count() or 1
#: name -> (threads setting, competing busy process)
RUNS = {
    "auto-busy": ("auto", True),
    "one-busy": ("1", True),
    "auto-free": ("auto", False),
    "default-free": (str(CORES), False),
    "default-busy": (str(CORES), True),
}
SPIN = "import time\nwhile True:\n    time.time()\n"


def run_job(threads: str, busy: bool, steps: int, workdir: Path) -> dict:
    """One main job in a fresh ``sdze-train`` process; returns its timings and summary."""
    spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if busy else None
    try:
        if spinner is not None:
            time.sleep(1.0)  # the spinner is running before the job samples the free cores
        run_dir = Path(tempfile.mkdtemp(dir=workdir))
        load = load_average()
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "sdze_lightning.cli", *JOB, f"trainer.max_steps={steps}",
             f"threads={threads}", f"hydra.run.dir={run_dir}"],
            capture_output=True, text=True, env=dict(os.environ, WANDB_MODE="disabled"),
            cwd=run_dir,  # not the repository root: the installed package, not the source tree
        )
        wall = time.perf_counter() - start
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if out.returncode != 0:
        raise RuntimeError(f"sdze-train failed:\n{out.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"threads_setting": threads, "busy_process": busy, "steps": steps,
            "wall_s": round(wall, 2), "train_s": summary["wall_time_s"],
            "threads": summary["threads"], "rel_l2": summary["rel_l2"],
            "load_avg_before": round(load, 2)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"of {list(RUNS)}")
    parser.add_argument("--out", default="threads", help="results/<out>.{json,csv}")
    parser.add_argument("--smoke", action="store_true", help="5 steps, auto-busy only, no files")
    args = parser.parse_args(argv)
    names = ["auto-busy"] if args.smoke else args.runs.split(",")
    steps = 5 if args.smoke else args.steps
    record = script_provenance(__file__, argv)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            row = {"run": name, **run_job(*RUNS[name], steps, Path(workdir))}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if not args.smoke:
        meta = {**finish_provenance(record), "cores": CORES,
                "sdze_train_command": " ".join(["sdze-train", *JOB, f"trainer.max_steps={steps}"])}
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.out}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
        write_csv(RESULTS / f"{args.out}.csv", rows)
    return rows


if __name__ == "__main__":
    main()
