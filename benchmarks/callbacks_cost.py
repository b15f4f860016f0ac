"""Cost of the callbacks on Poisson2D: training overhead and probing cost.

Measures, in one process (so the numbers are ratios, robust to a noisy machine):

1. seconds per training step with callbacks=none, default (memory monitor +
   rich progress bar) and diagnostics (+ variance monitor + solution plots),
   runs interleaved over several rounds, median per set;
2. the cost of one variance measurement and one solution plot relative to one
   training step, for Adam and (when available) SDZE, with the number of extra
   loss / residual evaluations per measurement.

Usage:
    python benchmarks/callbacks_cost.py            # full (a few minutes)
    python benchmarks/callbacks_cost.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from _common import median_time, write_csv
from lightning.pytorch.callbacks import ProgressBar
from sdze_lightning.callbacks import (
    EstimatorVarianceMonitor,
    MemoryMonitor,
    PINNProgressBar,
    SolutionPlot,
)

from sdze_lightning.nn import MLP
from sdze_lightning.problems.poisson2d import Poisson2D

RESULTS = Path(__file__).resolve().parent / "results"


class StepClock(L.Callback):
    """Wall time from the start of the first training step to the end of training."""

    def __init__(self) -> None:
        self.start = 0.0
        self.seconds = 0.0
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start == 0.0:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.start
        self.steps = trainer.global_step


HOOKS = ("on_train_batch_start", "on_train_batch_end")


def time_hooks(callbacks: list) -> dict[str, float]:
    """Wrap the per-step hooks of ``callbacks``; return a dict that accumulates their seconds."""
    spent: dict[str, float] = {}
    for cb in callbacks:
        name = type(cb).__name__
        spent[name] = 0.0
        for hook in HOOKS:
            original = getattr(cb, hook)

            def timed(*a, _original=original, _name=name, **k):
                start = time.perf_counter()
                try:
                    return _original(*a, **k)
                finally:
                    spent[_name] += time.perf_counter() - start

            setattr(cb, hook, timed)
    return spent


def methods() -> dict[str, functools.partial]:
    out = {"adam": functools.partial(torch.optim.Adam, lr=1e-3)}
    if importlib.util.find_spec("sdze_lightning.methods.sdze") is not None:
        from sdze_lightning.methods.sdze import SDZE

        out["sdze"] = functools.partial(SDZE, lr=1e-3, rank=4, queries=1)
    return out


def make_problem(args: argparse.Namespace, method) -> Poisson2D:
    return Poisson2D(
        net=MLP(2, width=args.width, depth=args.depth, seed=0),
        n_interior=args.n_interior,
        n_boundary=args.n_boundary,
        n_eval=1024,
        steps_per_epoch=args.val_every,
        method=method,
    )


def callback_sets(args: argparse.Namespace, tmp: Path) -> dict[str, list]:
    def default():
        return [MemoryMonitor(), PINNProgressBar()]

    return {
        "none": lambda: [],
        "default": default,
        "diagnostics": lambda: (
            default()
            + [
                EstimatorVarianceMonitor(every_n_steps=args.variance_every, probes=args.probes),
                SolutionPlot(every_n_steps=args.plot_every, dirpath=tmp / "plots"),
            ]
        ),
    }


def fit(args, method, callbacks, tmp: Path) -> tuple[float, L.Trainer, Poisson2D]:
    problem = make_problem(args, method)
    clock = StepClock()
    trainer = L.Trainer(
        max_steps=args.steps,
        max_epochs=-1,
        logger=L.pytorch.loggers.CSVLogger(tmp, name="csv"),
        callbacks=[*callbacks, clock],
        enable_checkpointing=False,
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=args.log_every,
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp,
    )
    trainer.fit(problem)
    return clock.seconds / max(clock.steps, 1), trainer, problem


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--n-interior", type=int, default=1000)
    parser.add_argument("--n-boundary", type=int, default=200)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--variance-every", type=int, default=100)
    parser.add_argument("--plot-every", type=int, default=100)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.rounds, args.width, args.depth = 8, 1, 16, 2
        args.n_interior, args.n_boundary, args.val_every, args.log_every = 64, 16, 4, 2
        args.variance_every, args.plot_every, args.probes = 4, 4, 2
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict:
    """Measure with parsed ``args``; see the module docstring."""
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="callbacks_cost_"))

    # 1. overhead of the callback sets (Adam), interleaved rounds. The it/s ratio
    # is noisy on a shared machine, so the time spent inside each callback's
    # per-step hooks (main thread) is measured too, as a fraction of the run.
    sets = callback_sets(args, tmp)
    per_step: dict[str, list[float]] = {name: [] for name in sets}
    ratios: dict[str, list[float]] = {name: [] for name in sets}
    hook_share: dict[str, dict[str, list[float]]] = {name: {} for name in sets}
    adam = methods()["adam"]
    for r in range(args.rounds):
        for name, build in sets.items():
            callbacks = build()
            spent = time_hooks(callbacks)
            sec, trainer, _ = fit(args, adam, callbacks, tmp / f"{name}{r}")
            per_step[name].append(sec)
            ratios[name].append(per_step["none"][-1] / sec)
            total = sec * trainer.global_step
            for cb_name, seconds in spent.items():
                hook_share[name].setdefault(cb_name, []).append(seconds / total)
            print(f"round {r} {name}: {1 / sec:.1f} it/s", flush=True)
    rows = [
        {
            "callbacks": name,
            "s_per_step": statistics.median(per_step[name]),
            "it_per_s": 1 / statistics.median(per_step[name]),
            "throughput_vs_none": statistics.median(ratios[name]),
            "throughput_vs_none_min": min(ratios[name]),
            "throughput_vs_none_max": max(ratios[name]),
            "hook_time_share": {k: statistics.median(v) for k, v in hook_share[name].items()},
        }
        for name in sets
    ]

    # 2. probe and plot cost relative to one training step
    probe_rows = []
    for mname, method in methods().items():
        step_sec, trainer, problem = fit(args, method, [], tmp / f"probe_{mname}")
        opt = trainer.optimizers[0]
        for compare in (False, True):
            monitor = EstimatorVarianceMonitor(probes=args.probes, zo=True, compare_crns=compare)
            step = trainer.global_step
            sec = median_time(functools.partial(monitor.measure, problem, opt, step), 3)
            probe_rows.append(
                {
                    "method": mname,
                    "part": f"variance (spatial + zo, compare_crns={compare})",
                    "extra_loss_evaluations": (3 if compare else 2) * args.probes,
                    "extra_residual_estimates": monitor.spatial_seeds,
                    "seconds": sec,
                    "vs_training_step": sec / step_sec,
                }
            )
        spatial = EstimatorVarianceMonitor(zo=False)
        sec = median_time(functools.partial(spatial.measure, problem, opt, 0), 3)
        probe_rows.append(
            {
                "method": mname,
                "part": "variance (spatial only)",
                "extra_loss_evaluations": 0,
                "extra_residual_estimates": spatial.spatial_seeds,
                "seconds": sec,
                "vs_training_step": sec / step_sec,
            }
        )
        plot = SolutionPlot(resolution=64, dirpath=tmp / "plots")
        sec = median_time(functools.partial(plot.plot, trainer, problem), 3)
        probe_rows.append(
            {
                "method": mname,
                "part": "solution plot (64x64 grid, PNG)",
                "extra_loss_evaluations": 0,
                "extra_residual_estimates": 0,
                "seconds": sec,
                "vs_training_step": sec / step_sec,
            }
        )
        print(f"{mname}: one training step {step_sec * 1e3:.2f} ms", flush=True)
    for row in probe_rows:
        ratio = row["vs_training_step"]
        print(f"{row['method']:5s} {row['part']:45s} {ratio:8.1f} steps", flush=True)
    for row in rows:
        print(
            f"{row['callbacks']:12s} {row['it_per_s']:8.1f} it/s, per-round ratio to none "
            f"{row['throughput_vs_none']:.3f} (range {row['throughput_vs_none_min']:.3f}-"
            f"{row['throughput_vs_none_max']:.3f}); share of run time in per-step hooks: "
            + ", ".join(f"{k} {v:.2%}" for k, v in row["hook_time_share"].items()),
            flush=True,
        )

    suffix = "_smoke" if args.smoke else ""
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "overhead": rows,
        "probe_cost": probe_rows,
    }
    (args.out / f"callbacks_cost{suffix}.json").write_text(json.dumps(result, indent=2))
    write_csv(args.out / f"callbacks_cost{suffix}.csv", probe_rows)
    return result


if __name__ == "__main__":
    main()
