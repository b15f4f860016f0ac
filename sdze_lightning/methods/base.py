"""What the problem needs to know about an optimizer ("method").

First-order methods are any ``torch.optim.Optimizer`` built from the network's
parameters. Zeroth-order methods subclass :class:`ZerothOrderOptimizer`: they
are built from the network module (they perturb its linear layers
implicitly), their ``step(closure)`` calls the closure several times without
back-propagation, and they announce through :attr:`ZerothOrderOptimizer.noise_key`
which random numbers each evaluation must use: the same key for the paired
evaluations under CRNS, a fresh key per evaluation without it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: First noise key of measurement probes (e.g.
#: :class:`~sdze_lightning.callbacks.EstimatorVarianceMonitor`): far above the keys
#: a training step uses (``0`` and ``1 .. 2 q``), so a probe never reuses a step's
#: collocation points or estimator directions.
PROBE_KEY_BASE = 1 << 40


class ZerothOrderOptimizer(torch.optim.Optimizer):
    """Base class of forward-only optimizers.

    Attributes:
        noise_key: Key of the collocation points and estimator directions the
            closure must use for the evaluation in progress.
    """

    noise_key: int = 0

    def __init__(self, module: nn.Module, defaults: dict[str, Any]) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"{type(self).__name__} is built from the network module, got {type(module)}."
            )
        super().__init__([p for p in module.parameters() if p.requires_grad], defaults)
        self.module = module


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
