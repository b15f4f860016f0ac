"""Seed-replay log: a whole zeroth-order trajectory in a few bytes per step.

A two-point step is a function of the direction seeds (the method's seed and
the step index), the ``2 q`` loss values and the learning rate: given those,
the update needs no forward pass. :class:`SeedReplayLog` records, per step,
only ``(step, lr, 2 q loss values)`` as float64 (``16 + 16 q`` bytes) after an
initial checkpoint; :func:`replay` (console script ``sdze-replay``) rebuilds
the trained model from the initial checkpoint and the log, bit-identical on
the same device, dtype and torch build (CPU here).

File format (``replay.sdzelog``)::

    SDZE-REPLAY 1                      (one line)
    {JSON header}                      (one line)
    records: little-endian float64, 2 + 2 q numbers each
             (step, lr, L(+eps z_0), L(-eps z_0), ..., L(-eps z_{q-1}))

The header names the method, ``q``, dtype, seeds, the initial checkpoint
(relative to the log) and, for runs of ``sdze-train``, the resolved config, so
that ``sdze-replay LOG`` can rebuild the problem. A step skipped under
``divergence=skip`` has non-finite values and is replayed as skipped. A
truncated last record (a killed process) is ignored; after a resume, the
records from the resumed step on are dropped and written again.

Under DDP the values are the all-reduced ones, identical on every rank; rank 0
writes the log and one process replays it.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import torch
from torch import Tensor

from sdze_lightning.methods.zeroth_order import TwoPointOptimizer

log = logging.getLogger(__name__)

MAGIC = b"SDZE-REPLAY 1\n"
#: Default file names inside the log's directory.
LOG_NAME, INITIAL_NAME = "replay.sdzelog", "initial.ckpt"


def check_replayable(method: Any) -> None:
    """Raise ``ValueError`` unless ``method`` (class, partial or instance) is a two-point method."""
    target = method
    while isinstance(target, functools.partial):
        target = target.func
    ok = isinstance(target, TwoPointOptimizer) or (
        isinstance(target, type) and issubclass(target, TwoPointOptimizer)
    )
    if not ok:
        name = getattr(target, "__name__", type(target).__name__)
        raise ValueError(
            f"replay_log=true needs a zeroth-order two-point method (sdze, mezo), got {name}: "
            "first-order updates depend on full gradients, not on a few loss values."
        )


def _two_point(trainer: L.Trainer) -> TwoPointOptimizer:
    opts = [getattr(o, "optimizer", o) for o in trainer.optimizers]
    if len(opts) != 1 or not isinstance(opts[0], TwoPointOptimizer):
        names = [type(o).__name__ for o in opts]
        raise ValueError(
            f"The seed-replay log needs one zeroth-order two-point method (sdze, mezo); got "
            f"{names}. First-order updates depend on full gradients: disable replay_log."
        )
    return opts[0]


def _method_path(opt: TwoPointOptimizer) -> str:
    return f"{type(opt).__module__}:{type(opt).__qualname__}"


@dataclass
class ReplayRecords:
    """A parsed log.

    Attributes:
        header: The JSON header.
        records: Float64 tensor ``(steps, 2 + 2 q)``: step, lr, loss values.

    """

    header: dict[str, Any]
    records: Tensor

    @property
    def steps(self) -> Tensor:
        """Step indices, ``(steps,)`` int64."""
        return self.records[:, 0].to(torch.int64)


def read_log(path: str | Path) -> ReplayRecords:
    """Parse a seed-replay log (a truncated last record is ignored)."""
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path} is not a seed-replay log (missing {MAGIC!r}).")
    end = data.index(b"\n", len(MAGIC))
    header = json.loads(data[len(MAGIC) : end])
    width = 2 + 2 * int(header["queries"])
    body = data[end + 1 :]
    usable = len(body) // (8 * width) * 8 * width
    values = array("d")
    values.frombytes(body[:usable])
    if sys.byteorder != "little":
        values.byteswap()
    records = torch.tensor(values.tolist(), dtype=torch.float64).reshape(-1, width)
    return ReplayRecords(header, records)


class SeedReplayLog(L.Callback):
    """Record the seed-replay log of a zeroth-order run (config key ``replay_log: true``).

    At the start of training (step 0) it saves the initial checkpoint; after
    every optimizer step it appends ``(step, lr, loss values)``. Under DDP
    every rank saves the checkpoint collectively and rank 0 writes the log.

    Args:
        dirpath: Directory of the log and the initial checkpoint; defaults to
            ``<trainer.default_root_dir>/replay``.
        config: Resolved run config stored in the header (``sdze-train`` passes it),
            so that ``sdze-replay`` can rebuild the problem.

    """

    def __init__(self, dirpath: str | Path | None = None, config: dict | None = None) -> None:
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.config = config
        self._file: BinaryIO | None = None
        self._opt: TwoPointOptimizer | None = None

    @property
    def path(self) -> Path | None:
        """Path of the log file (known once training started)."""
        return None if self.dirpath is None else self.dirpath / LOG_NAME

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save the initial checkpoint and open the log (or continue it after a resume)."""
        self._opt = _two_point(trainer)
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "replay"
        step = int(trainer.global_step)
        if step == 0:
            trainer.save_checkpoint(self.dirpath / INITIAL_NAME)  # collective under DDP
        if not trainer.is_global_zero:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        if step == 0:
            self._file = open(self.path, "wb")  # noqa: SIM115 - kept open for the run
            self._file.write(MAGIC + json.dumps(self._header(pl_module)).encode() + b"\n")
            self._file.flush()
            return
        if not self.path.exists() or not (self.dirpath / INITIAL_NAME).exists():
            log.warning(
                "Resumed at step %d without a seed-replay log from step 0 in %s: not recording.",
                step,
                self.dirpath,
            )
            self._opt = None
            return
        self._file = self._truncate_from(step)

    def _header(self, pl_module: L.LightningModule) -> dict[str, Any]:
        opt = self._opt
        weight = next(pl_module.parameters())
        return {
            "format": 1,
            "method": _method_path(opt),
            "queries": opt.queries,
            "method_seed": opt.seed,
            "seed": getattr(pl_module, "seed", None),
            "dtype": str(weight.dtype).removeprefix("torch."),
            "device": weight.device.type,
            "world_size": int(pl_module.trainer.world_size),
            "initial_checkpoint": INITIAL_NAME,
            "config": self.config,
        }

    def _truncate_from(self, step: int) -> BinaryIO:
        """Keep the records before ``step`` (a resumed run writes the rest again)."""
        parsed = read_log(self.path)
        data = self.path.read_bytes()
        start = data.index(b"\n", len(MAGIC)) + 1
        keep = int((parsed.steps < step).sum())
        width = parsed.records.shape[1]
        f = open(self.path, "r+b")  # noqa: SIM115 - kept open for the run
        f.truncate(start + keep * 8 * width)
        f.seek(0, 2)
        return f

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        """Append the record of the step just taken (applied or skipped)."""
        opt = self._opt
        if self._file is None or opt is None or opt.last_step != trainer.global_step - 1:
            return
        values = opt.last_values
        if values is None:  # the closure raised before the values existed: a skipped step
            values = torch.full((opt.queries, 2), math.nan, dtype=torch.float64)
        row = array("d", [float(opt.last_step), float(opt.last_lr)])
        row.extend(float(v) for v in values.reshape(-1).tolist())
        if sys.byteorder != "little":
            row.byteswap()
        self._file.write(row.tobytes())
        self._file.flush()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Close the log."""
        self._close()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Close the log (its records end with the last completed step)."""
        self._close()


