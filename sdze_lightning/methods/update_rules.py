"""Update rules of SDZE's coordinate vectors (plain, momentum, Adam) with torch.optim's arithmetic.

SDZE keeps its optimizer state in the subspace coordinates: per layer a flat
coordinate vector and a small dict of rule tensors of the same shape (memory
``O(size of the coordinates)``). :func:`apply_rule` updates them in place with
the functional forms of ``torch.optim.SGD`` and ``torch.optim.Adam``
(:func:`torch.optim.sgd.sgd`, :func:`torch.optim.adam.adam`). The optimizer
classes are not used because they bind to tensor objects and count steps per
tensor, while SDZE replaces the coordinates at every window change, resets or
rotates the rule state into the new subspace and checkpoints it in its own
state (a ``rule_step`` counter shared by the layers).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adam import adam
from torch.optim.sgd import sgd

#: Names of the update rules.
UPDATE_RULES: tuple[str, ...] = ("plain", "momentum", "adam")

#: State tensors each rule keeps (same shape as the coordinates; torch.optim's names).
RULE_STATE: dict[str, tuple[str, ...]] = {
    "plain": (),
    "momentum": ("momentum_buffer",),
    "adam": ("exp_avg", "exp_avg_sq"),
}


def check_rule(rule: str) -> None:
    """Raise ``ValueError`` for an unknown rule name."""
    if rule not in UPDATE_RULES:
        raise ValueError(f"method.update must be one of {list(UPDATE_RULES)}, got {rule!r}.")


def apply_rule(
    rule: str,
    states: list[dict[str, Tensor]],
    grads: list[Tensor],
    lr: float,
    t: int,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """Update every layer's ``coords`` in place from its gradient estimate.

    Args:
        rule: ``"plain"`` (SGD, ``-lr g``), ``"momentum"`` (SGD with heavy-ball
            momentum, ``buf <- momentum buf + g``, ``-lr buf``) or ``"adam"``
            (bias-corrected moments, ``-lr m_hat / (sqrt(v_hat) + eps)``).
        states: Per layer, ``coords`` and the rule's tensors (:data:`RULE_STATE`;
            created on first use, updated in place).
        grads: Per layer, the gradient estimate of the coordinates.
        lr: Learning rate.
        t: Number of updates since the rule state was (re)started, this one included
            (Adam's bias correction).
        momentum: Momentum factor.
        betas: Adam's decay rates.
        eps: Adam's denominator term.

    """
    check_rule(rule)
    coords = [st["coords"] for st in states]
    grads = [g.to(c.dtype) for g, c in zip(grads, coords, strict=True)]
    if rule == "adam":
        for st, g in zip(states, grads, strict=True):
            for key in RULE_STATE["adam"]:
                if key not in st:
                    st[key] = torch.zeros_like(g)
        adam(
            coords, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
            [], [torch.tensor(float(t - 1)) for _ in states], foreach=False,
            amsgrad=False, beta1=betas[0], beta2=betas[1], lr=lr, weight_decay=0.0, eps=eps,
            maximize=False,
        )
        return
    buffers = [st.get("momentum_buffer") for st in states]  # sgd fills in new ones
    sgd(
        coords, grads, buffers, foreach=False, weight_decay=0.0,
        momentum=momentum if rule == "momentum" else 0.0, lr=lr, dampening=0.0,
        nesterov=False, maximize=False,
    )
    if rule == "momentum":
        for st, buf in zip(states, buffers, strict=True):
            st["momentum_buffer"] = buf
