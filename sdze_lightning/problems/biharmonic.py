"""Fourth-order benchmark: the biharmonic equation on an annulus (HTE paper)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sdze_lightning.constraints import BallConstraint, ProductConstraint, row_sq_norm
from sdze_lightning.derivatives import Derivatives
from sdze_lightning.problem import PINNProblem
from sdze_lightning.problems.ball import SOURCE_BLOCK, checked_dim, coefficients
from sdze_lightning.problems.threebody import three_body_terms


class BiharmonicAnnulus(PINNProblem):
    """``Delta^2 u = f`` on ``1 <= |x| <= 2`` with ``u = 0`` on both spheres.

    Exact solution ``u = B(x) psi(x)``, ``B = (1 - |x|^2)(4 - |x|^2)`` and the
    three-body ``psi = sum_i c_i exp(x_i x_{i+1} x_{i+2})``; the boundary
    condition is the hard constraint ``u = B(x) net(x)`` (a
    :class:`~sdze_lightning.constraints.ProductConstraint` of two ball factors,
    a degree-4 polynomial, so the forward-only estimators stay exact on it).
    Points are ``r g / |g|`` with ``r ~ U(1, 2)``.

    The source is exact, from the product rule for the bi-Laplacian,

        Delta^2 (B psi) = B Delta^2 psi + psi Delta^2 B + 2 Delta B Delta psi
                          + 4 grad B . grad Delta psi + 4 grad psi . grad Delta B
                          + 4 Hess B : Hess psi,

    and, with ``s = |x|^2``, ``grad B = (4 s - 10) x``,
    ``Hess B = (4 s - 10) I + 8 x x^T``, ``Delta B = (4 d + 8) s - 10 d``,
    ``grad Delta B = 2 (4 d + 8) x``, ``Delta^2 B = 8 d (d + 2)``. The ``psi``
    quantities are closed forms (see
    :func:`~sdze_lightning.problems.threebody.three_body_terms`), ``O(d)`` per point.

    Args:
        coeff_seed: Seed of the coefficients ``c_i ~ N(0, 1)``.
        **kwargs: :class:`~sdze_lightning.problem.PINNProblem` arguments
            (``dim`` defaults to 5, at least 3).

    """

    operators = ("biharmonic",)

    def __init__(self, coeff_seed: int = 0, **kwargs: Any) -> None:
        checked_dim(kwargs, 5, 3, "The three-body solution")
        super().__init__(**kwargs)
        self.coeff_seed = coeff_seed
        self.register_buffer("coeffs", coefficients(self.dim - 2, coeff_seed))
        self.constraint = ProductConstraint(BallConstraint(1.0), BallConstraint(2.0))

    def sample_interior(self, n: int, generator: torch.Generator) -> Tensor:
        """Points ``r g / |g|``, ``r ~ U(1, 2)``, ``g ~ N(0, I)``."""
        r = 1 + self.rand(n, 1, generator=generator)
        g = self.randn(n, self.dim, generator=generator)
        return r * g / g.norm(dim=1, keepdim=True)

    def _blocks(self, x: Tensor) -> tuple[Tensor, ...]:
        return x.split(max(1, SOURCE_BLOCK // self.dim))

    def exact_solution(self, x: Tensor) -> Tensor:
        """``(1 - |x|^2)(4 - |x|^2) psi(x)``."""
        out = []
        for xb in self._blocks(x):
            s = row_sq_norm(xb)
            out.append((1 - s) * (4 - s) * three_body_terms(xb, self.coeffs).psi)
        return torch.cat(out)

    def source(self, x: Tensor) -> Tensor:
        """``f = Delta^2 u_exact`` (exact, ``O(d)`` per point)."""
        d = self.dim
        out = []
        for xb in self._blocks(x):
            t = three_body_terms(xb, self.coeffs, fourth_order=True)
            s = row_sq_norm(xb)
            big_b = (1 - s) * (4 - s)
            lap_b = (4 * d + 8) * s - 10 * d
            slope = 4 * s - 10  # grad B = slope * x
            out.append(
                big_b * t.bilap
                + 8 * d * (d + 2) * t.psi
                + 2 * lap_b * t.lap
                + 4 * slope * t.euler_lap
                + 8 * (4 * d + 8) * t.euler
                + 4 * (slope * t.lap + 8 * t.hess_xx)
            )
        return torch.cat(out)

    def residual(self, x: Tensor, d: Derivatives) -> Tensor:
        """``Delta^2 u - f``."""
        return d.biharmonic - self.source(x)
