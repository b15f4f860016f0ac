"""Shared frame of the 1D time-dependent benchmarks: ``(x, t)`` in ``[x_min, x_max] x [0, T]``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sdze_lightning.problem import PINNProblem


class IntervalProblem(PINNProblem):
    """A PDE in one space dimension and time; inputs are ``(x, t)``, time last.

    The boundary term covers the initial condition and the two ends: each
    boundary point is an initial point ``(x, 0)`` with probability
    ``initial_fraction``, otherwise a point ``(x_min, t)`` or ``(x_max, t)``.
    Subclasses give the PDE (``residual``), the data (``initial_condition``,
    ``boundary_target`` or ``boundary_residual``) and the reference solution.

    Args:
        x_min: Left end.
        x_max: Right end.
        horizon: Final time ``T``.
        initial_fraction: Share of boundary points on the initial line.
        n_boundary: Boundary/initial points per step.
        **kwargs: :class:`~sdze_lightning.problem.PINNProblem` arguments (``dim``
            must be 1 if given).

    """

    time_dependent = True

    def __init__(
        self,
        x_min: float = -1.0,
        x_max: float = 1.0,
        horizon: float = 1.0,
        initial_fraction: float = 0.5,
        n_boundary: int = 200,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("dim", 1)
        if kwargs["dim"] != 1:
            name = type(self).__name__
            raise ValueError(f"{name} is one-dimensional; got pde.dim={kwargs['dim']}.")
        if not x_min < x_max or horizon <= 0 or not 0 <= initial_fraction <= 1:
            raise ValueError("Need x_min < x_max, horizon > 0 and 0 <= initial_fraction <= 1.")
        super().__init__(n_boundary=n_boundary, **kwargs)
        self.x_min, self.x_max, self.horizon = float(x_min), float(x_max), float(horizon)
        self.initial_fraction = float(initial_fraction)

    def sample_interior(self, n: int, generator: torch.Generator) -> Tensor:
        """Uniform ``(x, t)`` in the space-time rectangle."""
        u = self.rand(n, 2, generator=generator)
        x = self.x_min + (self.x_max - self.x_min) * u[:, 0]
        return torch.stack([x, self.horizon * u[:, 1]], dim=1)

    def sample_boundary(self, n: int, generator: torch.Generator) -> Tensor:
        """Initial points ``(x, 0)`` and end points ``(x_min | x_max, t)``."""
        u = self.rand(n, 3, generator=generator)
        initial = u[:, 2] < self.initial_fraction
        x_any = self.x_min + (self.x_max - self.x_min) * u[:, 0]
        x_end = torch.where(u[:, 0] < 0.5, self.x_min, self.x_max).to(u.dtype)
        x = torch.where(initial, x_any, x_end)
        t = torch.where(initial, torch.zeros_like(u[:, 1]), self.horizon * u[:, 1])
        return torch.stack([x, t], dim=1)
