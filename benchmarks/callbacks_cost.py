"""Cost of the callbacks on Poisson2D: training overhead and probing cost.

Measures, in one process (so the numbers are ratios, robust to a noisy machine):

1. seconds per training step of ``sdze-train pde=poisson2d method=adam`` with
   ``callbacks=none`` (and Lightning's own progress bar and checkpoint off:
   ``+trainer.enable_progress_bar=false +trainer.enable_checkpointing=false``),
   ``callbacks=default`` (checkpoint, memory monitor, rich progress bar) and
   ``callbacks=diagnostics`` (+ variance monitor + solution plots, both every
   ``--variance-every`` / ``--plot-every`` steps), runs interleaved over several rounds,
   median per set; and the time spent in each callback's per-step hooks;
2. the cost of one variance measurement and one solution plot relative to one
   training step, for Adam and SDZE (``method=adam``, ``method=sdze``), with the number of
   extra loss / residual evaluations per measurement; the monitor and the plot are the
   ``callbacks=diagnostics`` group's (``zo`` and ``compare_crns`` set per part).

Every run is ``sdze-train`` itself (:func:`sdze_lightning.cli.train` on the packaged config
composed with the run's overrides, in a temporary run directory, with a clock callback
added); the rest of the configuration is the packaged default (Poisson 2D, MLP, exact
Laplacian, CSV logger, ``sdze-train``'s validation cadence). A step's time runs from its
batch start to its batch end; validation is left out. ``--threads`` is ``threads=`` of every
run (and torch's count for part 2). Positional arguments are further overrides of every
run. Each row records its overrides and ``sdze-train`` command (``sdze_train_command``);
the results file records the run's provenance (date, commit, machine, load at start and
end, threads, the command line).

Usage:
    python benchmarks/callbacks_cost.py            # full (a few minutes)
    python benchmarks/callbacks_cost.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from _common import (
    finish_provenance,
    median_time,
    merge_overrides,
    script_provenance,
    write_csv,
)
from hydra.utils import instantiate

from sdze_lightning.builders import compose_config
from sdze_lightning.cli import train

RESULTS = Path(__file__).resolve().parent / "results"

#: The methods of part 2.
METHODS = ("adam", "sdze")
#: The smoke mode's tiny problem and network (the numbers mean nothing).
SMOKE = ["model.width=16", "model.depth=2", "pde.n_interior=64", "pde.n_boundary=16",
         "pde.n_eval=64", "trainer.log_every_n_steps=2"]


class StepClock(L.Callback):
    """Seconds of the training steps (first batch start to last batch end, validation left
    out); keeps the trainer and the problem for part 2.

    With ``time_hooks``, the per-step hooks of the run's other callbacks are wrapped at
    ``on_fit_start`` and ``spent`` accumulates their seconds by class name.
    """

    def __init__(self, time_hooks: bool = False) -> None:
        self.time_hooks = time_hooks
        self.spent: dict[str, float] = {}
        self.start = 0.0
        self.end = 0.0
        self.validation = 0.0
        self.steps = 0
        self.trainer: L.Trainer | None = None
        self.problem: L.LightningModule | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.trainer, self.problem = trainer, pl_module
        if self.time_hooks:
            for cb in trainer.callbacks:
                if cb is not self:
                    wrap_hooks(cb, self.spent)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start == 0.0:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.end = time.perf_counter()
        self.steps = trainer.global_step

    def on_validation_start(self, trainer, pl_module) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.start and trainer.global_step < trainer.max_steps:  # inside the timed span
            self.validation += time.perf_counter() - self._validation_start

    @property
    def seconds(self) -> float:
        """Seconds of the training steps, in all."""
        return self.end - self.start - self.validation


HOOKS = ("on_train_batch_start", "on_train_batch_end")


def wrap_hooks(cb: L.Callback, spent: dict[str, float]) -> None:
    """Wrap the per-step hooks of ``cb``; ``spent[<class name>]`` accumulates their seconds."""
    name = type(cb).__name__
    spent.setdefault(name, 0.0)
    for hook in HOOKS:
        original = getattr(cb, hook)

        def timed(*a, _original=original, _name=name, **k):
            start = time.perf_counter()
            try:
                return _original(*a, **k)
            finally:
                spent[_name] += time.perf_counter() - start

        setattr(cb, hook, timed)


def callback_overrides(args: argparse.Namespace) -> dict[str, list[str]]:
    """The overrides of each callback set."""
    probes = [] if args.probes is None else [f"callbacks.variance.probes={args.probes}"]
    return {
        "none": ["callbacks=none", "+trainer.enable_progress_bar=false",
                 "+trainer.enable_checkpointing=false"],
        "default": ["callbacks=default"],
        "diagnostics": ["callbacks=diagnostics",
                        f"callbacks.variance.every_n_steps={args.variance_every}",
                        f"callbacks.plots.every_n_steps={args.plot_every}", *probes],
    }


def run_overrides(method: str, callbacks: list[str], args: argparse.Namespace) -> list[str]:
    """The ``sdze-train`` overrides of one run."""
    return merge_overrides(
        ["pde=poisson2d", f"method={method}", f"trainer.max_steps={args.steps}",
         "trainer.accelerator=cpu", f"threads={args.threads}", *callbacks], args.extra)


def fit(overrides: list[str], run_dir: Path, time_hooks: bool = False) -> StepClock:
    """Train like ``sdze-train <overrides> hydra.run.dir=<run_dir>``; return the clock."""
    clock = StepClock(time_hooks)
    summary = train(compose_config(overrides, run_dir), run_dir, callbacks=[clock])
    if summary.get("status") != "completed":
        raise RuntimeError(f"sdze-train {shlex.join(overrides)}: {summary}")
    return clock


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="further overrides of every run")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variance-every", type=int, default=100)
    parser.add_argument("--plot-every", type=int, default=100)
    parser.add_argument("--probes", type=int, default=None,
                        help="callbacks.variance.probes (default: the packaged value)")
    parser.add_argument("--threads", type=int, default=1, help="threads= of every run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    record = script_provenance(__file__, argv)
    args.extra = list(args.overrides)
    if args.smoke:
        args.steps, args.rounds = 8, 1
        args.variance_every, args.plot_every, args.probes = 4, 4, 2
        args.extra = merge_overrides(SMOKE, args.extra)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args, record)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace, record: dict) -> dict:
    """Measure with parsed ``args``; see the module docstring."""
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="callbacks_cost_"))

    # 1. overhead of the callback sets (Adam), interleaved rounds. The it/s ratio
    # is noisy on a shared machine, so the time spent inside each callback's
    # per-step hooks (main thread) is measured too, as a fraction of the run.
    sets = callback_overrides(args)
    per_step: dict[str, list[float]] = {name: [] for name in sets}
    ratios: dict[str, list[float]] = {name: [] for name in sets}
    hook_share: dict[str, dict[str, list[float]]] = {name: {} for name in sets}
    for r in range(args.rounds):
        for name, callbacks in sets.items():
            clock = fit(run_overrides("adam", callbacks, args), tmp / f"{name}{r}",
                        time_hooks=True)
            sec = clock.seconds / max(clock.steps, 1)
            per_step[name].append(sec)
            ratios[name].append(per_step["none"][-1] / sec)
            for cb_name, seconds in clock.spent.items():
                hook_share[name].setdefault(cb_name, []).append(seconds / clock.seconds)
            print(f"round {r} {name}: {1 / sec:.1f} it/s", flush=True)
    rows = []
    for name, callbacks in sets.items():
        overrides = run_overrides("adam", callbacks, args)
        rows.append({
            "callbacks": name,
            "s_per_step": statistics.median(per_step[name]),
            "it_per_s": 1 / statistics.median(per_step[name]),
            "throughput_vs_none": statistics.median(ratios[name]),
            "throughput_vs_none_min": min(ratios[name]),
            "throughput_vs_none_max": max(ratios[name]),
            "hook_time_share": {k: statistics.median(v) for k, v in hook_share[name].items()},
            "overrides": overrides,
            "sdze_train_command": shlex.join(["sdze-train", *overrides]),
        })

    # 2. probe and plot cost relative to one training step
    diagnostics = compose_config(run_overrides("adam", sets["diagnostics"], args),
                                 tmp / "probes")
    probe_rows = []
    for mname in METHODS:
        overrides = run_overrides(mname, sets["none"], args)
        clock = fit(overrides, tmp / f"probe_{mname}")
        step_sec = clock.seconds / max(clock.steps, 1)
        trainer, problem = clock.trainer, clock.problem
        opt = trainer.optimizers[0]
        common = {"overrides": overrides,
                  "sdze_train_command": shlex.join(["sdze-train", *overrides])}
        for compare in (False, True):
            monitor = instantiate(diagnostics.callbacks.variance, zo=True, compare_crns=compare)
            step = trainer.global_step
            sec = median_time(functools.partial(monitor.measure, problem, opt, step), 3)
            probe_rows.append(
                {
                    "method": mname,
                    "part": f"variance (spatial + zo, compare_crns={compare})",
                    "extra_loss_evaluations": (3 if compare else 2) * monitor.probes,
                    "extra_residual_estimates": monitor.spatial_seeds,
                    "seconds": sec,
                    "vs_training_step": sec / step_sec,
                    **common,
                }
            )
        spatial = instantiate(diagnostics.callbacks.variance, zo=False)
        sec = median_time(functools.partial(spatial.measure, problem, opt, 0), 3)
        probe_rows.append(
            {
                "method": mname,
                "part": "variance (spatial only)",
                "extra_loss_evaluations": 0,
                "extra_residual_estimates": spatial.spatial_seeds,
                "seconds": sec,
                "vs_training_step": sec / step_sec,
                **common,
            }
        )
        plot = instantiate(diagnostics.callbacks.plots)
        sec = median_time(functools.partial(plot.plot, trainer, problem), 3)
        probe_rows.append(
            {
                "method": mname,
                "part": f"solution plot ({plot.resolution}x{plot.resolution} grid, PNG)",
                "extra_loss_evaluations": 0,
                "extra_residual_estimates": 0,
                "seconds": sec,
                "vs_training_step": sec / step_sec,
                **common,
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
            f"{row['throughput_vs_none_max']:.3f}); share of step time in per-step hooks: "
            + ", ".join(f"{k} {v:.2%}" for k, v in row["hook_time_share"].items()),
            flush=True,
        )

    suffix = "_smoke" if args.smoke else ""
    result = finish_provenance({
        **record,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "overhead": rows,
        "probe_cost": probe_rows,
    })
    (args.out / f"callbacks_cost{suffix}.json").write_text(json.dumps(result, indent=2))
    write_csv(args.out / f"callbacks_cost{suffix}.csv", probe_rows)
    return result


if __name__ == "__main__":
    main()
