"""Shampoo's direction with Adam's step length, for the small matrices of a network.

For a weight ``W`` (``m x n``) with gradient ``G``, Shampoo (Gupta et al., 2018) keeps
the two Kronecker factors of the gradient's second moment and steps along
``L^(-1/4) G R^(-1/4)``::

    L <- b2 L + (1 - b2) G G^T          (m x m)
    R <- b2 R + (1 - b2) G^T G          (n x n)

The inverse fourth roots come from an eigendecomposition (float64) every ``every``
steps, each eigenvalue raised by ``eps`` times the largest one. The step's length is
the one the other optimizer's update took on the same matrix (layer-wise grafting,
Agarwal et al., 2020), so only the direction changes: ``W <- W_old - |dW_adam|_F
D / |D|_F``. It is meant for the ``O(width^2)`` matrices behind the input layer,
where two ``width x width`` factors per layer are cheap; a vector (a bias) keeps the
other optimizer's update. Hand-rolled: torch ships no Shampoo, and the grafted form on a
few small matrices is ~40 lines.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdze_lightning.checks import positive_int


class GraftedShampoo:
    """Turns another optimizer's update of 2-D parameters into Shampoo's direction.

    Call :meth:`snapshot` before the other optimizer's step and :meth:`apply` after it.
    The factors live in ``state`` (the optimizer's per-parameter state, so that they are
    saved and restored with it) under ``shampoo_*`` keys.

    Args:
        params: The parameters; only matrices (``ndim == 2``) are preconditioned.
        state: Per-parameter state dicts (``torch.optim.Optimizer.state``).
        beta2: Decay of the factors' moving averages.
        eps: Eigenvalue floor, relative to the largest eigenvalue of a factor.
        every: Steps between recomputations of the inverse roots (the first step computes
            them).

    """

    def __init__(self, params: list[nn.Parameter], state: dict[Tensor, dict],
                 beta2: float, eps: float = 1e-6, every: int = 10) -> None:
        self.params = [p for p in params if p.ndim == 2]
        self.state = state
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.every = positive_int("method.precondition_every", every)

    def snapshot(self) -> list[tuple[nn.Parameter, Tensor, Tensor]]:
        """Each matrix with a gradient: (parameter, its value now, its gradient)."""
        return [(p, p.detach().clone(), p.grad.detach()) for p in self.params
                if p.grad is not None]

    @torch.no_grad()
    def apply(self, taken: list[tuple[nn.Parameter, Tensor, Tensor]]) -> None:
        """Replace each matrix's update since :meth:`snapshot` by Shampoo's direction.

        The update keeps its Frobenius norm (the other optimizer's step length).
        """
        for p, before, grad in taken:
            length = torch.linalg.vector_norm(p - before)
            direction = self._direction(p, grad)
            norm = torch.linalg.vector_norm(direction)
            if not (torch.isfinite(norm) and norm > 0):
                continue  # keep the other optimizer's update
            p.copy_(before - direction * (length / norm))

    def _direction(self, p: nn.Parameter, grad: Tensor) -> Tensor:
        state = self.state[p]
        g = grad.double()
        if "shampoo_left" not in state:
            state["shampoo_left"] = torch.zeros(g.shape[0], g.shape[0], dtype=torch.float64,
                                                device=g.device)
            state["shampoo_right"] = torch.zeros(g.shape[1], g.shape[1], dtype=torch.float64,
                                                 device=g.device)
            state["shampoo_count"] = 0
        left, right = state["shampoo_left"], state["shampoo_right"]
        left.mul_(self.beta2).addmm_(g, g.T, alpha=1 - self.beta2)
        right.mul_(self.beta2).addmm_(g.T, g, alpha=1 - self.beta2)
        if state["shampoo_count"] % self.every == 0:
            state["shampoo_left_root"] = self.inverse_fourth_root(left, self.eps)
            state["shampoo_right_root"] = self.inverse_fourth_root(right, self.eps)
        state["shampoo_count"] += 1
        return (state["shampoo_left_root"] @ g @ state["shampoo_right_root"]).to(p.dtype)

    @staticmethod
    def inverse_fourth_root(matrix: Tensor, eps: float) -> Tensor:
        """``(matrix + eps lambda_max I)^(-1/4)`` of a symmetric positive semi-definite matrix.

        Its eigenvalues are clamped at 0 first.
        """
        values, vectors = torch.linalg.eigh(matrix)
        values = values.clamp(min=0)
        largest = float(values.max())
        floor = eps * largest if largest > 0 else 1.0
        return (vectors * (values + floor).pow(-0.25)) @ vectors.T
