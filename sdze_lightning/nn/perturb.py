"""Implicit low-rank parameter offsets for ``nn.Linear`` layers.

A zeroth-order method evaluates the network at ``W + A C B^T`` without writing
to ``W``: every linear layer adds ``x B C^T A^T + A c_b`` to its output. The
offset object lives on the module as ``module.zo_delta`` (``None`` when unused).

Networks of this library (:class:`~sdze_lightning.nn.mlp.MLP`) read the offset
directly, which lets them reuse ``W x`` across evaluations and evaluate
directional derivatives of the first layer by a column lookup. Any other network
built from ``nn.Linear`` layers gets the same offset through a forward hook
(:func:`attach_hooks`), so a user-defined network trains with SDZE unchanged. A
layer carries at most one such hook, however many optimizers hold it; the last
hold released removes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

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
    _dense: tuple[tuple, Tensor, Tensor | None] | None = field(
        default=None, init=False, repr=False, compare=False
    )

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

    @torch.no_grad()
    def effective(self, layer: nn.Linear) -> tuple[Tensor, Tensor | None]:
        """``(W + A C B^T, b + A c_b)`` of ``layer``, formed once and cached.

        The cache is keyed by the in-place versions of the weight, the bias and
        the coordinates (``C`` and ``c_b`` are views of the optimizer's
        coordinate vector), so an in-place update of any of them is seen. ``A``
        and ``B`` are not in the key: they are fixed for the life of an offset
        (a new window installs new offset objects). The copy lives as long as
        the offset is installed: one extra weight per small layer (at most
        :data:`DENSE_MAX_NUMEL` entries each).
        """
        w, bias = layer.weight, layer.bias
        key = (
            w.data_ptr(), w.dtype, w._version, self.C._version,
            None if bias is None else bias._version,
            None if self.cb is None else self.cb._version,
        )
        if self._dense is None or self._dense[0] != key:
            left = self.A @ self.C.to(self.A.dtype)
            weight = torch.addmm(w, left.to(w.dtype), self.B.T.to(w.dtype))
            if bias is not None and self.cb is not None:
                bias = bias + self.bias().to(bias.dtype)
            self._dense = (key, weight, bias)
        return self._dense[1], self._dense[2]


def delta_of(module: nn.Module) -> LowRankDelta | None:
    """Return the active offset of ``module`` (``None`` when unperturbed)."""
    return getattr(module, "zo_delta", None)


#: Weights with at most this many entries are perturbed explicitly when no gradient is
#: recorded: ``W + A C B^T`` is formed once per offset (:meth:`LowRankDelta.effective`)
#: and every product is one ``F.linear``, instead of the three thin products and the
#: add of the implicit form per call. Larger weights (the first layer at large input
#: dimension) stay implicit: a dense copy would be parameter-sized.
DENSE_MAX_NUMEL = 1 << 20


def _dense_ok(layer: nn.Linear, x: Tensor) -> bool:
    """Whether :func:`linear_forward` may use the cached dense weight of the offset.

    Only in float32/float64 without autocast: rounding ``W + A C B^T`` to bfloat16
    would wipe out a perturbation of relative size 1e-3. The two forms round
    differently (float32: ~1e-7 relative); the evaluations of a zeroth-order
    step all run without gradient, so they all take the same form.
    """
    w = layer.weight
    return (
        w.numel() <= DENSE_MAX_NUMEL
        and w.dtype in (torch.float32, torch.float64)
        and x.dtype == w.dtype
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled(x.device.type)
    )


def linear_forward(layer: nn.Linear, x: Tensor, bias: bool = True) -> Tensor:
    """Apply ``layer`` including its implicit offset, optionally without bias.

    ``bias=False`` gives the linear part only, as needed for the derivative
    coefficients of a Taylor jet or for a direction ``W v``.
    """
    delta = delta_of(layer)
    if delta is not None and _dense_ok(layer, x):
        weight, b = delta.effective(layer)
        return F.linear(x, weight, b if bias else None)
    out = F.linear(x, layer.weight, layer.bias if bias else None)
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


#: Attributes of a hooked layer: the handle of its offset hook and how many holds share it.
_HOOK_HANDLE, _HOOK_HOLDS = "_zo_hook_handle", "_zo_hook_holds"


class HookHold:
    """One hold on a layer's offset hook (from :func:`attach_hooks`).

    :meth:`remove` releases it (a second call does nothing); the layer's last
    hold removes the hook itself.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module: nn.Module | None = module

    def remove(self) -> None:
        """Release this hold; remove the hook if it was the layer's last one."""
        module, self.module = self.module, None
        if module is None or module.__dict__.get(_HOOK_HANDLE) is None:
            return
        module.__dict__[_HOOK_HOLDS] -= 1
        if module.__dict__[_HOOK_HOLDS] <= 0:
            module.__dict__.pop(_HOOK_HANDLE).remove()
            del module.__dict__[_HOOK_HOLDS]


def attach_hooks(modules: list[nn.Linear]) -> list[HookHold]:
    """Hold the offset hook on every linear layer not natively aware of offsets.

    Idempotent per layer: a layer that already carries the hook (a second optimizer
    on the same network, a second ``fit``) keeps its one hook and gains a hold, so the
    offset is added once. Release each hold with its ``remove()``.
    """
    holds = []
    for m in modules:
        if getattr(m, "_zo_native", False):
            continue
        if m.__dict__.get(_HOOK_HANDLE) is None:
            m.__dict__[_HOOK_HANDLE] = m.register_forward_hook(_hook)
            m.__dict__[_HOOK_HOLDS] = 0
        m.__dict__[_HOOK_HOLDS] += 1
        holds.append(HookHold(m))
    return holds


def has_offset_hook(module: nn.Module) -> bool:
    """Whether ``module`` carries the offset hook of :func:`attach_hooks`."""
    return module.__dict__.get(_HOOK_HANDLE) is not None


def linear_layers(module: nn.Module) -> Iterator[nn.Linear]:
    """Yield every ``nn.Linear`` inside ``module`` in definition order."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            yield m
