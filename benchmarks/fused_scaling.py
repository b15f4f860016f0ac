"""Step time and peak memory of ``fused_adafactor`` against SDZE, through ``Trainer.fit``.

Two-body Allen-Cahn on the unit ball (``pde=allen_cahn_twobody``), ``estimator=taylor``,
``method=sdze`` and ``method=fused_adafactor``, each built from the packaged configs as
``sdze-train <overrides>`` builds it (``_common.build_run``; the overrides:
``time_to_accuracy.study_overrides``): the packaged network, batch, directions and
learning rates, float32, with ``pde.n_eval=0`` (no held-out set: nothing is evaluated) and
``threads`` from ``--threads``. For each d, in one process, one after the other: SDZE and
``fused_adafactor`` train ``--steps`` steps each through ``lightning.Trainer.fit`` (no
validation, no logger, no checkpoint). Per method:

* ``s_per_step``: median wall time of a step after the first (a callback's clock around
  each training step, as the Trainer runs it);
* ``peak_bytes``: the process's peak RSS (``VmHWM``, reset before the build) minus its
  RSS before the build: parameters, optimizer state, batch and every transient;
* ``peak_ratio``: ``peak_bytes / (parameter bytes + batch bytes)``;
* the loss of the first and of the last step, and the means of the first and last 10
  (fresh batches every step, so single losses are noisy);
* ``overrides`` and ``command``: the run's ``sdze-train`` overrides and command line.

``--sdze-steps`` trains SDZE for fewer steps than the fused method: its median step is
the reference, and a long fused run need not be paired with an equally long SDZE run.

``ratio_to_sdze`` is the fused method's ``s_per_step`` over SDZE's, measured in the
same process (the figure to trust on a loaded machine, with its load average).

    python benchmarks/fused_scaling.py --dims 100000 1000000 --steps 20
    python benchmarks/fused_scaling.py --dims 10000000 --steps 200 --sdze-steps 10 --tag 1e7_200
    python benchmarks/fused_scaling.py --smoke

Results: ``results/fused_scaling[_<tag>].json`` (``fused_scaling_smoke.json``), with the
run's provenance (date, commit, machine, loads, threads, command).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS,
    SMOKE_OVERRIDES,
    build_run,
    finish_provenance,
    fit_run,
    load_average,
    peak,
    reset_peak,
    rss,
    script_provenance,
    warm_fused_kernels,
)
from time_to_accuracy import study_overrides  # noqa: E402

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


def fit_steps(method: str, overrides: list[str], steps: int) -> dict:
    """Train ``steps`` steps of the run of ``overrides``; the row of ``method``.

    Args:
        method: The row's method (``sdze`` or ``fused_adafactor``), its label.
        overrides: The run's ``sdze-train`` overrides.
        steps: Training steps.

    """
    reset_peak()  # trims the heap first: the base is read after it, so the peak is >= base
    base = rss()
    built = build_run(overrides)
    problem = built.problem
    clock = StepClock()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[clock])
    fit_run(built, trainer)
    params = sum(p.numel() for p in problem.net.parameters())
    row = dict(method=method, dim=problem.dim, steps=len(clock.seconds), params=params,
               param_bytes=4 * params, batch_bytes=4 * problem.n_interior * problem.dim,
               first_step_s=clock.seconds[0],
               s_per_step=statistics.median(clock.seconds[1:] or clock.seconds),
               peak_bytes=peak() - base, first_loss=clock.losses[0],
               last_loss=clock.losses[-1], load=load_average(),
               mean_loss_first_10=statistics.fmean(clock.losses[:10]),
               mean_loss_last_10=statistics.fmean(clock.losses[-10:]),
               threads=built.threads, overrides=built.overrides, command=built.command)
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
    record = script_provenance(__file__, argv)
    extra = ["pde.n_eval=0"]  # no held-out set: no run evaluates
    if args.smoke:
        args.dims, args.steps, args.threads = [300], 3, 1
        extra += SMOKE_OVERRIDES
    torch.set_num_threads(args.threads)
    warm_fused_kernels()
    rows = []
    for dim in args.dims:
        by = {}
        for method in METHODS:
            steps = args.sdze_steps if method == "sdze" and args.sdze_steps else args.steps
            overrides = study_overrides(method, "twobody", dim, 0, *extra,
                                        threads=args.threads)
            by[method] = row = fit_steps(method, overrides, steps)
            rows.append(row)
            print(f"d={dim:>9} {method:15s} {row['s_per_step']:.3f} s/step (first "
                  f"{row['first_step_s']:.1f} s), peak {row['peak_bytes'] / 2**30:.2f} GiB = "
                  f"{row['peak_ratio']:.2f} x (params + batch), loss {row['first_loss']:.3e} -> "
                  f"{row['last_loss']:.3e}, load {row['load']:.1f}: {row['command']}",
                  flush=True)
        ratio = by["fused_adafactor"]["s_per_step"] / by["sdze"]["s_per_step"]
        by["fused_adafactor"]["ratio_to_sdze"] = ratio
        print(f"d={dim:>9} fused / SDZE step time: {ratio:.2f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "fused_scaling_smoke" if args.smoke else "fused_scaling"
    stem += f"_{args.tag}" if args.tag else ""
    (args.out / f"{stem}.json").write_text(json.dumps(
        {**finish_provenance(record), "steps": args.steps, "sdze_steps": args.sdze_steps,
         "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
