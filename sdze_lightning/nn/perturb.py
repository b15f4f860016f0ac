"""Implicit low-rank parameter offsets for ``nn.Linear`` layers.

A zeroth-order method evaluates the network at ``W + A C B^T`` without writing
to ``W``: every linear layer adds ``x B C^T A^T + A c_b`` to its output. The
offset object lives on the module as ``module.zo_delta`` (``None`` when unused).

Networks of this library (:class:`~sdze_lightning.nn.mlp.MLP`) read the offset
directly, which lets them reuse ``W x`` across evaluations and evaluate
directional derivatives of the first layer by a column lookup. Any other network
built from ``nn.Linear`` layers gets the same offset through a forward hook
(:func:`attach_hooks`), so a user-defined network trains with SDZE unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LowRankDelta:
    """Offset ``Delta W = A C B^T`` and ``Delta b = A c_b`` of one linear layer.

    Attributes:
        A: Left basis, shape ``(out_features, ra)``.
        B: Right basis, shape ``(in_features, rb)``.
        C: Core, shape ``(ra, rb)``.
        cb: Bias core, shape ``(ra,)``, or ``None`` when the layer has no bias.
    """

    A: Tensor
    B: Tensor
    C: Tensor
    cb: Tensor | None

    def linear(self, x: Tensor) -> Tensor:
        """Return ``x Delta W^T`` (no bias term) for ``x`` of shape ``(..., in)``."""
        return ((x @ self.B) @ self.C.T) @ self.A.T

    def linear_from_projection(self, xb: Tensor) -> Tensor:
        """Return ``x Delta W^T`` from a precomputed projection ``xb = x B``."""
        return (xb @ self.C.T) @ self.A.T

    def columns(self, index: Tensor) -> Tensor:
        """Return the columns ``Delta W[:, index]`` transposed, shape ``(len(index), out)``."""
        return (self.B[index] @ self.C.T) @ self.A.T

    def bias(self) -> Tensor | None:
        """Return ``Delta b`` or ``None``."""
        return None if self.cb is None else self.A @ self.cb


def delta_of(module: nn.Module) -> LowRankDelta | None:
    """Return the active offset of ``module`` (``None`` when unperturbed)."""
    return getattr(module, "zo_delta", None)


def linear_forward(layer: nn.Linear, x: Tensor, bias: bool = True) -> Tensor:
    """Apply ``layer`` including its implicit offset, optionally without bias.

    ``bias=False`` gives the linear part only, as needed for the derivative
    coefficients of a Taylor jet or for a direction ``W v``.
    """
    out = F.linear(x, layer.weight, layer.bias if bias else None)
    delta = delta_of(layer)
    if delta is not None:
        out = out + delta.linear(x.to(delta.B.dtype)).to(out.dtype)
        if bias and delta.cb is not None:
            out = out + delta.bias().to(out.dtype)
    return out


def _hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
    delta = delta_of(module)
    if delta is None or getattr(module, "_zo_native", False):
        return None
    out = output + delta.linear(inputs[0].to(delta.B.dtype)).to(output.dtype)
    if delta.cb is not None:
        out = out + delta.bias().to(output.dtype)
    return out


def attach_hooks(modules: list[nn.Linear]) -> list[torch.utils.hooks.RemovableHandle]:
    """Register the offset hook on every linear layer not natively aware of offsets."""
    return [m.register_forward_hook(_hook) for m in modules if not getattr(m, "_zo_native", False)]


def linear_layers(module: nn.Module) -> Iterator[nn.Linear]:
    """Yield every ``nn.Linear`` inside ``module`` in definition order."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            yield m