def _optimizer_of(problem: L.LightningModule) -> TwoPointOptimizer:
    conf = problem.configure_optimizers()
    opt = conf["optimizer"] if isinstance(conf, dict) else conf
    if isinstance(opt, list | tuple):
        opt = opt[0]
    if not isinstance(opt, TwoPointOptimizer):
        raise ValueError(f"Replay needs a two-point zeroth-order method, got {type(opt).__name__}.")
    return opt


def replay(
    problem: L.LightningModule,
    log_path: str | Path,
    initial: str | Path | None = None,
    steps: int | None = None,
    fold: bool = True,
) -> TwoPointOptimizer:
    """Rebuild a trained model from its initial checkpoint and seed-replay log.

    Args:
        problem: A problem built like the recorded one (same network, method
            and seeds; its weights are overwritten).
        log_path: The log.
        initial: The initial checkpoint; defaults to the one named in the header.
        steps: Replay only the steps before this index (default: all).
        fold: Fold the method's offset into the weights at the end, as training
            does in ``on_train_end``.

    Returns:
        The method, in the state after the last replayed step.

    """
    parsed = read_log(log_path)
    header = parsed.header
    initial = Path(initial) if initial else Path(log_path).parent / header["initial_checkpoint"]
    problem.to(dtype=getattr(torch, header["dtype"]), device="cpu")
    ckpt = torch.load(initial, map_location="cpu", weights_only=True)
    problem.load_state_dict(ckpt["state_dict"])
    opt = _optimizer_of(problem)
    if _method_path(opt) != header["method"] or opt.queries != header["queries"]:
        raise ValueError(
            f"The log was recorded with {header['method']} (q={header['queries']}); the problem "
            f"builds {_method_path(opt)} (q={opt.queries})."
        )
    if opt.seed != header["method_seed"]:
        raise ValueError(f"The log was recorded with method.seed={header['method_seed']}.")
    opt.load_state_dict(ckpt["optimizer_states"][0])
    for row in parsed.records:
        step = int(row[0])
        if steps is not None and step >= steps:
            break
        if step < opt.zo_state["step"]:
            continue
        if step != opt.zo_state["step"]:
            raise ValueError(f"The log has no record of step {opt.zo_state['step']}.")
        opt.replay_step(row[2:], float(row[1]))
    if steps is not None and opt.zo_state["step"] != steps:
        raise ValueError(f"The log ends at step {opt.zo_state['step']}, before step {steps}.")
    if fold and callable(getattr(opt, "fold", None)):
        opt.fold()
    return opt


