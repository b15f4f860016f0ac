"""``EstimatorVarianceMonitor``: log the noise of the spatial and zeroth-order estimates.

Every ``every_n_steps`` training steps the callback measures, at the current
parameters and without changing anything, what :mod:`sdze_lightning.variance`
describes (the interface a problem and an optimizer need is there too), and
logs it under ``prefix``:

* ``variance/residual``, ``variance/interior_loss``: the spatial estimator's
  noise across ``spatial_seeds`` seeds on ``spatial_points`` fresh interior
  points (any method, first-order included). Cost: ``spatial_seeds`` residual
  estimates on ``spatial_points`` points;
* ``variance/zo_grad``, ``variance/zo_proj`` and, with ``compare_crns=True``,
  ``variance/zo_grad_nocrns``, ``variance/zo_proj_nocrns`` and
  ``variance/zo_crns_ratio``: ``probes`` two-point gradient estimates (by
  default only when the optimizer is a
  :class:`~sdze_lightning.methods.zeroth_order.ZerothOrderOptimizer`; ``zo=True``
  forces it). Cost: ``2 * probes`` loss evaluations, plus ``probes`` with
  ``compare_crns`` (each one loss evaluation of the training batch, i.e. one
  forward pass with a forward-only estimator);
* ``variance/zo_grad_queries``, ``variance/zo_proj_queries``: across the ``q``
  queries of the step just taken, at no extra cost, when ``q >= 2``;
* ``variance/probe_seconds``: the wall time of each measurement.

A measurement the module cannot support is skipped with one warning.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

import lightning as L
import torch
from torch import nn

from sdze_lightning.methods.base import is_zeroth_order
from sdze_lightning.seeding import Stream, mix
from sdze_lightning.variance import (
    NotMeasurable,
    ProbeSettings,
    isolated_points,
    query_variance,
    spatial_variance,
    total_variance,
    zo_variance,
)

__all__ = ["EstimatorVarianceMonitor", "total_variance"]

log = logging.getLogger(__name__)


class EstimatorVarianceMonitor(L.Callback):
    """Log the variance of the spatial and zeroth-order gradient estimates.

    Args:
        every_n_steps: Measure after every ``every_n_steps``-th step. Rounded up
            to a multiple of ``trainer.log_every_n_steps`` (other values would be
            dropped by Lightning's logger connector); ``None`` uses that value.
        spatial_seeds: Estimator seeds for the spatial part (0 disables it).
        spatial_points: Interior points of the spatial part.
        zo: ``"auto"`` (only for zeroth-order optimizers), ``True`` or ``False``.
        probes: Two-point probes of the ZO part (at least 2).
        compare_crns: Also measure with CRNS off (one more evaluation per probe).
        eps: Perturbation size of the fallback probes; defaults to the
            optimizer's ``eps`` if it is zeroth-order, else ``1e-3`` (``1e-4`` in
            float64).
        seed: Seed of the callback's own generators.
        prefix: Prefix of the logged keys.

    """

    def __init__(
        self,
        every_n_steps: int | None = 100,
        spatial_seeds: int = 8,
        spatial_points: int = 256,
        zo: bool | str = "auto",
        probes: int = 8,
        compare_crns: bool = True,
        eps: float | None = None,
        seed: int = 0,
        prefix: str = "variance/",
    ) -> None:
        if every_n_steps is not None and every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}.")
        if spatial_seeds == 1 or spatial_seeds < 0:
            raise ValueError(f"spatial_seeds must be 0 (off) or at least 2, got {spatial_seeds}.")
        if spatial_points <= 0:
            raise ValueError(f"spatial_points must be positive, got {spatial_points}.")
        if zo not in ("auto", True, False):
            raise ValueError(f"zo must be 'auto', true or false, got {zo!r}.")
        if probes < 2:
            raise ValueError(f"probes must be at least 2 (a variance needs two), got {probes}.")
        if eps is not None and eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}.")
        self.every_n_steps = every_n_steps
        self.spatial_seeds = spatial_seeds
        self.spatial_points = spatial_points
        self.zo = zo
        self.probes = probes
        self.compare_crns = compare_crns
        self.eps = eps
        self.seed = seed
        self.prefix = prefix
        #: One dict per measurement: ``{"step": ..., <key>: value, ...}``.
        self.history: list[dict[str, float]] = []
        self._warned: set[str] = set()

    # ---------------------------------------------------------------- lightning
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Align the measurement period with the steps whose logs Lightning keeps."""
        every_log = trainer.log_every_n_steps or 1
        if self.every_n_steps is None:
            self.every_n_steps = every_log
        elif self.every_n_steps % every_log:
            aligned = math.ceil(self.every_n_steps / every_log) * every_log
            log.warning(
                "EstimatorVarianceMonitor: every_n_steps=%d is not a multiple of "
                "trainer.log_every_n_steps=%d, whose other steps' values Lightning drops; "
                "measuring every %d steps instead.",
                self.every_n_steps,
                every_log,
                aligned,
            )
            self.every_n_steps = aligned

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Measure and log on every ``every_n_steps``-th step."""
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps:
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        context = getattr(trainer.precision_plugin, "forward_context", contextlib.nullcontext)
        with context():
            values = self.measure(pl_module, optimizer, step)
        for key, value in values.items():
            pl_module.log(self.prefix + key, value, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ measuring
    def measure(
        self,
        pl_module: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        step: int = 0,
    ) -> dict[str, float]:
        """Measure at the current parameters; usable outside a ``Trainer``.

        Args:
            pl_module: The problem (interface in :mod:`sdze_lightning.variance`).
            optimizer: The optimizer in use, or ``None``.
            step: Step index; it seeds the probe points and directions.

        Returns:
            The measured values by key (without the prefix).

        """
        start = time.perf_counter()
        out: dict[str, float] = {}
        with isolated_points(pl_module), torch.no_grad():
            try:
                if self.spatial_seeds:
                    out.update(
                        spatial_variance(
                            pl_module, step, self.spatial_seeds, self.spatial_points, self.seed
                        )
                    )
            except NotMeasurable as skipped:
                self._warn_once(skipped)
            try:
                if self._want_zo(optimizer):
                    settings = ProbeSettings(self.probes, self.compare_crns, self.eps, self.seed)
                    out.update(zo_variance(pl_module, optimizer, step, settings))
            except NotMeasurable as skipped:
                self._warn_once(skipped)
            out.update(query_variance(optimizer))
        out["probe_seconds"] = time.perf_counter() - start
        self.history.append({"step": float(step), **out})
        return out

    def _want_zo(self, optimizer: torch.optim.Optimizer | None) -> bool:
        if self.zo == "auto":
            return optimizer is not None and is_zeroth_order(optimizer)
        return bool(self.zo)

    def _generator(self, device: torch.device, stream: Stream, *parts: int) -> torch.Generator:
        """The generator a measurement draws from for ``stream`` and ``parts`` (step, ...)."""
        return torch.Generator(device=device).manual_seed(mix(stream, self.seed, *parts))

    def _warn_once(self, skipped: NotMeasurable) -> None:
        if skipped.what not in self._warned:
            self._warned.add(skipped.what)
            log.warning(
                "EstimatorVarianceMonitor: no %s measurement: %s", skipped.what, skipped.why
            )
