"""Implicit low-rank parameter offsets for ``nn.Linear`` layers.

A zeroth-order method evaluates the network at ``W + A C B^T`` without writing
to ``W``: every linear layer adds ``x B C^T A^T + A c_b`` to its output. The
offsets are kept in this module's table, by layer (:func:`set_offset`,
:func:`delta_of`), not on the layers: nothing is written onto a user's modules.

A network that applies the offsets itself declares ``applies_linear_offsets =
True`` (the library's :class:`~sdze_lightning.nn.mlp.MLP`: it reads the offset
directly, which lets it reuse ``W x`` across evaluations and evaluate directional
derivatives of the first layer by a column lookup). Every other ``nn.Linear``
gets the same offset through a forward hook (:func:`attach_hooks`), so a
user-defined network trains with SDZE unchanged. A layer carries at most one
such hook, however many optimizers hold it; the last hold released removes it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
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


#: The active offset of each perturbed layer (weakly keyed: a layer's entry goes with it).
_OFFSETS: weakref.WeakKeyDictionary[nn.Module, LowRankDelta] = weakref.WeakKeyDictionary()
#: The offset hook of each hooked layer and how many holds share it.
_HOOKS: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


def delta_of(module: nn.Module) -> LowRankDelta | None:
    """Return the active offset of ``module`` (``None`` when unperturbed)."""
    return _OFFSETS.get(module)


def set_offset(module: nn.Module, delta: LowRankDelta | None) -> None:
    """Make ``delta`` the active offset of ``module`` (``None``: unperturbed)."""
    if delta is None:
        _OFFSETS.pop(module, None)
    else:
        _OFFSETS[module] = delta


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
    if delta is None:
        return None
    out = output + delta.linear(inputs[0].to(delta.B.dtype)).to(output.dtype)
    if delta.cb is not None:
        out = out + delta.bias().to(output.dtype)
    return out


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
        entry = None if module is None else _HOOKS.get(module)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _HOOKS[module]
            entry[0].remove()


def attach_hooks(
    network: nn.Module, layers: Iterable[nn.Linear] | None = None
) -> list[HookHold]:
    """Hold the offset hook on the linear layers of ``network`` that it does not perturb itself.

    ``layers`` (default: every ``nn.Linear`` of ``network``) inside a submodule that
    declares ``applies_linear_offsets`` (:func:`native_layers`) get no hook.
    Idempotent per layer: a layer that already carries the hook (a second optimizer
    on the same network, a second ``fit``) keeps its one hook and gains a hold, so the
    offset is added once. Release each hold with its ``remove()``.
    """
    native = native_layers(network)
    holds = []
    for m in linear_layers(network) if layers is None else layers:
        if id(m) in native:
            continue
        entry = _HOOKS.get(m)
        if entry is None:
            entry = _HOOKS[m] = [m.register_forward_hook(_hook), 0]
        entry[1] += 1
        holds.append(HookHold(m))
    return holds


def native_layers(network: nn.Module) -> set[int]:
    """``id`` of every layer inside a submodule that declares ``applies_linear_offsets``."""
    return {id(layer) for sub in network.modules()
            if getattr(type(sub), "applies_linear_offsets", False)
            for layer in sub.modules()}


def has_offset_hook(module: nn.Module) -> bool:
    """Whether ``module`` carries the offset hook of :func:`attach_hooks`."""
    return module in _HOOKS


def linear_layers(module: nn.Module) -> Iterator[nn.Linear]:
    """Yield every ``nn.Linear`` inside ``module`` in definition order."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            yield m
