"""What the problem needs to know about an optimizer ("method").

First-order methods are any ``torch.optim.Optimizer`` built from the network's
parameters; the problem steps them the ordinary way (``step(closure)``, the
closure back-propagates the loss). At a non-finite loss under
``divergence="skip"`` the closure back-propagates nothing and returns NaN: a
method that then applies nothing declares it (:func:`withholds_nonfinite`).
Zeroth-order methods subclass
:class:`~sdze_lightning.methods.zeroth_order.ZerothOrderOptimizer` (their protocol).

What the problem needs to know about a method's class (how it is built, what it
needs, what it does at a skipped step) it reads from the class's declared
:class:`MethodTraits` (:func:`traits_of`), never from attributes of a partial.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class MethodTraits:
    """What the problem needs to know about a method's class, declared once per class.

    Attributes:
        zeroth_order: Stepped with ``step(loss_at=...)`` (a :class:`ZerothOrderOptimizer`).
        takes_module: Built from the network module instead of its parameters.
        needs_forward_only_estimator: Refuses estimators that back-propagate through ``x``.
        needs_residuals: Its ``step`` takes ``residuals`` and ``points`` (per-point
            residual gradients, e.g. ``pde_aware``); it sees the whole batch on every rank.
        withholds_nonfinite_step: Applies nothing, by itself, at a step whose closure
            back-propagated nothing and returned NaN (``divergence="skip"``); otherwise
            the problem copies the parameters and state around such a step.
        reduces_input_layer: Exchanges its input layer's gradient between data-parallel
            ranks itself: its ``step`` takes ``shard`` (this rank's share) and DDP leaves
            that weight alone.

    """

    zeroth_order: bool = False
    takes_module: bool = False
    needs_forward_only_estimator: bool = False
    needs_residuals: bool = False
    withholds_nonfinite_step: bool = False
    reduces_input_layer: bool = False


@dataclass(frozen=True)
class FirstOrderStep:
    """What a first-order method that declares extra needs receives for one step.

    The problem passes it as ``step(closure, request=...)`` to a method whose traits
    declare ``needs_residuals`` or ``reduces_input_layer``; any other optimizer gets
    ``step(closure)`` (torch's protocol). The zeroth-order counterpart is
    :class:`~sdze_lightning.methods.zeroth_order.ZerothOrderStep`.

    Attributes:
        closure: Computes the loss and back-propagates it; returns the loss (NaN, nothing
            back-propagated, at a non-finite step that is skipped).
        step_index: Index of the training step.
        skip_nonfinite: Whether a non-finite step is skipped rather than raised.
        residuals: ``residuals(rows=None)``: the per-point interior residual ``(N,)`` and the
            weighted boundary term (or ``None``), differentiable in the parameters
            (``needs_residuals``); ``None`` otherwise.
        points: ``N``, the step's interior points (with ``residuals``).
        shard: This rank's share of the batch under data parallelism
            (``reduces_input_layer``; :class:`~sdze_lightning.distributed.Shard`), or
            ``None``: one process.

    """

    closure: Callable[[], Tensor]
    step_index: int
    skip_nonfinite: bool = False
    residuals: Callable[..., tuple[Tensor, Tensor | None]] | None = None
    points: int | None = None
    shard: Any = None


def _target(factory: Any) -> Any:
    while isinstance(factory, functools.partial):
        factory = factory.func
    return factory


def method_class(factory: Any) -> type:
    """The class of a method given as a class, an instance or a (nested) partial."""
    target = _target(factory)
    return target if isinstance(target, type) else type(target)


#: ``torch.optim`` classes whose ``step`` skips every parameter without a gradient: after a
#: closure that back-propagated nothing they change neither a parameter nor their state.
NO_GRADIENT_NO_CHANGE: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD,
)


def traits_of(factory: Any) -> MethodTraits:
    """The :class:`MethodTraits` of a method class, instance or partial.

    A class declares them as ``traits``; any other optimizer class (``torch.optim``'s, a
    user's) is first-order, built from the parameters, and withholds a skipped step only
    if it is one of :data:`NO_GRADIENT_NO_CHANGE` exactly (a subclass may override
    ``step``).
    """
    cls = method_class(factory)
    declared = getattr(cls, "traits", None)
    if isinstance(declared, MethodTraits):
        return declared
    return MethodTraits(withholds_nonfinite_step=cls in NO_GRADIENT_NO_CHANGE)


def is_zeroth_order(factory: Any) -> bool:
    """Whether an optimizer class, instance or partial is zeroth-order."""
    return traits_of(factory).zeroth_order


def takes_module(factory: Any) -> bool:
    """Whether an optimizer is built from the network module (:class:`MethodTraits`)."""
    return traits_of(factory).takes_module


def needs_forward_only_estimator(factory: Any) -> bool:
    """Whether a method refuses estimators that back-propagate through ``x``."""
    return traits_of(factory).needs_forward_only_estimator


def withholds_nonfinite(factory: Any) -> bool:
    """Whether a method applies nothing, by itself, at a step whose loss is non-finite.

    A zeroth-order method checks its loss values before its update. A first-order method
    is stepped with a closure that, at a non-finite loss (under ``divergence="skip"``),
    back-propagates nothing (every ``.grad`` stays ``None``) and returns NaN; whether it
    then withholds the step is its traits' ``withholds_nonfinite_step``. For any other
    method the problem copies the parameters and the optimizer state before such a step
    and puts them back after it (:func:`~sdze_lightning.stepping.snapshot`).

    Args:
        factory: An optimizer class, instance or partial.

    """
    return traits_of(factory).withholds_nonfinite_step


def gradient_numel(factory: Any, module: nn.Module) -> int:
    """Numbers of the dense gradients a method keeps for ``module`` (0: zeroth-order).

    A method that keeps some gradients in another form says so with a static
    ``gradient_numel(module)``; any other first-order method has one per parameter.
    """
    if is_zeroth_order(factory):
        return 0
    own = getattr(_target(factory), "gradient_numel", None)
    if callable(own):
        return int(own(module))
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


#: Parameter-sized state tensors of ``torch.optim`` classes (``amsgrad`` adds one to Adam's,
#: ``momentum`` gives SGD one).
STATE_PER_PARAMETER: dict[type[torch.optim.Optimizer], int] = {
    torch.optim.Adam: 2, torch.optim.AdamW: 2, torch.optim.SGD: 0,
}


def state_numel(factory: Any, module: nn.Module) -> int:
    """Numbers of the parameter-sized optimizer state a first-order method keeps (a lower bound).

    A method declares ``state_per_parameter`` (an int, or a function of the partial's
    keywords); the ``torch.optim`` classes of :data:`STATE_PER_PARAMETER` are known; any
    other method, a zeroth-order one and one that keeps its gradients in another form
    (``gradient_numel``: its state is that of its small layers) counts ``0``.
    """
    if is_zeroth_order(factory):
        return 0
    target = _target(factory)
    cls = method_class(factory)
    keywords = dict(getattr(factory, "keywords", {})) if isinstance(
        factory, functools.partial) else dict(getattr(target, "defaults", {}))
    per = getattr(cls, "state_per_parameter", None)
    if callable(per):
        per = per(**keywords)
    if per is None:
        if callable(getattr(cls, "gradient_numel", None)):
            return 2 * gradient_numel(factory, module)  # Adam on the dense-gradient layers
        base = next((k for k in cls.__mro__ if k in STATE_PER_PARAMETER), None)
        if base is None:
            return 0
        per = STATE_PER_PARAMETER[base]
        per += int(base is torch.optim.SGD and bool(keywords.get("momentum", 0)))
        per += int(base is not torch.optim.SGD and bool(keywords.get("amsgrad", False)))
    return int(per) * sum(p.numel() for p in module.parameters() if p.requires_grad)


def step_temporary_numel(factory: Any, module: nn.Module) -> int:
    """Numbers a method allocates within a step beside its state (a lower bound).

    A method declares them with a static ``step_temporary_numel(module, **keywords)``
    (``keywords``: the partial's); others count ``0``.
    """
    target = _target(factory)
    own = getattr(target if isinstance(target, type) else type(target),
                  "step_temporary_numel", None)
    if not callable(own):
        return 0
    keywords = dict(factory.keywords) if isinstance(factory, functools.partial) else {}
    return int(own(module, **keywords))


def build_optimizer(
    factory: Callable[..., torch.optim.Optimizer], module: nn.Module
) -> torch.optim.Optimizer:
    """Build an optimizer from a class or partial.

    Zeroth-order methods and those with ``takes_module = True`` get the module,
    others its parameters.
    """
    if takes_module(factory):
        return factory(module)
    return factory(module.parameters())
