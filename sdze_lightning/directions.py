"""Random directions shared by all collocation points of one estimate.

Directions are either coordinate axes (``index``: the coordinate of each
direction) or dense vectors (``dense``: one row per direction, zero on the
coordinates that are not spatial). They are shared across the batch so that a
network can evaluate ``W v`` once per direction: for a coordinate axis it is a
column of ``W`` and costs nothing that grows with the dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Directions:
    """A set of ``K`` directions in the ``D``-dimensional input space.

    Exactly one of ``index`` and ``dense`` is set.

    Attributes:
        dim: Input dimension ``D`` (spatial dimensions plus time, if any).
        index: Long tensor ``(K,)`` of coordinate axes, or ``None``.
        dense: Tensor ``(K, D)`` of direction vectors, or ``None``.
    """

    dim: int
    index: Tensor | None = None
    dense: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.index is None) == (self.dense is None):
            raise ValueError("Directions need exactly one of `index` and `dense`.")

    @property
    def count(self) -> int:
        """Number of directions ``K``."""
        return int(self.index.numel() if self.index is not None else self.dense.shape[0])

    def dot(self, x: Tensor) -> Tensor:
        """Return ``x . v_k`` for every point and direction, shape ``(K, N)``."""
        if self.index is not None:
            return x[:, self.index].T
        return self.dense.to(x.dtype) @ x.T

    def sq_norms(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Return ``|v_k|^2``, shape ``(K,)``."""
        if self.index is not None:
            return torch.ones(self.count, dtype=dtype, device=device)
        return (self.dense.to(dtype) ** 2).sum(dim=1)

    def materialize(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Return the directions as a dense ``(K, D)`` tensor (costs ``K * D``)."""
        if self.dense is not None:
            return self.dense.to(dtype=dtype, device=device)
        out = torch.zeros(self.count, self.dim, dtype=dtype, device=device)
        out[torch.arange(self.count, device=device), self.index] = 1.0
        return out

    @staticmethod
    def axis(dim: int, coordinate: int, device: torch.device | str = "cpu") -> Directions:
        """Return the single coordinate direction ``e_coordinate``."""
        return Directions(dim, index=torch.tensor([coordinate], device=device))
