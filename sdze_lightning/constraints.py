"""Hard constraints ``u(x) = g(x) * net(x)`` with exact directional jets of ``g``.

A factor ``g`` that vanishes on the boundary removes the boundary loss. Each
factor gives its value and its derivatives along shared directions in
``O(d)`` per point plus ``O(1)`` per direction, so the dimension-free fast
paths of the estimators stay dimension-free with the constraint applied.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from sdze_lightning.directions import Directions
from sdze_lightning.nn.mlp import Jet, product_jet


def row_sq_norm(x: Tensor) -> Tensor:
    """``|x_i|^2`` of each row of ``x`` ``(N, d)``, in one pass without an ``N x d`` temporary.

    Without autograd it is ``vector_norm(x, dim=1)^2`` (one fused reduction:
    faster at large ``d`` than ``(x * x).sum(1)``, whose ``N x d`` square is a
    fresh allocation and two more passes per call); when a gradient with respect to
    ``x`` is recorded it is ``(x * x).sum(1)``, whose derivatives of every
    order are exact also at ``x = 0``.
    """
    if x.requires_grad and torch.is_grad_enabled():
        return (x * x).sum(dim=1)
    return torch.linalg.vector_norm(x, dim=1).square()


class Constraint(ABC):
    """Multiplicative factor ``g(x)`` of a hard boundary constraint.

    Attributes:
        degree: Polynomial degree of ``g`` along a line, or ``None`` if ``g`` is
            not a polynomial; a degree up to 4 lets ``line`` evaluate ``g``
            exactly from its jet.
    """

    degree: int | None = None

    @abstractmethod
    def value(self, x: Tensor) -> Tensor:
        """Return ``g(x)``, shape ``(N,)``."""

    @abstractmethod
    def jet(self, x: Tensor, dirs: Directions, order: int) -> Jet:
        """Return ``[g(x), D_v g, ..., D_v^order g]`` (``(N,)`` then ``(K, N)``; ``None`` = 0)."""


class BallConstraint(Constraint):
    """``g(x) = r^2 - |x_s|^2`` on the ball of radius ``r`` (spatial coordinates ``x_s``).

    Args:
        radius: Ball radius.
        spatial_dim: Number of leading spatial coordinates; the rest (time) are ignored.
    """

    degree = 2

    def __init__(self, radius: float = 1.0, spatial_dim: int | None = None) -> None:
        self.radius = radius
        self.spatial_dim = spatial_dim

    def _space(self, x: Tensor) -> Tensor:
        return x if self.spatial_dim is None else x[:, : self.spatial_dim]

    def value(self, x: Tensor) -> Tensor:
        """Return ``r^2 - |x|^2``."""
        return self.radius**2 - row_sq_norm(self._space(x))

    def jet(self, x: Tensor, dirs: Directions, order: int) -> Jet:
        """Return the jet of ``r^2 - |x + t v|^2``: ``[g, -2 x.v, -2 |v|^2, 0, 0]``."""
        out: Jet = [self.value(x)]
        if order >= 1:
            xv = dirs.dot(x)
            if self.spatial_dim is not None and dirs.dense is not None:
                xv = dirs.dense[:, : self.spatial_dim].to(x.dtype) @ self._space(x).T
            elif self.spatial_dim is not None:
                xv = torch.where((dirs.index < self.spatial_dim)[:, None], xv, torch.zeros_like(xv))
            out.append(-2 * xv)
        if order >= 2:
            if dirs.dense is not None:
                vs = dirs.dense if self.spatial_dim is None else dirs.dense[:, : self.spatial_dim]
                vv = (vs.to(x.dtype) ** 2).sum(dim=1)
            else:
                vv = torch.ones(dirs.count, dtype=x.dtype, device=x.device)
                if self.spatial_dim is not None:
                    vv = (dirs.index < self.spatial_dim).to(x.dtype)
            out.append((-2 * vv)[:, None].expand(-1, x.shape[0]))
        out.extend([None] * max(0, order - 2))
        return out


class ProductConstraint(Constraint):
    """Product of factors, e.g. ``(1 - |x|^2)(4 - |x|^2)`` for an annulus."""

    def __init__(self, *factors: Constraint) -> None:
        self.factors = factors
        degrees = [f.degree for f in factors]
        self.degree = None if None in degrees else sum(degrees)

    def value(self, x: Tensor) -> Tensor:
        """Return the product of the factors' values."""
        out = self.factors[0].value(x)
        for f in self.factors[1:]:
            out = out * f.value(x)
        return out

    def jet(self, x: Tensor, dirs: Directions, order: int) -> Jet:
        """Return the Leibniz product of the factors' jets."""
        out = self.factors[0].jet(x, dirs, order)
        for f in self.factors[1:]:
            out = product_jet(out, f.jet(x, dirs, order))
        return out
