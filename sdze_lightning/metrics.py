"""Metrics for PINN accuracy (``torchmetrics``, synchronised under DDP)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class RelativeL2Error(Metric):
    """Relative L2 error ``||u_pred - u_ref|| / ||u_ref||`` over all updates.

    Sums of squares are accumulated (state reduction ``sum``), so the value
    over several batches or DDP ranks equals the value on their union.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("err_sq", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ref_sq", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Accumulate a batch of predictions and reference values (same shape)."""
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ.")
        diff = (preds.double() - target.double()).square().sum()
        self.err_sq += diff
        self.ref_sq += target.double().square().sum()

    def compute(self) -> Tensor:
        """Return the relative L2 error."""
        return (self.err_sq / self.ref_sq).sqrt()
