"""Peak memory of a checkpoint save and of a resume, against the training step's.

For each experiment, input dimension ``d``, batch size and checkpoint IO, three
``sdze-train`` runs, each in its own process (so that the process peak is that run's):

1. ``train``: ``trainer.max_steps=3`` with ``callbacks=none`` (no checkpoint);
2. ``save``: the same with the checkpoint callback only, which writes ``last.ckpt`` after
   the last step;
3. ``resume``: ``ckpt_path=last`` in the run directory of 2, one more step (which writes
   its own ``last.ckpt`` at the end: load, step and save in one process).

The IOs: ``old`` is Lightning's ``TorchCheckpointIO`` (the config sets
``+trainer.plugins=[]``, so ``sdze-train`` adds none), ``new`` is ``sdze-train``'s
default, :class:`sdze_lightning.StreamingCheckpointIO` with the weights loaded by
:func:`sdze_lightning.checkpoint_io.load_weights_page_by_page`. Each process reports two
peaks:

* ``peak_rss``: ``ru_maxrss`` of the process (from ``os.wait4``), everything resident,
  the file-backed pages of a memory-mapped checkpoint included (clean page-cache pages,
  which the kernel can drop under pressure);
* ``peak_anon``: the largest ``RssAnon`` of the process, read from ``/proc/<pid>/status``
  every ``--sample-ms`` milliseconds by this script (the process's private memory, the
  part the kernel cannot drop; a sample can miss a peak shorter than the interval).

Ratios are to the ``train`` run of the same IO. Validation runs on ``--n-eval`` points.

    python benchmarks/checkpoint_peak.py --dims 1000000 --points 16 100
    python benchmarks/checkpoint_peak.py --dims 10000000 --experiments twobody_fused
    python benchmarks/checkpoint_peak.py --smoke        # d = 300, numbers meaningless

Results: ``results/checkpoint_peak.json`` (``--name`` changes the file name).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path

from _common import MACHINE, RESULTS, git_commit, load_average  # noqa: E402

EXPERIMENTS = ("twobody_fused", "twobody_sdze_large")
IOS = {"old": ["+trainer.plugins=[]"], "new": []}
RUNS = ("train", "save", "resume")


class AnonSampler(threading.Thread):
    """Largest ``RssAnon`` of process ``pid`` over its life, sampled every ``interval`` s."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.path = Path(f"/proc/{pid}/status")
        self.interval = interval
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                text = self.path.read_text()
            except OSError:  # exited
                return
            found = re.search(r"RssAnon:\s+(\d+)", text)
            if found:
                self.peak = max(self.peak, int(found.group(1)) * 1024)
            time.sleep(self.interval)


def overrides(args: argparse.Namespace, experiment: str, dim: int, points: int, io: str,
              run: str, run_dir: Path) -> list[str]:
    """The ``sdze-train`` arguments of one run."""
    common = [
        f"experiment={experiment}", f"pde.dim={dim}", f"pde.n_interior={points}",
        f"pde.n_eval={args.n_eval}", "logger=none", f"hydra.run.dir={run_dir}", *IOS[io],
    ]
    if args.smoke:
        common += ["model.width=8", "model.depth=2", "estimator.num_directions=2"]
    if run == "train":
        return [*common, f"trainer.max_steps={args.steps}", "callbacks=none"]
    if run == "save":
        return [*common, f"trainer.max_steps={args.steps}", "~callbacks.progress",
                "~callbacks.memory"]
    return [f"hydra.run.dir={run_dir}", "ckpt_path=last", f"trainer.max_steps={args.steps + 1}",
            "logger=none", *IOS[io]]


def measure(cmd: list[str], sample_s: float) -> dict:
    """Run ``cmd``; its exit status, wall time and peaks (see the module docs)."""
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True)
    sampler = AnonSampler(proc.pid, sample_s)
    sampler.start()
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    sampler.done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss": usage.ru_maxrss * 1024, "peak_anon": sampler.peak,
            "restored": "Restored all states from the checkpoint" in output,
            "tail": output[-2000:]}


def configuration(args: argparse.Namespace, experiment: str, dim: int, points: int,
                  io: str, work: Path) -> list[dict]:
    """The three runs of one experiment, ``d``, batch size and IO."""
    rows = []
    for run in RUNS:
        run_dir = work / f"{experiment}-{dim}-{points}-{io}-{'train' if run == 'train' else 'ckpt'}"
        argv = overrides(args, experiment, dim, points, io, run, run_dir)
        cmd = [sys.executable, "-m", "sdze_lightning.cli", *argv]
        row = {"experiment": experiment, "dim": dim, "points": points, "io": io, "run": run,
               "command": "sdze-train " + shlex.join(argv), **measure(cmd, args.sample_ms / 1e3)}
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        row["ckpt_bytes"] = ckpt.stat().st_size if run != "train" and ckpt.exists() else None
        rows.append(row)
        print(f"{experiment} d={dim} n={points} {io:>3} {run:>6}: rc {row['rc']}, "
              f"peak RSS {row['peak_rss'] / 2**30:.2f} GiB, anon {row['peak_anon'] / 2**30:.2f}"
              f" GiB, {row['wall_s']} s", flush=True)
        tail = row.pop("tail")
        if row["rc"] != 0 or row["restored"] != (run == "resume"):
            print(tail, "\nexit status or restore unexpected", file=sys.stderr)
            break
    train = rows[0]
    for row in rows:
        for key in ("peak_rss", "peak_anon"):
            if row["rc"] == 0 and train["rc"] == 0 and train[key]:
                row[f"{key}_ratio"] = round(row[key] / train[key], 3)
    for run_dir in work.glob(f"{experiment}-{dim}-{points}-{io}-*"):
        shutil.rmtree(run_dir, ignore_errors=True)  # a d = 1e7 checkpoint is 5 GB
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the configurations, write the results JSON, return its rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS),
                        choices=EXPERIMENTS)
    parser.add_argument("--dims", nargs="+", type=int, default=[1_000_000])
    parser.add_argument("--points", nargs="+", type=int, default=[16],
                        help="pde.n_interior (the batch) values")
    parser.add_argument("--io", nargs="+", default=list(IOS), choices=list(IOS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--n-eval", type=int, default=16, help="pde.n_eval")
    parser.add_argument("--sample-ms", type=float, default=10.0)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the run directories go (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="checkpoint_peak")
    parser.add_argument("--smoke", action="store_true", help="d = 300, tiny network")
    args = parser.parse_args(argv)
    if args.smoke:
        args.dims, args.points, args.n_eval, args.name = [300], [4], 8, args.name + "_smoke"

    started = {"date": datetime.date.today().isoformat(), "commit": git_commit(),
               "machine": MACHINE, "cpu_count": os.cpu_count(),
               "command": shlex.join([sys.executable, *sys.argv]) if argv is None
               else shlex.join(["benchmarks/checkpoint_peak.py", *argv]),
               "load_start": load_average(), "threads": "sdze-train threads=auto (default)",
               "sample_ms": args.sample_ms, "steps": args.steps, "n_eval": args.n_eval}
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        for experiment in args.experiments:
            for dim in args.dims:
                for points in args.points:
                    for io in args.io:
                        rows += configuration(args, experiment, dim, points, io, Path(work))
                        result = {**started, "load_end": load_average(), "rows": rows}
                        (args.out / f"{args.name}.json").write_text(
                            json.dumps(result, indent=1) + "\n")  # after each: a long run
    return rows


if __name__ == "__main__":
    main()
