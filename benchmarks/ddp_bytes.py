"""Bytes communicated per training step under DDP: SDZE, fused_adafactor and Adam.

Two CPU processes (gloo) on one machine, started like ``torchrun`` does (``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``): run without those variables, the script
starts the two workers itself and collects their result. Every collective issued through
``torch.distributed`` during a training step is counted
(:class:`~sdze_lightning.distributed.CommunicationCounter`); DDP's gradient all-reduce is made
visible through the Python ``allreduce_hook`` (the same communication as DDP's default).

Each row is built from the packaged configs: its problem as ``sdze-train`` builds it
(:func:`row_overrides`: ``pde``, ``model``, ``estimator`` and ``method`` overrides) and its
``Trainer`` from the ``trainer`` group (``trainer=ddp`` on two ranks, without logger,
callbacks, checkpoints or progress bar). A row records its overrides and the ``sdze-train``
command that runs the same configuration (``sdze_train_command``); the results file's
``meta`` records the run's provenance (date, commit, machine, load at start and end,
threads, the command line).

Expected: SDZE sends ``2 q`` float64 loss values per step (``16 q`` bytes) whatever the
parameter count; Adam sends the gradients (``P`` numbers per step); fused_adafactor sends
the points' back-propagated signals at the input layer (``N x width``), the directions'
(``K x width``) and the small layers' gradients, whatever ``d`` is.

For fused_adafactor each row also splits a rank's step into the closure (forward and
backward over its share) and the rest (the exchange and the input layer's update over the
whole batch, which every rank repeats), timed through the optimizer's step hooks.

    python benchmarks/ddp_bytes.py            # two-body Allen-Cahn, widths 16..1024, d=100 to 1e6
    python benchmarks/ddp_bytes.py --methods fused_adafactor   # those rows only
    python benchmarks/ddp_bytes.py --smoke    # Poisson 2D and small two-body rows (and start-up)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate

from sdze_lightning.builders import build_problem
from sdze_lightning.distributed import CommunicationCounter
from sdze_lightning.validation import validation_cadence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by path
from _common import (  # noqa: E402
    compose_overrides,
    finish_provenance,
    script_provenance,
    write_csv,
)

RESULTS = Path(__file__).resolve().parent / "results"
WORLD = 2
#: The Lightning extras every row turns off (no files, no console output).
QUIET = ["logger=none", "callbacks=none", "+trainer.enable_checkpointing=false",
         "+trainer.enable_progress_bar=false"]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny configuration")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods to run (default: all); results go to "
                             "ddp_bytes_<methods>.json")
    return parser.parse_args(argv)


def configs(smoke: bool) -> list[dict]:
    """(problem, dim, width, method, queries) rows."""
    if smoke:
        rows = [dict(problem="poisson2d", dim=2, width=w, depth=2, method=m, queries=2)
                for m in ("sdze", "adam") for w in (8, 64)]
        # fused_adafactor: with boundary points (Poisson), and two input sizes (two-body);
        # 33 interior points give shares of 17 and 16
        rows.append(dict(problem="poisson2d", dim=2, width=8, depth=2,
                         method="fused_adafactor", queries=0))
        rows += [dict(problem="twobody", dim=dim, width=16, depth=2, method="fused_adafactor",
                      queries=0, n_interior=33, directions=dist)
                 for dim, dist in ((16, "rademacher"), (512, "rademacher"), (16, "coordinate"))]
        return rows
    rows = [dict(problem="twobody", dim=100, width=w, depth=2, method=m, queries=q)
            for w in (16, 64, 256, 1024) for m, q in (("sdze", 1), ("sdze", 4), ("adam", 0))]
    rows += [dict(problem="twobody", dim=10_000, width=128, depth=2, method=m, queries=q)
             for m, q in (("sdze", 1), ("adam", 0))]
    rows += [dict(problem="twobody", dim=dim, width=128, depth=2, method="fused_adafactor",
                  queries=0) for dim in (100, 10_000, 1_000_000)]
    return rows


def key(cfg: dict) -> str:
    """A row's name: method, queries, dimension, width (and directions where not the default)."""
    name = f"{cfg['method']}-q{cfg['queries']}-d{cfg['dim']}-w{cfg['width']}"
    return name + (f"-{cfg['directions']}" if "directions" in cfg else "")


def method_overrides(cfg: dict) -> list[str]:
    """The ``method`` overrides of a row (learning rate 1e-2; SDZE at rank 2, period 4)."""
    if cfg["method"] == "sdze":
        return ["method=sdze", "method.lr=1e-2", "method.rank=2", "method.period=4",
                f"method.queries={cfg['queries']}"]
    return [f"method={cfg['method']}", "method.lr=1e-2"]