def _build_from_config(config: dict) -> L.LightningModule:
    from omegaconf import OmegaConf

    from sdze_lightning.builders import build_problem

    return build_problem(OmegaConf.create(config))


def _identical(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two (nested) state dicts hold the same keys, dtypes and values, bit for bit."""
    try:
        torch.testing.assert_close(a, b, rtol=0, atol=0, check_device=False)
    except (AssertionError, TypeError, ValueError):
        return False
    return True


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``sdze-replay LOG``: rebuild a trained model from its initial checkpoint and log."""
    parser = argparse.ArgumentParser(prog="sdze-replay", description=main.__doc__)
    parser.add_argument("log", type=Path, help="the seed-replay log (replay.sdzelog)")
    parser.add_argument("--initial", type=Path, help="initial checkpoint (default: from the log)")
    parser.add_argument("--out", type=Path, help="output (default: replayed.ckpt beside the log)")
    parser.add_argument("--steps", type=int, help="replay the steps before this index only")
    parser.add_argument("--no-fold", action="store_true", help="keep the offset unfolded")
    parser.add_argument(
        "--compare",
        type=Path,
        help="a checkpoint of the same run: replay up to its step (no fold) and report "
        "whether weights and method state are bit-identical",
    )
    args = parser.parse_args(argv)
    header = read_log(args.log).header
    if not header.get("config"):
        parser.error(
            "this log has no run config (not recorded by sdze-train); call "
            "sdze_lightning.replay.replay(problem, log) from Python instead."
        )
    problem = _build_from_config(header["config"])
    steps, fold = args.steps, not args.no_fold
    reference = None
    if args.compare is not None:
        reference = torch.load(args.compare, map_location="cpu", weights_only=True)
        steps, fold = int(reference["global_step"]), False
    opt = replay(problem, args.log, args.initial, steps=steps, fold=fold)
    out = args.out or args.log.parent / "replayed.ckpt"
    torch.save(
        {
            "state_dict": problem.state_dict(),
            "optimizer_states": [opt.state_dict()],
            "global_step": opt.zo_state["step"],
            "folded": fold,
        },
        out,
    )
    result: dict[str, Any] = {"steps": opt.zo_state["step"], "out": str(out), "folded": fold}
    if reference is not None:
        result["identical_weights"] = _identical(problem.state_dict(), reference["state_dict"])
        result["identical_method_state"] = _identical(
            opt.state_dict()["state"], reference["optimizer_states"][0]["state"]
        )
    print(json.dumps(result), flush=True)
    return result


def console() -> None:
    """Console-script entry point (exit status 1 when ``--compare`` finds a difference)."""
    result = main()
    if result.get("identical_weights") is False or result.get("identical_method_state") is False:
        sys.exit(1)


if __name__ == "__main__":
    console()
