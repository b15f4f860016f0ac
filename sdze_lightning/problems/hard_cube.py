"""A high-dimensional benchmark that stays hard as the dimension grows."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from sdze_lightning.derivatives import Derivatives
from sdze_lightning.problem import PINNProblem
from sdze_lightning.problems.ball import (
    BALL_OPERATORS,
    SOURCE_BLOCK,
    apply_operator,
    checked_dim,
    coefficients,
)
from sdze_lightning.problems.batch_cache import BatchCache


class HardCube(BatchCache, PINNProblem):
    """``L u = f`` on the cube ``[-1, 1]^d`` with a Dirichlet boundary loss.

    Exact solution (indices cyclic, ``x_{d+1} = x_1``)

        u(x) = d^{-1/2} sum_{i=1}^{d} c_i sin(kappa x_i + x_i x_{i+1}),   c_i ~ N(0, 1),

    and ``L`` = Allen-Cahn ``Delta u + u - u^3`` by default (or ``poisson`` /
    ``sine_gordon``). ``Delta sin(phi) = -sin(phi) ((kappa + x_{i+1})^2 + x_i^2)``
    per term gives the source in ``O(d)`` per point.

    Why it stays hard as ``d`` grows, unlike the two- and three-body problems
    on the ball (whose points have ``|x_i| ~ 1/sqrt(d)``, so their solutions
    become nearly affine):

    * points are uniform in the cube, so every coordinate ranges over
      ``[-1, 1]`` at every ``d`` and each term is used across its whole
      nonlinear range (phases up to ``kappa + 1`` radians);
    * each term is odd in ``x_i``, so the terms have mean zero and are pairwise
      uncorrelated; with the ``d^{-1/2}`` scale ``Var u = O(1)`` and every one of
      the ``d`` features carries about ``1/d`` of the norm. A relative L2
      error ``eps`` needs a fraction ``1 - eps^2`` of the variance, i.e. nearly
      all ``d`` features: what must be learned grows with ``d`` instead of
      vanishing;
    * the pairs ``x_i x_{i+1}`` are not separable and ``u`` is not an
      eigenfunction of ``Delta``, so the source is not a multiple of ``u``;
    * the boundary cannot be imposed exactly in a useful way: the factor
      ``prod_i (1 - x_i^2)`` has mean ``(2/3)^d`` inside, so a soft loss on
      the ``2d`` faces (a random face per boundary point) is used instead.

    Args:
        operator: ``"allen_cahn"`` (default), ``"poisson"`` or ``"sine_gordon"``.
        kappa: Frequency ``kappa`` of each term.
        coeff_seed: Seed of the coefficients ``c_i``.
        n_boundary: Boundary points per step.
        **kwargs: :class:`~sdze_lightning.problem.PINNProblem` arguments
            (``dim`` defaults to 10, at least 2).

    """

    operators = ("u", "laplacian")

    def __init__(
        self,
        operator: str = "allen_cahn",
        kappa: float = 2.0,
        coeff_seed: int = 0,
        n_boundary: int = 100,
        **kwargs: Any,
    ) -> None:
        if operator not in BALL_OPERATORS:
            raise ValueError(f"pde.operator must be one of {BALL_OPERATORS}, got {operator!r}.")
        checked_dim(kwargs, 10, 2, "HardCube")
        super().__init__(n_boundary=n_boundary, **kwargs)
        self.operator = operator
        self.kappa = float(kappa)
        self.coeff_seed = coeff_seed
        self.register_buffer("coeffs", coefficients(self.dim, coeff_seed))

    def sample_interior(self, n: int, generator: torch.Generator) -> Tensor:
        """Uniform points in ``[-1, 1]^d``."""
        return 2 * self.rand(n, self.dim, generator=generator) - 1

    def sample_boundary(self, n: int, generator: torch.Generator) -> Tensor:
        """Uniform points on a uniformly chosen face ``x_j = +-1``."""
        x = 2 * self.rand(n, self.dim, generator=generator) - 1
        face = torch.randint(0, 2 * self.dim, (n,), generator=generator, device=self.device)
        side = (2 * (face % 2) - 1).to(x.dtype)
        x[torch.arange(n, device=self.device), face // 2] = side
        return x

    def _sines(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``sin(kappa x_i + x_i x_{i+1})``, ``x_{i+1}`` and the scaled coefficients."""
        b = torch.roll(x, -1, dims=1)
        return torch.sin(x * (self.kappa + b)), b, self.coeffs.to(x.dtype) / math.sqrt(self.dim)

    def _terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(u, Delta u)`` of the exact solution."""
        s, b, c = self._sines(x)
        return s @ c, -(s * ((self.kappa + b) ** 2 + x * x)) @ c

    def _blocks(self, x: Tensor) -> tuple[Tensor, ...]:
        return x.split(max(1, SOURCE_BLOCK // self.dim))

    def exact_solution(self, x: Tensor) -> Tensor:
        """``d^{-1/2} sum_i c_i sin(kappa x_i + x_i x_{i+1})``."""
        return torch.cat([self._block_target(xb) for xb in self._blocks(x)])

    def source(self, x: Tensor) -> Tensor:
        """``f = L u_exact``, ``O(d)`` per point."""
        return torch.cat([self._block_source(xb) for xb in self._blocks(x)])

    def _block_source(self, xb: Tensor) -> Tensor:
        """:meth:`source` of one block of :meth:`_blocks`."""
        return apply_operator(self.operator, *self._terms(xb))

    def _block_target(self, xb: Tensor) -> Tensor:
        """:meth:`exact_solution` of one block of :meth:`_blocks`."""
        s, _, c = self._sines(xb)
        return s @ c

    def residual(self, x: Tensor, d: Derivatives) -> Tensor:
        """``L u - f``, the source computed once per batch (:class:`BatchCache`)."""
        return apply_operator(self.operator, d.u, d.laplacian) - self._source_of(x)

    def boundary_target(self, x: Tensor) -> Tensor:
        """``u_exact`` on the boundary points, computed once per batch (:class:`BatchCache`)."""
        return self._cached(x, "target", self._block_target)