def row_overrides(cfg: dict) -> list[str]:
    """The problem's ``sdze-train`` overrides of a row: ``pde``, ``model``, ``estimator``
    (Taylor jets on 2 directions) and ``method``.

    Poisson 2D gets 33 interior and 7 boundary points (shares of unequal size, 17/16 and
    4/3, on 2 ranks); two-body Allen-Cahn the row's ``n_interior`` (64 by default).
    """
    if cfg["problem"] == "poisson2d":
        pde = ["pde=poisson2d", "pde.n_interior=33", "pde.n_boundary=7"]
    else:
        pde = ["pde=allen_cahn_twobody", f"pde.dim={cfg['dim']}",
               f"pde.n_interior={cfg.get('n_interior', 64)}"]
    return [*pde, f"model.width={cfg['width']}", f"model.depth={cfg['depth']}",
            "estimator=taylor", "estimator.num_directions=2",
            f"estimator.distribution={cfg.get('directions', 'rademacher')}",
            *method_overrides(cfg)]


def trainer_overrides(devices: int, steps: int, precision: str) -> list[str]:
    """The ``trainer`` overrides of a fit on ``devices`` CPU processes (``trainer=ddp`` on
    more than one), with the :data:`QUIET` extras."""
    ddp = [] if devices == 1 else ["trainer=ddp"] + (
        [] if devices == WORLD else [f"trainer.devices={devices}"])
    return [*ddp, "trainer.accelerator=cpu", f"trainer.max_steps={steps}",
            f"trainer.precision={precision}", *QUIET]


def make_problem(cfg: dict, *extra: str):
    """The problem of a row, as ``sdze-train`` builds it from :func:`row_overrides` (and
    ``extra`` overrides, e.g. ``prefetch=true``); the smoke rows are the ones
    tests/integration/test_ddp.py checks."""
    return build_problem(compose_overrides([*row_overrides(cfg), *extra]))


def trainer(devices: int, steps: int, precision: str, callbacks=()) -> L.Trainer:
    """The ``Trainer`` of :func:`trainer_overrides`, from the packaged ``trainer`` group
    with ``sdze-train``'s validation cadence; ``callbacks`` are its only callbacks."""
    cfg = compose_overrides(trainer_overrides(devices, steps, precision))
    return instantiate(cfg.trainer, logger=False, callbacks=list(callbacks),
                       **validation_cadence(cfg.trainer))


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


class StepBytes(L.Callback):
    """Payload bytes and calls of the collectives issued during each training step.

    With ``time_optimizer``, the optimizer's step hooks also record the seconds of each
    ``optimizer.step`` and of the closure it runs (``closure_seconds``, ``step_seconds``).
    """

    def __init__(self, counter: CommunicationCounter, hook: bool,
                 time_optimizer: bool = False) -> None:
        self.counter = counter
        self.hook = hook
        self.time_optimizer = time_optimizer
        self.bytes: list[int] = []
        self.calls: list[int] = []
        self.seconds: list[float] = []
        self.closure_seconds: list[float] = []
        self.step_seconds: list[float] = []
        self.shard: tuple[int, int] = (0, 1)

    def on_fit_start(self, trainer, pl_module):
        if self.hook:  # gradient buckets through Python, so that they are counted
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            trainer.strategy.model.register_comm_hook(None, allreduce_hook)
        if self.time_optimizer:
            opt = trainer.optimizers[0]
            opt.register_step_pre_hook(self._before_step)
            opt.register_step_post_hook(self._after_step)

    def _before_step(self, optimizer, args, kwargs):
        """Start the step's clock; hand the step a closure that times itself."""
        self._step_start = time.perf_counter()
        closure = kwargs.get("closure")
        if closure is None:
            return None

        def timed():
            start = time.perf_counter()
            out = closure()
            self.closure_seconds.append(time.perf_counter() - start)
            return out

        request = kwargs.get("request")  # a method that declares its needs reads the closure there
        if request is not None:
            kwargs = {**kwargs, "request": dataclasses.replace(request, closure=timed)}
        return args, {**kwargs, "closure": timed}

    def _after_step(self, optimizer, args, kwargs):
        self.step_seconds.append(time.perf_counter() - self._step_start)

    def on_train_batch_start(self, *args):
        self._start = self.counter.snapshot()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *args):
        b, c = self.counter.snapshot()
        self.bytes.append(b - self._start[0])
        self.calls.append(c - self._start[1])
        self.seconds.append(time.perf_counter() - self._t)
        self.shard = (pl_module.shard.rank, pl_module.shard.world_size)


