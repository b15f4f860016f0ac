"""Lightning overhead: `sdze-train`'s Trainer vs a plain PyTorch loop doing the same work.

Both loops train the same Poisson2D problem (same network, points, estimator and
optimizer, built from the packaged Hydra config); the Lightning side runs with the
default callbacks (`callbacks=default`) and logger (`logger=csv`). Steady-state
throughput is measured after a warm-up, alternating the two loops in one process
so that machine noise hits both. Usage::

    python benchmarks/overhead.py                    # Poisson2D defaults (1000 + 200 points)
    python benchmarks/overhead.py --n-interior 100   # a smaller step: overhead weighs more
    python benchmarks/overhead.py --smoke
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import lightning as L
import torch
from _common import RESULTS, finish_provenance, script_provenance
from hydra.utils import instantiate

from sdze_lightning.cli import build_callbacks, build_loggers, build_problem, compose_config
from sdze_lightning.methods import build_optimizer


class _StepClock(L.Callback):
    """Wall time from the start of step `warmup` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.t0 = self.t1 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: D102
        if trainer.global_step == self.warmup:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: D102
        self.t1 = time.perf_counter()


def lightning_its(overrides: list[str], steps: int, warmup: int) -> float:
    """Steady-state it/s of the CLI's Trainer with default callbacks and logger."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose_config([*overrides, f"trainer.max_steps={steps}"], run_dir)
        problem = build_problem(cfg)
        clock = _StepClock(warmup)
        trainer = instantiate(
            cfg.trainer, logger=build_loggers(cfg), callbacks=[*build_callbacks(cfg), clock]
        )
        trainer.fit(problem)
    return (steps - warmup) / (clock.t1 - clock.t0)


def plain_its(overrides: list[str], steps: int, warmup: int) -> float:
    """Steady-state it/s of a hand-written loop over the same problem object."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose_config([*overrides, f"trainer.max_steps={steps}"], run_dir)
        problem = build_problem(cfg)
    opt = build_optimizer(problem.method, problem.net)
    t0 = 0.0
    for step in range(steps):
        if step == warmup:
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = problem.compute_loss(step)
        loss.backward()
        opt.step()
        float(loss.detach())  # the Lightning side also reads the loss every step
    return (steps - warmup) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-interior", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="a few steps, for the tests")
    args = parser.parse_args(argv)
    record = script_provenance(__file__, argv)
    if args.smoke:
        args.steps, args.warmup, args.repeats = 12, 2, 1
    overrides = ["pde=poisson2d", "logger=csv", "callbacks=default"]
    if args.n_interior:
        overrides.append(f"pde.n_interior={args.n_interior}")
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    for rep in range(args.repeats):
        plain = plain_its(overrides, args.steps, args.warmup)
        light = lightning_its(overrides, args.steps, args.warmup)
        rows.append(
            {"repeat": rep, "plain_its": plain, "lightning_its": light, "ratio": light / plain}
        )
        print(
            f"repeat {rep}: plain {plain:.1f} it/s, lightning {light:.1f} it/s, "
            f"ratio {light / plain:.3f}",
            flush=True,
        )
    ratios = sorted(r["ratio"] for r in rows)
    result = finish_provenance({
        **record,
        "threads": torch.get_num_threads(),
        "overrides": overrides,
        "steps": args.steps,
        "rows": rows,
        "median_ratio": ratios[len(ratios) // 2],
    })
    if not args.smoke:
        RESULTS.mkdir(exist_ok=True)
        name = f"overhead_n{args.n_interior or 'default'}.json"
        (RESULTS / name).write_text(json.dumps(result, indent=2))
    print(json.dumps({"median_ratio": result["median_ratio"]}))
    return result


if __name__ == "__main__":
    main()
