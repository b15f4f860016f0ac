"""Korteweg-de Vries equation in 1D with an exact soliton (PDE-aware optimizer paper's KdV)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from sdze_lightning.derivatives import Derivatives
from sdze_lightning.problems.interval import IntervalProblem


def kdv_soliton(
    x: Tensor, t: Tensor, alpha: float, beta: float, speed: float, x0: float
) -> Tensor:
    """``u = (3 c / alpha) sech^2(sqrt(c / beta) (x - c t - x0) / 2)``.

    Solves ``u_t + alpha u u_x + beta u_xxx = 0`` exactly (``c`` = ``speed``).
    """
    xi = 0.5 * math.sqrt(speed / beta) * (x - speed * t - x0)
    return (3.0 * speed / alpha) / torch.cosh(xi) ** 2


class KdV1D(IntervalProblem):
    """``u_t + alpha u u_x + beta u_xxx = 0`` on ``[-1, 1] x [0, 1]`` with a travelling soliton.

    The coefficients ``alpha = 1``, ``beta = 0.0025`` are those of the PINN
    KdV benchmark (Raissi et al.; used by the PDE-aware optimizer paper); its
    ``cos(pi x)`` periodic initial condition has no closed-form solution, so
    this problem uses the exact one-soliton solution instead
    (``docs/design.md``, Benchmark problems): amplitude ``3 c / alpha`` = 1.5, width about
    ``2 sqrt(beta / c)`` = 0.14, moving from ``x0 = -0.25`` to ``0.25``.
    Initial and end values come from the exact solution (soft loss).

    Args:
        alpha: Coefficient of ``u u_x``.
        beta: Coefficient of ``u_xxx``.
        speed: Soliton speed ``c``.
        x0: Soliton position at ``t = 0``.
        **kwargs: :class:`~sdze_lightning.problems.interval.IntervalProblem` arguments.

    """

    operators = ("u", "grad", "third", "dt")

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 0.0025,
        speed: float = 0.5,
        x0: float = -0.25,
        **kwargs: Any,
    ) -> None:
        super().__init__(x_min=-1.0, x_max=1.0, **kwargs)
        if beta <= 0 or speed <= 0:
            raise ValueError(f"beta and speed must be positive, got {beta}, {speed}.")
        self.alpha, self.beta, self.speed, self.x0 = float(alpha), float(beta), float(speed), x0

    def residual(self, x: Tensor, d: Derivatives) -> Tensor:
        """``u_t + alpha u u_x + beta u_xxx``."""
        return d.dt + self.alpha * d.u * d.grad[:, 0] + self.beta * d.third

    def exact_solution(self, x: Tensor) -> Tensor:
        """The soliton."""
        return kdv_soliton(x[:, 0], x[:, 1], self.alpha, self.beta, self.speed, self.x0)
