"""``PINNProgressBar``: a ``rich`` progress bar showing the loss and relative L2 error."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme

#: Logged key -> label shown in the bar.
DEFAULT_METRICS: dict[str, str] = {"train/loss": "loss", "val/rel_l2": "rel_l2"}


class PINNProgressBar(RichProgressBar):
    """Lightning's :class:`~lightning.pytorch.callbacks.RichProgressBar` with PINN metrics.

    Shows the values logged with ``prog_bar=True`` under short labels in
    scientific notation (``loss: 3.142e-03 rel_l2: 1.200e-02``), the
    training loss and the relative L2 error first. The relative L2 error
    appears after the first validation.

    Per-step work is kept small: the bar and its metrics are updated every
    ``update_every_n_steps`` steps (and on the last step of an epoch) instead of
    after every step, and rich redraws at most ``refresh_rate`` times a second.

    Args:
        refresh_rate: Redraws per second (rich's ``refresh_per_second``).
        update_every_n_steps: Steps between updates of the bar and its metrics.
        leave: Keep the finished bar on screen.
        metrics: Logged key -> label, shown in this order.
        fmt: Format specification of the values.
        show_other_metrics: Also show every other progress-bar metric
            (``v_num`` excluded) under its logged name.
        theme: Rich theme; Lightning's default when ``None``.
        console_kwargs: Passed to ``rich.console.Console``.

    """

    def __init__(
        self,
        refresh_rate: int = 4,
        update_every_n_steps: int = 10,
        leave: bool = False,
        metrics: Mapping[str, str] | None = None,
        fmt: str = ".3e",
        show_other_metrics: bool = True,
        theme: RichProgressBarTheme | None = None,
        console_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            refresh_rate=refresh_rate,
            leave=leave,
            theme=theme or RichProgressBarTheme(),
            console_kwargs=console_kwargs,
        )
        if update_every_n_steps < 1:
            raise ValueError(f"update_every_n_steps must be positive, got {update_every_n_steps}.")
        self.update_every_n_steps = update_every_n_steps
        self.metrics = dict(DEFAULT_METRICS if metrics is None else metrics)
        self.fmt = fmt
        self.show_other_metrics = show_other_metrics

    def _format(self, value: Any) -> str:
        try:
            return format(float(value), self.fmt)
        except (TypeError, ValueError):
            return str(value)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Update the bar every ``update_every_n_steps`` steps and at the end of an epoch."""
        done = batch_idx + 1
        last = done >= self.total_train_batches or trainer.global_step >= trainer.max_steps > 0
        if done % self.update_every_n_steps == 0 or last or self.train_progress_bar_id is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning prints "Epoch 1/-2" for max_epochs=-1 (step-limited PINN runs).
        trainer = self.trainer
        text = f"Epoch {current_epoch}"
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            text += f"/{trainer.max_epochs - 1}"
        if trainer.max_steps is not None and trainer.max_steps > 0:
            text += f" (max_steps {trainer.max_steps})"
        return f"{text:{len(self.validation_description)}}"

    def get_metrics(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        """Return the items to display: the chosen metrics first, formatted."""
        items = dict(trainer.progress_bar_metrics)
        out: dict[str, int | str | float | dict[str, float]] = {}
        for key, label in self.metrics.items():
            if key in items:
                out[label] = self._format(items.pop(key))
        if self.show_other_metrics:
            for key, value in items.items():
                if key != "v_num" and key not in out:
                    out[key] = self._format(value)
        return out
