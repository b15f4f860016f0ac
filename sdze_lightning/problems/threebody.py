"""Three-body manufactured solution on the unit ball (STDE / SDGD benchmark).

Note on the source term: the public reference code of this benchmark is
known (``docs/design.md``, Benchmark problems) to drop product-rule terms when it forms
``L u`` for ``u = (1 - |x|^2) psi``. Here every term is kept,

    Delta u = (1 - |x|^2) Delta psi + 2 grad(1 - |x|^2) . grad psi + psi Delta(1 - |x|^2)
            = (1 - |x|^2) Delta psi - 4 x . grad psi - 2 d psi,

and ``tests/unit/test_problems.py`` checks the source against autodiff of the exact
solution in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sdze_lightning.problems.ball import BallProblem


@dataclass(frozen=True)
class ThreeBodyTerms:
    """``psi = sum_i c_i exp(x_i x_{i+1} x_{i+2})`` and the derivatives the sources need.

    Attributes:
        psi: ``psi``.
        lap: ``Delta psi``.
        euler: ``x . grad psi``.
        bilap: ``Delta^2 psi`` (``None`` unless requested).
        euler_lap: ``x . grad(Delta psi)`` (``None`` unless requested).
        hess_xx: ``x^T (Hess psi) x`` (``None`` unless requested).

    """

    psi: Tensor
    lap: Tensor
    euler: Tensor
    bilap: Tensor | None = None
    euler_lap: Tensor | None = None
    hess_xx: Tensor | None = None


def three_body_terms(x: Tensor, coeffs: Tensor, fourth_order: bool = False) -> ThreeBodyTerms:
    """Closed forms per term ``h = exp(p)``, ``p = a b c`` with ``a, b, c = x_i, x_{i+1}, x_{i+2}``.

    With ``q = |grad p|^2 = b^2 c^2 + a^2 c^2 + a^2 b^2``, ``S = a^2 + b^2 + c^2``,
    ``Delta p = 0`` and ``p`` homogeneous of degree 3 (so ``x . grad p = 3 p``,
    ``x . grad q = 4 q``):

    * ``Delta h = q h``, ``x . grad h = 3 p h``, ``x^T H_h x = (9 p^2 + 6 p) h``;
    * ``Delta^2 h = Delta(q h) = h (q^2 + Delta q + 2 grad q . grad p) = h (q^2 + 4 S (1 + 2 p))``
      (``Delta q = 4 S``, ``grad q . grad p = 4 p S``);
    * ``x . grad(Delta h) = x . grad(q h) = q h (4 + 3 p)``.

    Everything is ``O(d)`` per point.
    """
    a, b, c = x[:, :-2], x[:, 1:-1], x[:, 2:]
    w = coeffs.to(x.dtype)
    p = a * b * c
    h = torch.exp(p)
    a2, b2, c2 = a * a, b * b, c * c
    q = b2 * c2 + a2 * c2 + a2 * b2
    qh = q * h
    terms = dict(psi=h @ w, lap=qh @ w, euler=(3 * p * h) @ w)
    if fourth_order:
        s = a2 + b2 + c2
        terms["bilap"] = (h * (q * q + 4 * s * (1 + 2 * p))) @ w
        terms["euler_lap"] = (qh * (4 + 3 * p)) @ w
        terms["hess_xx"] = (h * p * (9 * p + 6)) @ w
    return ThreeBodyTerms(**terms)


class ThreeBody(BallProblem):
    """``L u = f`` on the unit ball, ``u = (1 - |x|^2) sum_{i<d-1} c_i exp(x_i x_{i+1} x_{i+2})``.

    ``L`` is Poisson, Allen-Cahn or Sine-Gordon (``operator``); see
    :class:`~sdze_lightning.problems.ball.BallProblem`. Configs:
    ``pde=poisson_threebody``, ``allen_cahn_threebody``, ``sine_gordon_threebody``.
    """

    body = 3
    solution_name = "The three-body solution"

    def psi_terms(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """See :func:`three_body_terms`."""
        t = three_body_terms(x, self.coeffs)
        return t.psi, t.lap, t.euler
