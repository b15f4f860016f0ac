"""``RunSummary``: the one-line result of a run, as JSON.

At the end of ``fit`` (or when it stops on an exception) the callback writes
``summary.json`` with the final relative L2 error, loss, step count, wall time,
peak memory, parameter count, intra-op thread count and fused-kernel use, and prints the
same JSON as the last line of the run's output, so that a sweep can be collected with ``grep``
or ``jq``. With a ``WandbLogger`` every field also goes into the W&B run's summary.

A resumed run (``trainer.fit(..., ckpt_path=...)``) adds to the summary it finds:
``steps`` and ``wall_time_s`` are cumulative, and ``segments`` lists each command's
first and last step, wall time and status. A run stopped by
:class:`~sdze_lightning.callbacks.GracefulInterrupt` has status ``"interrupted"``
and its last metrics; ``logger_failures`` names every logger method that failed.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from sdze_lightning.callbacks.memory import cuda_peak_bytes, peak_rss_bytes

from sdze_lightning.kernels import fused_report
from sdze_lightning.loggers import logger_failures, update_wandb_summary


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak GPU memory allocated on CUDA, else the process's peak resident set size.

    On CUDA, the peak across :class:`~sdze_lightning.callbacks.MemoryMonitor`'s per-step
    resets of torch's counter (:func:`~sdze_lightning.callbacks.memory.cuda_peak_bytes`),
    not the last step's. ``None`` where the operating system does not report the peak
    resident set size.
    """
    if device.type == "cuda":
        return cuda_peak_bytes(device)
    return peak_rss_bytes()


def _threads(pl_module: L.LightningModule) -> int:
    """The intra-op thread count the run trained with (torch's current one if unknown)."""
    used = getattr(pl_module, "intra_op_threads", None)
    return int(used) if used is not None else torch.get_num_threads()


class RunSummary(L.Callback):
    """Write ``summary.json`` into ``dirpath`` and print it when training ends.

    Args:
        dirpath: Directory of the run; defaults to ``trainer.default_root_dir``.
        filename: Name of the file.
        echo: Print the summary as one JSON line on stdout.

    """

    def __init__(
        self, dirpath: str | Path | None = None, filename: str = "summary.json", echo: bool = True
    ) -> None:
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.filename = filename
        self.echo = echo
        self.summary: dict[str, Any] | None = None
        self._start = 0.0
        self._start_step = 0
        self._earlier: list[dict[str, Any]] = []

    @property
    def path(self) -> Path | None:
        """Where the summary is (or will be) written."""
        return None if self.dirpath is None else self.dirpath / self.filename

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the wall clock."""
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir)
        self._start = time.perf_counter()
        self._earlier = self._earlier_segments() if trainer.ckpt_path else []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Note the first step of this segment (after a checkpoint is restored)."""
        self._start_step = int(trainer.global_step)

    def _earlier_segments(self) -> list[dict[str, Any]]:
        """Segments of the summary this resumed run continues (none if there is none)."""
        if self.path is None or not self.path.is_file():
            return []
        try:
            earlier = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        segments = earlier.get("segments")
        if segments is None:  # a summary written before segments were recorded
            segments = [{k: earlier.get(k) for k in ("steps", "wall_time_s", "status")}]
        return list(segments)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the summary of a completed (or gracefully interrupted) run."""
        interrupted = any(getattr(c, "interrupted", False) for c in trainer.callbacks)
        self._write(trainer, pl_module, "interrupted" if interrupted else "completed")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Write the summary of a run stopped by ``exception`` (e.g. a diverged loss)."""
        self._write(trainer, pl_module, f"failed: {type(exception).__name__}: {exception}")

    def collect(self, trainer: L.Trainer, pl_module: L.LightningModule, status: str) -> dict:
        """Return the summary as a dict (without writing it)."""
        rel_l2 = None
        compute = getattr(pl_module, "relative_l2_error", None)
        if callable(compute) and status in ("completed", "interrupted"):
            rel_l2 = compute()
        loss = getattr(pl_module, "last_loss", None)
        if loss is None:
            value = trainer.callback_metrics.get("train/loss")
            loss = float(value) if value is not None else None
        if loss is not None and not math.isfinite(loss):
            loss = None  # JSON has no NaN; the status says why
        segment = {
            "first_step": self._start_step,
            "steps": int(trainer.global_step),
            "wall_time_s": round(time.perf_counter() - self._start, 3),
            "status": status,
        }
        segments = [*self._earlier, segment]
        return {
            "rel_l2": rel_l2,
            "loss": loss,
            "steps": int(trainer.global_step),
            "wall_time_s": round(sum(s.get("wall_time_s") or 0.0 for s in segments), 3),
            "peak_memory_bytes": peak_memory_bytes(pl_module.device),
            "params": sum(p.numel() for p in pl_module.parameters()),
            "threads": _threads(pl_module),
            "status": status,
            # another summation order than the eager code: part of the run's record
            "fused_kernels": (None if getattr(pl_module, "fused_kernels", None) is None
                              else fused_report(pl_module.fused_kernels)),
            "segments": segments,
            "logger_failures": [f for lg in trainer.loggers for f in logger_failures(lg)],
        }

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, status: str) -> None:
        if self.summary is not None:  # already written (exception after fit end)
            return
        self.summary = self.collect(trainer, pl_module, status)
        if not trainer.is_global_zero:
            return
        # every field into a W&B run's summary; a failure is recorded, never raised
        for logger in trainer.loggers:
            update_wandb_summary(logger, self.summary)
        self.summary["logger_failures"] = [f for lg in trainer.loggers for f in logger_failures(lg)]
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.summary, indent=2) + "\n")
        if self.echo:
            print(json.dumps(self.summary), flush=True)
