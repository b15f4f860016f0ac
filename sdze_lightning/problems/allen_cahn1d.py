"""Allen-Cahn equation in 1D with periodic boundaries (PDE-aware optimizer paper; Raissi et al.)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from sdze_lightning.derivatives import Derivatives
from sdze_lightning.directions import Directions
from sdze_lightning.problems.interval import IntervalProblem
from sdze_lightning.reference.allen_cahn import AllenCahnReference


class AllenCahn1D(IntervalProblem):
    """``u_t - eps u_xx + rate (u^3 - u) = 0`` on ``[-1, 1] x [0, 1]``, periodic in ``x``.

    ``eps = 1e-4``, ``rate = 5``, ``u(x, 0) = x^2 cos(pi x)``. The reference is
    a Fourier ETDRK4 solution computed in the repo
    (:class:`~sdze_lightning.reference.allen_cahn.AllenCahnReference`; with the
    defaults its error is far below what a PINN reaches), solved once per process.

    Boundary points mean three things (one residual per point):

    * ``(x, 0)``: ``u - x^2 cos(pi x)`` (initial condition);
    * ``(-1, t)``: ``u(-1, t) - u(1, t)`` (periodic value);
    * ``(1, t)``: ``u_x(1, t) - u_x(-1, t)`` (periodic slope), by a forward-mode
      jet along ``x`` (no back-propagation, so zeroth-order methods can use it).

    Args:
        eps: Diffusion coefficient.
        rate: Reaction rate.
        reference_points: Fourier grid points of the reference solver.
        reference_dt: Time step of the reference solver.
        **kwargs: :class:`~sdze_lightning.problems.interval.IntervalProblem` arguments.

    """

    operators = ("u", "laplacian", "dt")

    def __init__(
        self,
        eps: float = 1e-4,
        rate: float = 5.0,
        reference_points: int = 1024,
        reference_dt: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        super().__init__(x_min=-1.0, x_max=1.0, **kwargs)
        self.eps, self.rate = float(eps), float(rate)
        self.reference = AllenCahnReference(
            eps=self.eps, rate=self.rate, n_points=reference_points, dt=reference_dt,
            horizon=self.horizon,
        )

    def residual(self, x: Tensor, d: Derivatives) -> Tensor:
        """``u_t - eps u_xx + rate (u^3 - u)``."""
        u = d.u
        return d.dt - self.eps * d.laplacian + self.rate * (u**3 - u)

    def initial_condition(self, x: Tensor) -> Tensor:
        """``x^2 cos(pi x)``."""
        return x * x * torch.cos(math.pi * x)

    def boundary_residual(self, x: Tensor) -> Tensor:
        """Initial residual, periodic value mismatch or periodic slope mismatch per point."""
        initial = x[:, 1] == 0
        left = (x[:, 0] == -1) & ~initial
        mirror = torch.stack([-x[:, 0], x[:, 1]], dim=1)
        both = torch.cat([x, mirror])
        jet = self.model.jets(both, Directions.axis(2, 0, device=x.device), 1)
        u, ux = jet[0].chunk(2), jet[1][0].chunk(2)
        periodic = torch.where(left, u[0] - u[1], ux[0] - ux[1])
        return torch.where(initial, u[0] - self.initial_condition(x[:, 0]), periodic)

    def exact_solution(self, x: Tensor) -> Tensor:
        """ETDRK4 reference, interpolated."""
        return self.reference(x[:, 0], x[:, 1])
