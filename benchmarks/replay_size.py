"""Seed-replay log against checkpoints: size, and a bit-identical rebuild.

Trains SDZE on two-body Allen-Cahn (unit ball, hard constraint, MLP 4x128 tanh, ``taylor``
with 16 coordinate directions, 100 points) with :class:`~sdze_lightning.replay.SeedReplayLog`,
then rebuilds the model from ``initial.ckpt`` + ``replay.sdzelog`` (:func:`replay`) in the
same process and checks it is bit-identical to the trained one. Reports the bytes of the log
(per step and in all), of a Lightning checkpoint, and the wall time of replaying against
training (ratio, same process).

    python benchmarks/replay_size.py            # d = 1e5, 40 steps (~2-4 min on 2 cores)
    python benchmarks/replay_size.py --smoke    # d = 1e3, 6 steps (seconds)
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from _common import write_csv

from sdze_lightning.estimators.taylor import TaylorEstimator
from sdze_lightning.methods import SDZE
from sdze_lightning.nn import MLP
from sdze_lightning.problems import TwoBody
from sdze_lightning.replay import MAGIC, SeedReplayLog, read_log, replay

RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="d = 1e3, 6 steps")
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "64-true"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def make_problem(dim: int, queries: int, net_seed: int = 0) -> TwoBody:
    method = functools.partial(SDZE, lr=1e-3, rank=4, period=20, queries=queries, seed=0)
    return TwoBody(dim=dim, operator="allen_cahn", net=MLP(dim, width=128, depth=4, seed=net_seed),
                   n_interior=100, n_eval=0, estimator=TaylorEstimator(16, "coordinate"),
                   method=method)


def identical(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    dim = args.dim or (1_000 if args.smoke else 100_000)
    steps = args.steps or (6 if args.smoke else 40)
    work = Path(tempfile.mkdtemp(prefix="replay_size_"))
    try:
        problem = make_problem(dim, args.queries)
        trainer = L.Trainer(
            max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu", devices=1,
            precision=args.precision, callbacks=[SeedReplayLog(work / "replay")],
        )
        t0 = time.perf_counter()
        trainer.fit(problem)
        train_s = time.perf_counter() - t0
        print(f"[{train_s:7.1f}s] trained {steps} steps at d={dim}", flush=True)
        trainer.save_checkpoint(work / "last.ckpt")
        log_path = work / "replay" / "replay.sdzelog"
        parsed = read_log(log_path)
        rebuilt = make_problem(dim, args.queries, net_seed=1)
        t0 = time.perf_counter()
        replay(rebuilt, log_path)
        replay_s = time.perf_counter() - t0
        same = identical(problem, rebuilt)
        print(f"[{replay_s:7.1f}s] replayed: bit-identical={same}", flush=True)
        log_bytes = log_path.stat().st_size
        header_bytes = log_path.read_bytes().index(b"\n", len(MAGIC)) + 1
        ckpt_bytes = (work / "last.ckpt").stat().st_size
        per_step = (log_bytes - header_bytes) // steps
        row = {
            "dim": dim,
            "params": sum(p.numel() for p in problem.net.parameters()),
            "precision": args.precision,
            "queries": args.queries,
            "steps": steps,
            "log_bytes": log_bytes,
            "log_header_bytes": header_bytes,
            "log_bytes_per_step": per_step,
            "checkpoint_bytes": ckpt_bytes,
            "initial_checkpoint_bytes": (work / "replay" / "initial.ckpt").stat().st_size,
            "steps_per_checkpoint_size": ckpt_bytes // per_step,
            "checkpoint_over_log_per_step": round(ckpt_bytes / per_step),
            "records": int(parsed.records.shape[0]),
            "bit_identical": same,
            "train_seconds": round(train_s, 2),
            "replay_seconds": round(replay_s, 3),
            "replay_over_train": round(replay_s / train_s, 5),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for k, v in row.items():
        print(f"  {k:30s} {v}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "replay_size_smoke" if args.smoke else "replay_size"
    (args.out / f"{stem}.json").write_text(json.dumps(row, indent=1) + "\n")
    write_csv(args.out / f"{stem}.csv", [row])
    return row


if __name__ == "__main__":
    main()
