"""What the problem needs to know about an optimizer ("method").

First-order methods are any ``torch.optim.Optimizer`` built from the network's
parameters; the problem steps them the ordinary way (``step(closure)``, the
closure back-propagates the loss). At a non-finite loss under
``divergence="skip"`` the closure back-propagates nothing and returns NaN: a
method that then applies nothing declares it (:func:`withholds_nonfinite`).

Zeroth-order methods subclass :class:`ZerothOrderOptimizer`, the one protocol
between a forward-only method and :class:`~sdze_lightning.PINNProblem`. They are
built from the network module (they perturb its linear layers implicitly) and
stepped with

    ``optimizer.step(loss_at=fn, step_index=k)``

where ``fn(noise_key)`` evaluates the loss (forward only) with the collocation
points and estimator directions of ``noise_key``: the method chooses the keys
(the same key for the paired evaluations under CRNS, a fresh key per evaluation
without it). Lightning passes its own closure as ``closure``; the method calls
it once per step, after the evaluations and before the update, which is where
Lightning fires ``on_before_optimizer_step`` (once per training step).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from sdze_lightning.checks import non_negative_int

#: ``loss_at(noise_key)``: the loss with the random inputs (points, estimator
#: directions) of ``noise_key``, evaluated without back-propagation.
LossAt = Callable[[int], Tensor]


class ZerothOrderOptimizer(torch.optim.Optimizer):
    """Base class and protocol of forward-only optimizers.

    The problem uses nothing else of a zeroth-order method than what is declared
    here: :meth:`step`, :attr:`reducer`, :attr:`crns`, :attr:`seed`,
    :meth:`fold`, :meth:`close` and :meth:`describe_state`. A subclass implements
    :meth:`zo_step` (the step with its arguments checked) or :meth:`step` itself.

    Attributes:
        reducer: Combines the loss values of a step across data-parallel ranks
            (``None``: one process); the problem sets it under DDP to
            :func:`~sdze_lightning.distributed.all_reduce_mean`.
        crns: Whether every evaluation of a step uses noise key ``0`` (the
            step's shared batch, which ``prefetch`` builds ahead).
        seed: Seed of the method's own random numbers (checked on resume).

    """

    reducer: Callable[[Tensor], Tensor] | None = None
    crns: bool = True
    seed: int | None = None

    def __init__(self, module: nn.Module, defaults: dict[str, Any]) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"{type(self).__name__} is built from the network module, got {type(module)}."
            )
        super().__init__([p for p in module.parameters() if p.requires_grad], defaults)
        self.module = module

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | None = None,
        *,
        loss_at: LossAt | None = None,
        step_index: int | None = None,
        skip_nonfinite: bool = False,
    ) -> Tensor:
        """One step of training step ``step_index``; returns the mean evaluated loss.

        Args:
            closure: With ``loss_at``: called once after the evaluations and before
                the update (Lightning's hook point); its value is not used.
                Without ``loss_at``: the loss itself, for losses that do not depend
                on a noise key.
            loss_at: Evaluates the loss for a noise key.
            step_index: Index of the step (its directions are a function of it);
                ``None``: the method's own counter.
            skip_nonfinite: On non-finite loss values apply nothing, count the step
                as done and return a NaN loss, instead of raising
                :class:`~sdze_lightning.divergence.NonFiniteLossError` (then nothing
                is applied and the counter does not advance).

        """
        if loss_at is None:
            if closure is None:
                raise ValueError(
                    f"{type(self).__name__}.step() needs loss_at=fn (fn(noise_key) -> loss) "
                    "or a closure that evaluates the loss."
                )
            loss, closure = closure, None
            loss_at = lambda key: loss()  # noqa: E731 - a noise-free loss ignores the key
        if step_index is not None:
            non_negative_int("step_index", step_index)
        return self.zo_step(loss_at, step_index, closure, skip_nonfinite)

    def zo_step(
        self,
        loss_at: LossAt,
        step_index: int | None,
        ready: Callable[[], Any] | None,
        skip_nonfinite: bool,
    ) -> Tensor:
        """The step itself, with the arguments of :meth:`step` checked.

        Args:
            loss_at: Evaluates the loss for a noise key.
            step_index: Index of the step, or ``None`` (the method's own counter).
            ready: Call once after the evaluations, before the update (or ``None``).
            skip_nonfinite: As in :meth:`step`.

        """
        raise NotImplementedError(f"{type(self).__name__} must implement zo_step().")

    def fold(self) -> None:
        """Write any implicit offset into the weights (the default has none)."""

    def close(self) -> None:
        """Leave the network a plain module (fold; release hooks); the default folds."""
        self.fold()

    def describe_state(self) -> str:
        """One line of the method's state for divergence reports."""
        lrs = [g.get("lr") for g in self.param_groups]
        return f"{type(self).__name__}(lr={lrs[0] if len(lrs) == 1 else lrs})"


def _target(factory: Any) -> Any:
    while isinstance(factory, functools.partial):
        factory = factory.func
    return factory


def is_zeroth_order(factory: Any) -> bool:
    """Whether an optimizer class, instance or partial is zeroth-order."""
    target = _target(factory)
    if isinstance(target, type):
        return issubclass(target, ZerothOrderOptimizer)
    return isinstance(target, ZerothOrderOptimizer)


def takes_module(factory: Any) -> bool:
    """Whether an optimizer is built from the network module (zeroth-order, ``takes_module``)."""
    return is_zeroth_order(factory) or bool(getattr(_target(factory), "takes_module", False))


def needs_forward_only_estimator(factory: Any) -> bool:
    """Whether a method refuses estimators that back-propagate through ``x``."""
    return bool(getattr(_target(factory), "needs_forward_only_estimator", False))


#: ``torch.optim`` classes whose ``step`` skips every parameter without a gradient: after a
#: closure that back-propagated nothing they change neither a parameter nor their state.
NO_GRADIENT_NO_CHANGE: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD,
)


def withholds_nonfinite(factory: Any) -> bool:
    """Whether a method applies nothing, by itself, at a step whose loss is non-finite.

    A zeroth-order method checks its loss values before its update. A first-order method
    is stepped with a closure that, at a non-finite loss (under ``divergence="skip"``),
    back-propagates nothing (every ``.grad`` stays ``None``) and returns NaN; it withholds
    the step when its class says ``withholds_nonfinite_step = True`` or is one of
    :data:`NO_GRADIENT_NO_CHANGE` exactly (a subclass may override ``step``). For any
    other method the problem copies the parameters and the optimizer state before such a
    step and puts them back after it (:func:`~sdze_lightning.stepping.snapshot`).

    Args:
        factory: An optimizer class, instance or partial.

    """
    target = _target(factory)
    cls = target if isinstance(target, type) else type(target)
    if issubclass(cls, ZerothOrderOptimizer):
        return True
    declared = getattr(cls, "withholds_nonfinite_step", None)
    if declared is not None:
        return bool(declared)
    return cls in NO_GRADIENT_NO_CHANGE


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
    cls = target if isinstance(target, type) else type(target)
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