def measure(cfg: dict, steps: int, precision: str) -> tuple[dict, list[torch.Tensor]]:
    """One DDP fit (inside the worker processes): the row and the final parameters."""
    problem = make_problem(cfg)
    fused = cfg["method"] == "fused_adafactor"
    overrides = [*row_overrides(cfg), *trainer_overrides(WORLD, steps, precision)]
    with CommunicationCounter() as counter:
        cb = StepBytes(counter, hook=cfg["method"] in ("adam", "fused_adafactor"),
                       time_optimizer=fused)
        trainer(WORLD, steps, precision, [cb]).fit(problem)
    params = sum(p.numel() for p in problem.net.parameters())
    row = dict(cfg, params=params, precision=precision, steps=steps,
               bytes_per_step=cb.bytes, calls_per_step=cb.calls,
               bytes_per_param=round(max(cb.bytes) / params, 6),
               seconds_per_step=round(median(cb.seconds), 5),
               shard=list(cb.shard), overrides=overrides,
               sdze_train_command=shlex.join(["sdze-train", *overrides]))
    if fused:  # the first step also fits the row statistic
        closure, total = cb.closure_seconds[1:], cb.step_seconds[1:]
        row["closure_seconds"] = round(median(closure), 5)
        row["update_seconds"] = round(median([t - c for t, c in zip(total, closure,
                                                                      strict=True)]), 5)
    return row, [p.detach().clone() for p in problem.net.parameters()]


def script_argv(args: argparse.Namespace) -> list[str]:
    """The options of this run, as typed after ``python benchmarks/ddp_bytes.py``."""
    return ((["--smoke"] if args.smoke else [])
            + (["--methods", args.methods] if args.methods else [])
            + (["--steps", str(args.steps)] if args.steps else []))


def worker(args: argparse.Namespace) -> tuple[list[dict], dict[str, list[torch.Tensor]]]:
    """Run every row in this (already launched) DDP process; rank 0 writes the results."""
    torch.set_num_threads(1)
    steps = args.steps or (6 if args.smoke else 5)
    precision = "64-true" if args.smoke else "32-true"
    rows, params = [], {}
    meta = script_provenance(__file__, script_argv(args))
    wanted = None if args.methods is None else set(args.methods.split(","))
    for cfg in configs(args.smoke):
        if wanted is not None and cfg["method"] not in wanted:
            continue
        row, final = measure(cfg, steps, precision)
        rows.append(row)
        params[key(cfg)] = final
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            split = (f" closure={row['closure_seconds']}s update={row['update_seconds']}s"
                     if "update_seconds" in row else "")
            print(f"{cfg['method']:5s} q={cfg['queries']} d={cfg['dim']:7d} "
                  f"width={cfg['width']:5d} params={row['params']:9d} "
                  f"bytes/step={max(row['bytes_per_step']):10d} "
                  f"calls/step={max(row['calls_per_step'])}{split}", flush=True)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        meta.update(threads=torch.get_num_threads(), world_size=WORLD)
        write(rows, finish_provenance(meta), args)
    return rows, params


def stem(args: argparse.Namespace) -> str:
    """The results file's name: what it holds."""
    name = "ddp_bytes_smoke" if args.smoke else "ddp_bytes"
    return name + ("_" + args.methods.replace(",", "_") if args.methods else "")


def write(rows: list[dict], meta: dict, args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem(args)}.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    keys = ["problem", "dim", "width", "depth", "params", "method", "queries", "precision",
            "bytes_per_param", "seconds_per_step", "closure_seconds", "update_seconds"]
    write_csv(args.out / f"{stem(args)}.csv",
              [{**{k: r.get(k, "") for k in keys}, "bytes_per_step": max(r["bytes_per_step"]),
                "calls_per_step": max(r["calls_per_step"]),
                "sdze_train_command": r["sdze_train_command"]}
               for r in rows])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, argv: list[str], timeout: float = 1800) -> list[str]:
    """Start ``WORLD`` processes of ``script`` as torchrun would; return their output."""
    port = str(free_port())
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, LOCAL_RANK=str(rank),
                   NODE_RANK="0", WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1",
                   PYTHONWARNINGS="ignore")
        procs.append(subprocess.Popen([sys.executable, script, *argv], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, text in zip(procs, logs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"DDP worker failed ({p.returncode}):\n{text[-4000:]}")
    return logs


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    if "LOCAL_RANK" in os.environ:  # a worker (started below, by torchrun, or by SLURM)
        return worker(args)[0]
    start = time.perf_counter()
    logs = launch(__file__, list(argv if argv is not None else sys.argv[1:]))
    print("\n".join(line for line in logs[0].splitlines() if "bytes/step" in line))
    rows = json.loads((args.out / f"{stem(args)}.json").read_text())["rows"]
    print(f"[{time.perf_counter() - start:.1f}s] wrote {args.out / stem(args)}.{{json,csv}}")
    return rows


if __name__ == "__main__":
    main()
