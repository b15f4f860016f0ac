"""Step time and peak memory of ``fused_adafactor`` against SDZE, through ``Trainer.fit``.

Two-body Allen-Cahn on the unit ball, MLP 4x128 tanh, 100 points per step, ``taylor`` on
16 coordinate directions, float32, one torch thread: the performance study's setup. For
each d, in one process, one after the other: SDZE (the shipped config: rank 4, period
100, Adam in the subspace) and ``fused_adafactor`` train ``--steps`` steps each through
``lightning.Trainer.fit`` (no validation, no logger, no checkpoint). Per method:

* ``s_per_step``: median wall time of a step after the first (a callback's clock around
  each training step, as the Trainer runs it);
* ``peak_bytes``: the process's peak RSS (``VmHWM``, reset before the build) minus its
  RSS before the build: parameters, optimizer state, batch and every transient;
* ``peak_ratio``: ``peak_bytes / (parameter bytes + batch bytes)``;
* the loss of the first and of the last step, and the means of the first and last 10
  (fresh batches every step, so single losses are noisy).

``--sdze-steps`` trains SDZE for fewer steps than the fused method: its median step is
the reference, and a long fused run need not be paired with an equally long SDZE run.

``ratio_to_sdze`` is the fused method's ``s_per_step`` over SDZE's, measured in the
same process (the figure to trust on a loaded machine, with its load average).

    python benchmarks/fused_scaling.py --dims 100000 1000000 --steps 20
    python benchmarks/fused_scaling.py --dims 10000000 --steps 200 --sdze-steps 10 --tag 1e7_200
    python benchmarks/fused_scaling.py --smoke

Results: ``results/fused_scaling[_<tag>].json`` (``fused_scaling_smoke.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    MACHINE,
    RESULTS,
    SMOKE,
    BenchConfig,
    load_average,
    peak,
    reset_peak,
    rss,
    warm_fused_kernels,
)
from time_to_accuracy import DEFAULT_LRS, make_method, make_problem  # noqa: E402

METHODS = ("sdze", "fused_adafactor")


class StepClock(L.Callback):
    """Wall time and loss of every training step."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Start the clock."""
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Stop the clock."""
        self.seconds.append(time.perf_counter() - self._t0)
        self.losses.append(pl_module.last_loss)


def fit_steps(method: str, dim: int, steps: int, cfg: BenchConfig) -> dict:
    """Train ``steps`` steps of ``method`` at ``dim``; the row of this method."""
    from sdze_lightning.nn import MLP

    reset_peak()  # trims the heap first: the base is read after it, so the peak is >= base
    base = rss()
    est, opt = make_method(method, cfg.seed, cfg, DEFAULT_LRS)
    net = MLP(dim, width=cfg.width, depth=cfg.depth, seed=cfg.seed)
    problem = make_problem("twobody", dim, cfg.seed, cfg, net=net, estimator=est, method=opt,
                           n_eval=0)
    clock = StepClock()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[clock])
    trainer.fit(problem)
    params = sum(p.numel() for p in net.parameters())
    row = dict(method=method, dim=dim, steps=len(clock.seconds), params=params,
               param_bytes=4 * params, batch_bytes=4 * cfg.points * dim,
               first_step_s=clock.seconds[0],
               s_per_step=statistics.median(clock.seconds[1:] or clock.seconds),
               peak_bytes=peak() - base, first_loss=clock.losses[0],
               last_loss=clock.losses[-1], load=load_average(),
               mean_loss_first_10=statistics.fmean(clock.losses[:10]),
               mean_loss_last_10=statistics.fmean(clock.losses[-10:]))
    row["peak_ratio"] = row["peak_bytes"] / (row["param_bytes"] + row["batch_bytes"])
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    """Every d: SDZE, then the fused method, in this process."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sdze-steps", type=int, default=None,
                    help="SDZE's steps (default --steps): its step time is the reference")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    cfg = BenchConfig(threads=args.threads)
    if args.smoke:
        cfg, args.dims, args.steps = SMOKE, [300], 3
    torch.set_num_threads(cfg.threads)
    warm_fused_kernels()
    rows = []
    for dim in args.dims:
        by = {}
        for method in METHODS:
            steps = args.sdze_steps if method == "sdze" and args.sdze_steps else args.steps
            by[method] = row = fit_steps(method, dim, steps, cfg)
            rows.append(row)
            print(f"d={dim:>9} {method:15s} {row['s_per_step']:.3f} s/step (first "
                  f"{row['first_step_s']:.1f} s), peak {row['peak_bytes'] / 2**30:.2f} GiB = "
                  f"{row['peak_ratio']:.2f} x (params + batch), loss {row['first_loss']:.3e} -> "
                  f"{row['last_loss']:.3e}, load {row['load']:.1f}", flush=True)
        ratio = by["fused_adafactor"]["s_per_step"] / by["sdze"]["s_per_step"]
        by["fused_adafactor"]["ratio_to_sdze"] = ratio
        print(f"d={dim:>9} fused / SDZE step time: {ratio:.2f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "fused_scaling_smoke" if args.smoke else "fused_scaling"
    stem += f"_{args.tag}" if args.tag else ""
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"machine": MACHINE, "date": time.strftime("%Y-%m-%d"), "cfg": dataclasses.asdict(cfg),
         "steps": args.steps, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
