"""``ElapsedTime``: the run's wall clock next to its validation error.

At the end of every validation the callback logs ``time/wall_s``, the wall-clock
seconds the run has trained so far, in the same logger row (and step) as
``val/rel_l2``: error against time, the axis on which methods compete. The total is
part of the callback's checkpoint state, so a resumed run continues from the time its
checkpoint was written.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L

#: The logged metric.
METRIC = "time/wall_s"


class ElapsedTime(L.Callback):
    """Log :data:`METRIC`, cumulative training wall-clock seconds, whenever validation ends.

    Attributes:
        earlier_s: Seconds trained by the earlier segments of a resumed run.

    """

    def __init__(self) -> None:
        self.earlier_s = 0.0
        self._start: float | None = None

    @property
    def seconds(self) -> float:
        """Seconds trained so far, earlier segments included."""
        running = 0.0 if self._start is None else time.perf_counter() - self._start
        return self.earlier_s + running

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start this segment's clock (a checkpoint's total is restored before)."""
        self._start = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop the clock; a later ``fit`` continues from the total."""
        self.earlier_s, self._start = self.seconds, None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the seconds so far (the slowest process's under DDP)."""
        if trainer.sanity_checking or self._start is None:
            return
        pl_module.log(METRIC, self.seconds, sync_dist=True, reduce_fx="max")

    def state_dict(self) -> dict[str, Any]:
        """The total so far, saved in checkpoints."""
        return {"wall_s": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a checkpoint's total."""
        self.earlier_s = float(state_dict["wall_s"])
