"""Two-body manufactured solution on the unit ball (STDE / SDGD benchmark)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sdze_lightning.kernels import fused_call
from sdze_lightning.problems.ball import BallProblem

#: Columns per chunk when the source is evaluated one point at a time (large d): the
#: temporaries of a chunk stay in cache, so at large d this is faster than whole rows, whose
#: temporaries each make a round trip through main memory.
COLUMN_CHUNK = 1 << 15
#: Rows longer than this use the fused (``torch.compile``) kernel when it is available:
#: one pass over the block, no ``N x d`` temporary (:mod:`sdze_lightning.kernels`).
#: The time it saves per evaluation grows with d, while the compilation is a one-off cost
#: per process (less with Inductor's on-disk cache): past this size the saving repays the
#: compilation within a run, below it the saving is too small for that (measured:
#: ``benchmarks/README.md``, ``fused_kernels.py``).
FUSED_MIN_DIM = 1 << 13


def _two_body_core(
    x: Tensor, c: Tensor, dot: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """The three sums of :func:`two_body_terms`; ``dot(t)`` is ``sum_i t[:, i] c_i``."""
    a, b = x[:, :-1], x[:, 1:]
    # sin and cos of x once (a and b are overlapping views), and phi_aa + phi_bb = a - phi:
    # fewer passes over the N x d block than term by term, which would compute sin and cos
    # of a and of b separately and both second derivatives.
    sx, cx = torch.sin(x), torch.cos(x)
    sin_a, cos_a, sin_b, cos_b = sx[:, :-1], cx[:, :-1], sx[:, 1:], cx[:, 1:]
    phi = a + cos_b + b * cos_a
    phi_a = 1 - b * sin_a
    phi_b = cos_a - sin_b
    s, co = torch.sin(phi), torch.cos(phi)
    psi = dot(s)
    lap = dot(co * (a - phi)) - dot(s * (phi_a * phi_a + phi_b * phi_b))
    euler = dot(co * (a * phi_a + b * phi_b))
    return psi, lap, euler


def _matvec(c: Tensor) -> Callable[[Tensor], Tensor]:
    """``t -> t @ c``."""
    return lambda t: t @ c


def _two_body_fused(x: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_two_body_core` with elementwise row reductions, for ``torch.compile`` to fuse."""
    return _two_body_core(x, c, lambda t: (t * c).sum(dim=1))


def two_body_terms(
    x: Tensor, coeffs: Tensor, fused: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """``psi = sum_i c_i sin(phi_i)``, ``phi_i = x_i + cos x_{i+1} + x_{i+1} cos x_i``.

    Each term depends on ``a = x_i`` and ``b = x_{i+1}`` only, so

    * ``Delta sin(phi) = -sin(phi) (phi_a^2 + phi_b^2) + cos(phi) (phi_aa + phi_bb)``,
    * ``x . grad sin(phi) = cos(phi) (a phi_a + b phi_b)``,

    with ``phi_a = 1 - b sin a``, ``phi_b = cos a - sin b``, ``phi_aa = -b cos a``,
    ``phi_bb = -cos b``: ``O(d)`` per point. With ``fused``, rows longer than
    :data:`FUSED_MIN_DIM` go through one fused kernel when ``torch.compile``
    works here (and no gradient with respect to ``x`` is wanted); otherwise
    single long rows are summed over cache-sized column chunks.

    Args:
        x: Points ``(N, d)``.
        coeffs: The ``d - 1`` coefficients ``c_i``.
        fused: Allow the fused kernel (a problem's ``fused_kernels``); it sums
            in another order than the eager code.

    Returns:
        ``(psi, Delta psi, x . grad psi)``, each ``(N,)``.

    """
    c = coeffs.to(x.dtype)
    if fused and x.shape[1] > FUSED_MIN_DIM and not (torch.is_grad_enabled() and x.requires_grad):
        fused = fused_call(_two_body_fused, x, c)
        if fused is not None:
            return fused
    if x.shape[0] == 1 and x.shape[1] > 2 * COLUMN_CHUNK:
        # the sum over pairs (i, i+1) splits into column chunks overlapping by one column
        parts = [
            _two_body_core(x[:, j : j + COLUMN_CHUNK + 1], cj, _matvec(cj))
            for j in range(0, x.shape[1] - 1, COLUMN_CHUNK)
            for cj in (c[j : j + COLUMN_CHUNK],)
        ]
        return tuple(torch.stack(p).sum(0) for p in zip(*parts, strict=True))
    return _two_body_core(x, c, _matvec(c))


class TwoBody(BallProblem):
    """``L u = f`` on the unit ball with the two-body exact solution.

    ``u = (1 - |x|^2) sum_{i<d} c_i sin(x_i + cos x_{i+1} + x_{i+1} cos x_i)``;
    ``L`` is Poisson, Allen-Cahn or Sine-Gordon (``operator``); see
    :class:`~sdze_lightning.problems.ball.BallProblem`. Configs:
    ``pde=poisson_twobody``, ``allen_cahn_twobody``, ``sine_gordon_twobody``.
    """

    body = 2
    solution_name = "The two-body solution"

    @property
    def uses_compiled_kernels(self) -> bool:
        """Whether its batches go through the fused kernel (the memory pre-flight counts it)."""
        return bool(self.fused_kernels) and self.input_dim > FUSED_MIN_DIM

    def psi_terms(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """See :func:`two_body_terms`."""
        return two_body_terms(x, self.coeffs, fused=self.fused_kernels)
