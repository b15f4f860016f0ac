"""The physics-informed loss of a step, from the residuals at its collocation points.

``loss = mean(r^2) + boundary_weight * mean(r_b^2)``, with ``r`` the PDE residual at the
interior points and ``r_b`` the boundary residual. With
``squared_residual="unbiased"`` the interior term is ``mean(r_1 * r_2)`` from two
independent halves of the estimator's directions, an unbiased estimate of the squared
residual where ``mean(r^2)`` is biased upwards by the estimator's variance. Under data
parallelism each term is this rank's estimate of the global mean
(:meth:`~sdze_lightning.distributed.Shard.mean`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from sdze_lightning.seeding import Stream

if TYPE_CHECKING:
    from sdze_lightning.collocation import Collocation
    from sdze_lightning.contract import ProblemContract
    from sdze_lightning.derivatives import Derivatives


def checked_residual(problem: ProblemContract, x: Tensor, d: Derivatives) -> Tensor:
    """``problem.residual(x, d)``, refused unless it is one floating value per point."""
    r = problem.residual(x, d)
    if not isinstance(r, Tensor) or r.shape != (x.shape[0],):
        shape = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
        raise ValueError(
            f"{type(problem).__name__}.residual() must return a tensor of shape "
            f"({x.shape[0]},) (one value per point), got {shape}."
        )
    if not r.is_floating_point():
        raise TypeError(
            f"{type(problem).__name__}.residual() must return a floating tensor, got {r.dtype}."
        )
    return r


class PhysicsLoss:
    """The loss of a problem's steps (its ``physics_loss`` attribute).

    Evaluates the user contract (``residual``, ``boundary_residual``) on the points of
    ``collocation`` with the problem's estimator.

    Args:
        problem: The problem (its residuals, estimator, weights and sizes).
        collocation: Where the points of a step come from.

    """

    def __init__(self, problem: ProblemContract, collocation: Collocation) -> None:
        self.problem = problem
        self.collocation = collocation

    def interior_residuals(
        self, step: int, key: int = 0, rows: slice | None = None
    ) -> tuple[Tensor, ...]:
        """Per-point residual(s) of ``step``: one tensor, or two independent halves.

        ``rows`` restricts them to those interior points (same estimator seed).
        """
        problem = self.problem
        x = self.collocation.points(step, key)
        if rows is not None:
            x = x[rows]
        gen = self.collocation.generator(step, key, Stream.ESTIMATOR)
        if problem.squared_residual == "unbiased":
            return tuple(
                checked_residual(problem, x, problem.derivatives(x, gen, half))
                for half in problem.estimator_halves
            )
        return (checked_residual(problem, x, problem.derivatives(x, gen)),)

    def terms(self, step: int, key: int = 0) -> dict[str, Tensor]:
        """Loss of ``step`` as a dict with ``"loss"``, ``"interior"`` and ``"boundary"``."""
        problem, shard = self.problem, self.collocation.shard
        res = self.interior_residuals(step, key)
        interior = shard.mean(res[0] * res[-1], problem.n_interior)
        terms = {"interior": interior}
        loss = interior
        if problem.n_boundary > 0:
            rb = problem.boundary_residual(self.collocation.boundary_points(step, key))
            terms["boundary"] = shard.mean(rb.square(), problem.n_boundary)
            loss = loss + problem.boundary_weight * terms["boundary"]
        terms["loss"] = loss
        return terms

    def residual_batch(
        self, step: int, key: int = 0, rows: slice | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Per-point interior residual ``(N,)`` and weighted boundary term (or ``None``).

        For optimizers that need per-point residual gradients (``needs_residuals``,
        e.g. :class:`~sdze_lightning.methods.PDEAware`); the two halves of the
        unbiased form are averaged. With ``rows``, the residuals of those interior
        points only (recomputed on them alone) and no boundary term.
        """
        problem = self.problem
        res = self.interior_residuals(step, key, rows)
        r = res[0] if len(res) == 1 else 0.5 * (res[0] + res[1])
        boundary = None
        if problem.n_boundary > 0 and rows is None:
            xb = self.collocation.boundary_points(step, key)
            boundary = problem.boundary_weight * problem.boundary_residual(xb).square().mean()
        return r, boundary
