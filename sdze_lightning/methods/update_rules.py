"""Update rules applied to a flat coordinate vector (plain, momentum, Adam).

SDZE keeps its optimizer state in the subspace coordinates, so the rules are
written for a gradient estimate ``g`` of one coordinate vector and a small
state dict of tensors of the same shape: memory ``O(size of g)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Names of the update rules.
UPDATE_RULES: tuple[str, ...] = ("plain", "momentum", "adam")

#: State tensors each rule keeps (same shape as the coordinates).
RULE_STATE: dict[str, tuple[str, ...]] = {
    "plain": (),
    "momentum": ("momentum_buffer",),
    "adam": ("exp_avg", "exp_avg_sq"),
}


def check_rule(rule: str) -> None:
    """Raise ``ValueError`` for an unknown rule name."""
    if rule not in UPDATE_RULES:
        raise ValueError(f"method.update must be one of {list(UPDATE_RULES)}, got {rule!r}.")


def rule_step(
    rule: str,
    grad: Tensor,
    state: dict[str, Tensor],
    lr: float,
    t: int,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Tensor:
    """Return the increment of the coordinates for gradient estimate ``grad``.

    Args:
        rule: ``"plain"`` (``-lr g``), ``"momentum"`` (heavy ball,
            ``buf <- momentum buf + g``, ``-lr buf``) or ``"adam"`` (bias-corrected
            moments, ``-lr m_hat / (sqrt(v_hat) + eps)``).
        grad: Gradient estimate.
        state: The rule's state tensors (created on first use, updated in place).
        lr: Learning rate.
        t: Number of updates since the state was (re)started, this one included (Adam's
            bias correction).
        momentum: Momentum factor.
        betas: Adam's decay rates.
        eps: Adam's denominator term.

    """
    if rule == "plain":
        return -lr * grad
    if rule == "momentum":
        buf = state.get("momentum_buffer")
        buf = grad.clone() if buf is None else buf.mul_(momentum).add_(grad)
        state["momentum_buffer"] = buf
        return -lr * buf
    if rule == "adam":
        b1, b2 = betas
        m = state.get("exp_avg")
        v = state.get("exp_avg_sq")
        m = torch.zeros_like(grad) if m is None else m
        v = torch.zeros_like(grad) if v is None else v
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        state["exp_avg"], state["exp_avg_sq"] = m, v
        c1, c2 = 1 - b1**t, 1 - b2**t
        return -(lr / c1) * m / (v.sqrt() / math.sqrt(c2) + eps)
    check_rule(rule)
    raise AssertionError("unreachable")
