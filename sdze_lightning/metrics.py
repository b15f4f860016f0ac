"""Metrics for PINN accuracy (``torchmetrics``, synchronised under DDP)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


class RelativeL2Error(Metric):
    """Relative L2 error ``||u_pred - u_ref|| / ||u_ref||`` over all updates.

    The states are the two sums of squares ``sum (u_pred - u_ref)^2`` and
    ``sum u_ref^2``, accumulated in float64 and reduced with ``sum`` across
    processes (``dist_reduce_fx="sum"``). The value over several batches, or
    over the shares of several DDP ranks, is therefore exactly the value on
    their union, not an average of per-batch or per-rank ratios.

    With an all-zero reference the ratio is undefined: ``compute`` returns
    ``nan`` (no error either) or ``inf``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0

    err_sq: Tensor
    ref_sq: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("err_sq", "ref_sq"):
            zero = torch.tensor(0.0, dtype=torch.float64)
            self.add_state(name, default=zero, dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Accumulate a batch of predictions and reference values of the same shape."""
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ.")
        if not (preds.is_floating_point() and target.is_floating_point()):
            raise TypeError(
                f"preds and target must be floating, got {preds.dtype} and {target.dtype}."
            )
        target = target.detach().double()
        self.err_sq += (preds.detach().double() - target).square().sum()
        self.ref_sq += target.square().sum()

    def compute(self) -> Tensor:
        """Return the relative L2 error."""
        return (self.err_sq / self.ref_sq).sqrt()
