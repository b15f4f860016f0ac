"""Manufactured-solution problems on the unit ball with an exact boundary condition.

The shared frame of the two-body and three-body benchmarks (STDE, SDGD):
``u(x) = (1 - |x|^2) psi(x)`` with the boundary condition ``u = 0`` imposed
by the hard constraint ``u = (1 - |x|^2) net(x)``, points ``r g / |g|`` with
``r ~ U(0, 1)`` and ``g ~ N(0, I_d)``, and one of three second-order operators

* ``poisson``: ``L u = Delta u``,
* ``allen_cahn``: ``L u = Delta u + u - u^3``,
* ``sine_gordon``: ``L u = Delta u + sin(u)``,

with the source ``f = L u_exact`` computed analytically in ``O(d)`` per point
from ``psi``, ``Delta psi`` and ``x . grad psi``:

    Delta u = (1 - |x|^2) Delta psi - 4 x . grad psi - 2 d psi.

Caveat (``docs/design.md``, Benchmark problems): with these points every ``|x_i|`` is about
``1/sqrt(d)``, so at large ``d`` the solutions are nearly affine in ``x`` and a
small relative error is a weak bar; see
:class:`~sdze_lightning.problems.hard_cube.HardCube` for one that stays hard.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor

from sdze_lightning.checks import positive_int
from sdze_lightning.constraints import BallConstraint, row_sq_norm
from sdze_lightning.derivatives import Derivatives
from sdze_lightning.problem import PINNProblem
from sdze_lightning.problems.batch_cache import BatchCache

#: Second-order operators ``L(u, Delta u)`` of the ball benchmarks.
BALL_OPERATORS = ("poisson", "allen_cahn", "sine_gordon")

#: Largest ``points x d`` block the source is computed in at once.
SOURCE_BLOCK = 1 << 20

def apply_operator(name: str, u: Tensor, lap: Tensor) -> Tensor:
    """``L u`` for the operator ``name`` from the value and the Laplacian."""
    if name == "poisson":
        return lap
    if name == "allen_cahn":
        return lap + u - u**3
    if name == "sine_gordon":
        return lap + torch.sin(u)
    raise ValueError(f"Unknown operator {name!r}; choose one of {BALL_OPERATORS}.")


def checked_dim(kwargs: dict[str, Any], default: int, minimum: int, what: str) -> int:
    """Fill in ``kwargs["dim"]`` (``default`` when absent) and check it before it is used.

    The type check repeats the one of :class:`~sdze_lightning.problem.PINNProblem`
    (same message) because the problems need ``dim`` before they call it.

    Args:
        kwargs: The problem's keyword arguments (updated in place).
        default: ``dim`` when the config gives none.
        minimum: Smallest dimension the problem is defined for.
        what: Name of what needs the dimension, for the error message.

    Returns:
        The dimension.

    Raises:
        ValueError: ``dim`` is not a positive integer or is below ``minimum``.

    """
    dim = kwargs.setdefault("dim", default)
    positive_int("pde.dim", dim)
    if dim < minimum:
        raise ValueError(f"{what} needs pde.dim >= {minimum}, got {dim}.")
    return dim


def coefficients(n: int, seed: int) -> Tensor:
    """``n`` standard normal coefficients ``c_i`` from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen, dtype=torch.float64).to(torch.get_default_dtype())


class BallProblem(BatchCache, PINNProblem):
    """``L u = f`` on the unit ball, ``u = (1 - |x|^2) psi`` exact, hard boundary constraint.

    Subclasses define ``psi`` through :meth:`psi_terms` and its interaction
    order through :attr:`body` (``psi`` is a sum over the ``d - body + 1``
    windows ``x_i .. x_{i+body-1}``, one coefficient each).

    Args:
        operator: ``"poisson"``, ``"allen_cahn"`` or ``"sine_gordon"``.
        coeff_seed: Seed of the coefficients ``c_i ~ N(0, 1)`` (a buffer: it
            follows the module's device and dtype).
        **kwargs: :class:`~sdze_lightning.problem.PINNProblem` arguments
            (``dim`` defaults to 100, at least :attr:`body`).

    """

    operators = ("u", "laplacian")
    #: Coordinates per term of ``psi`` (2: two-body, 3: three-body); also the smallest ``dim``.
    body: int = 2
    #: Name of the solution in error messages.
    solution_name: str = "This solution"

    def __init__(self, operator: str = "allen_cahn", coeff_seed: int = 0, **kwargs: Any) -> None:
        if operator not in BALL_OPERATORS:
            raise ValueError(f"pde.operator must be one of {BALL_OPERATORS}, got {operator!r}.")
        checked_dim(kwargs, 100, self.body, self.solution_name)
        super().__init__(**kwargs)
        self.operator = operator
        self.coeff_seed = coeff_seed
        self.register_buffer("coeffs", coefficients(self.n_coefficients(self.dim), coeff_seed))
        self.constraint = BallConstraint(1.0)

    @classmethod
    def n_coefficients(cls, dim: int) -> int:
        """Number of coefficients ``c_i`` at dimension ``dim``: ``d - body + 1``."""
        return dim - cls.body + 1

    @abstractmethod
    def psi_terms(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(psi, Delta psi, x . grad psi)`` at ``x``, each ``(N,)``."""

    def sample_interior(self, n: int, generator: torch.Generator) -> Tensor:
        """Points ``r g / |g|``, ``r ~ U(0, 1)``, ``g ~ N(0, I)`` (as STDE samples)."""
        r = self.rand(n, 1, generator=generator)
        g = self.randn(n, self.dim, generator=generator)
        norm = g.norm(dim=1, keepdim=True)
        return g.mul_(r).div_(norm)  # in place: same values as r * g / |g|, one N x d buffer

    def _blocks(self, x: Tensor) -> tuple[Tensor, ...]:
        return x.split(max(1, SOURCE_BLOCK // self.dim))

    def exact_solution(self, x: Tensor) -> Tensor:
        """``(1 - |x|^2) psi(x)``."""
        blocks = self._blocks(x)
        return torch.cat([(1 - row_sq_norm(xb)) * self.psi_terms(xb)[0] for xb in blocks])

    def source(self, x: Tensor) -> Tensor:
        """``f = L u_exact``, analytic, ``O(d)`` per point."""
        return torch.cat([self._block_source(xb) for xb in self._blocks(x)])

    def _block_source(self, xb: Tensor) -> Tensor:
        """:meth:`source` of one block of :meth:`_blocks`."""
        psi, lap_psi, euler = self.psi_terms(xb)
        b = 1 - row_sq_norm(xb)
        u = b * psi
        lap = b * lap_psi - 4 * euler - 2 * self.dim * psi
        return apply_operator(self.operator, u, lap)

    def residual(self, x: Tensor, d: Derivatives) -> Tensor:
        """``L u - f``."""
        return apply_operator(self.operator, d.u, d.laplacian) - self._source_of(x)
