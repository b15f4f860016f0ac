"""Viscous Burgers equation in 1D (PDE-aware optimizer paper; Raissi et al.)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from sdze_lightning.derivatives import Derivatives
from sdze_lightning.problems.interval import IntervalProblem
from sdze_lightning.reference.burgers import burgers_cole_hopf


class Burgers1D(IntervalProblem):
    """``u_t + u u_x - nu u_xx = 0`` on ``[-1, 1] x [0, 1]``, ``nu = 0.01/pi``.

    ``u(x, 0) = -sin(pi x)``, ``u(+-1, t) = 0`` (soft loss). A shock forms at
    ``x = 0`` around ``t = 0.3``. The reference is the Cole-Hopf solution by
    quadrature (:func:`~sdze_lightning.reference.burgers.burgers_cole_hopf`),
    accurate to near machine precision in float64 (the trapezoidal rule converges
    exponentially on its analytic integrands).

    Args:
        nu: Viscosity.
        **kwargs: :class:`~sdze_lightning.problems.interval.IntervalProblem` arguments.

    """

    operators = ("u", "grad", "laplacian", "dt")

    def __init__(self, nu: float = 0.01 / math.pi, **kwargs: Any) -> None:
        super().__init__(x_min=-1.0, x_max=1.0, **kwargs)
        self.nu = float(nu)

    def residual(self, x: Tensor, d: Derivatives) -> Tensor:
        """``u_t + u u_x - nu u_xx``."""
        return d.dt + d.u * d.grad[:, 0] - self.nu * d.laplacian

    def boundary_target(self, x: Tensor) -> Tensor:
        """``-sin(pi x)`` on ``t = 0``, ``0`` at ``x = +-1``."""
        return torch.where(x[:, 1] == 0, -torch.sin(math.pi * x[:, 0]), torch.zeros_like(x[:, 0]))

    def exact_solution(self, x: Tensor) -> Tensor:
        """Cole-Hopf reference."""
        return burgers_cole_hopf(x[:, 0], x[:, 1], nu=self.nu)
