"""Seed-replay log against checkpoints: size, and a bit-identical rebuild.

Trains SDZE on two-body Allen-Cahn with the seed-replay log, as ``sdze-train`` runs it
(:func:`sdze_lightning.cli.train` on the packaged config composed with the run's overrides:
``pde=allen_cahn_twobody method=sdze estimator=taylor replay_log=true``, the packaged
network, points and directions; ``method.period=20`` so that the steps cross subspace
refreshes, ``trainer.accelerator=cpu`` since the replay runs on the CPU). Then
``sdze-replay <log> --compare last.ckpt`` (:func:`sdze_lightning.replay.main`) rebuilds the
problem from the config stored in the log, replays it from ``initial.ckpt`` and checks it
is bit-identical (weights and method state) to the run's last checkpoint. Reports the bytes
of the log (per step and in all), of the run's ``last.ckpt``, and the wall time of the
replay against the training steps' (ratio, same process). The row records its overrides
and ``sdze-train`` command (``sdze_train_command``); the results file records the run's
provenance (date, commit, machine, load at start and end, threads, the command line)
beside it. Positional arguments are further overrides.

    python benchmarks/replay_size.py            # d = 1e5, 40 steps (minutes on 2 cores)
    python benchmarks/replay_size.py --smoke    # d = 1e3, 6 steps (seconds)
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from _common import finish_provenance, merge_overrides, script_provenance, write_csv

from sdze_lightning.builders import compose_config
from sdze_lightning.cli import train
from sdze_lightning.replay import MAGIC, read_log
from sdze_lightning.replay import main as sdze_replay

RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="further overrides of the run")
    parser.add_argument("--smoke", action="store_true", help="d = 1e3, 6 steps")
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "64-true"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def run_overrides(dim: int, steps: int, args: argparse.Namespace) -> list[str]:
    """The ``sdze-train`` overrides of the run."""
    return merge_overrides(
        ["pde=allen_cahn_twobody", f"pde.dim={dim}", "method=sdze", "estimator=taylor",
         "method.period=20", f"method.queries={args.queries}", f"trainer.max_steps={steps}",
         f"trainer.precision={args.precision}", "trainer.accelerator=cpu", "replay_log=true"],
        args.overrides)


class StepClock(L.Callback):
    """Seconds of the training steps (batch start to batch end, validation excluded) and
    the network's parameter count."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.params = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.params = sum(p.numel() for p in pl_module.net.parameters())

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.seconds += time.perf_counter() - self._start


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    record = script_provenance(__file__, argv)
    dim = args.dim or (1_000 if args.smoke else 100_000)
    steps = args.steps or (6 if args.smoke else 40)
    overrides = run_overrides(dim, steps, args)
    work = Path(tempfile.mkdtemp(prefix="replay_size_"))
    threads = torch.get_num_threads()
    try:
        run_dir = work / "run"
        clock = StepClock()
        summary = train(compose_config(overrides, run_dir), run_dir, callbacks=[clock])
        if summary.get("status") != "completed":
            raise RuntimeError(f"sdze-train {shlex.join(overrides)}: {summary}")
        print(f"[{clock.seconds:7.1f}s] trained {steps} steps at d={dim}", flush=True)
        log_path = run_dir / "replay" / "replay.sdzelog"
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        parsed = read_log(log_path)
        t0 = time.perf_counter()
        replayed = sdze_replay([str(log_path), "--compare", str(ckpt),
                                "--out", str(work / "replayed.ckpt")])
        replay_s = time.perf_counter() - t0
        same = bool(replayed["identical_weights"] and replayed["identical_method_state"])
        print(f"[{replay_s:7.1f}s] replayed: bit-identical={same}", flush=True)
        log_bytes = log_path.stat().st_size
        header_bytes = log_path.read_bytes().index(b"\n", len(MAGIC)) + 1
        ckpt_bytes = ckpt.stat().st_size
        per_step = (log_bytes - header_bytes) // steps
        row = {
            "dim": dim,
            "params": clock.params,
            "precision": args.precision,
            "queries": args.queries,
            "steps": steps,
            "log_bytes": log_bytes,
            "log_header_bytes": header_bytes,
            "log_bytes_per_step": per_step,
            "checkpoint_bytes": ckpt_bytes,
            "initial_checkpoint_bytes": (run_dir / "replay" / "initial.ckpt").stat().st_size,
            "steps_per_checkpoint_size": ckpt_bytes // per_step,
            "checkpoint_over_log_per_step": round(ckpt_bytes / per_step),
            "records": int(parsed.records.shape[0]),
            "replayed_steps": replayed["steps"],
            "bit_identical": same,
            "train_seconds": round(clock.seconds, 2),
            "replay_seconds": round(replay_s, 3),
            "replay_over_train": round(replay_s / clock.seconds, 5),
            "threads": summary.get("threads"),
            "overrides": overrides,
            "sdze_train_command": shlex.join(["sdze-train", *overrides]),
        }
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(work, ignore_errors=True)
    for k, v in row.items():
        print(f"  {k:30s} {v}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "replay_size_smoke" if args.smoke else "replay_size"
    (args.out / f"{stem}.json").write_text(
        json.dumps({**finish_provenance(record), **row}, indent=1) + "\n")
    write_csv(args.out / f"{stem}.csv", [row])
    return row


if __name__ == "__main__":
    main()
