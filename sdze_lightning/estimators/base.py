"""The interface every spatial derivative estimator implements.

An estimator turns the solution ``u`` (a :class:`~sdze_lightning.model_fn.ModelFunction`),
collocation points ``x`` and a set of operator names into a dict of tensors,
one ``(N,)`` tensor per operator (``(N, d)`` for ``"grad"``). All randomness
comes from the ``generator`` argument: the same generator state gives
bit-identical estimates, which is what Common Random Numbers Synchronisation
(CRNS) relies on. No estimator touches the global RNG.

:meth:`Estimator.estimate` is a template method: it does what every estimate starts
with (the solution as a ``ModelFunction``, the operators checked) and hands over to
the estimator's :meth:`Estimator._estimate`. Constructor arguments are
:class:`Parameter` attributes, each validated by the one function it is declared
with, and ``repr`` lists them.
"""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from typing import Any, ClassVar, Generic, TypeVar, overload

import torch
from torch import Tensor

from sdze_lightning.checks import integer
from sdze_lightning.model_fn import ModelFunction, as_model_function
from sdze_lightning.template_method import allow_public_override

#: Operators a residual may ask for, with their meaning.
OPERATORS: dict[str, str] = {
    "u": "value u(x)",
    "grad": "spatial gradient, shape (N, d)",
    "grad_norm2": "|grad_x u|^2",
    "laplacian": "Delta_x u (spatial coordinates only)",
    "dt": "du/dt, the derivative along the last (time) coordinate",
    "third": "sum_i d^3 u / dx_i^3 (third-order directional term; u_xxx in 1D)",
    "biharmonic": "Delta_x^2 u",
}

T = TypeVar("T")


class Parameter(Generic[T]):
    """A constructor argument kept as an attribute of the same name, validated when set.

    Declared on an estimator class like a dataclass field, e.g.
    ``sigma = Parameter(positive_sigma)``; the constructor assigns
    ``self.sigma = sigma``. Every assignment, in the constructor or later (the halves
    of :meth:`Estimator.split_directions`), goes through ``check``. The value is kept
    in the instance's ``__dict__`` under the parameter's name, so copies and pickles
    carry it. :meth:`Estimator.parameter_values` lists the parameters set on an estimator.

    Args:
        check: ``check(estimator, key, value)`` returns the value to keep, or raises
            ``ValueError``; ``key`` is the config key ``"estimator.<name>"``, for the
            message.
        default: The value read while the parameter is not set.

    """

    def __init__(self, check: Callable[[Any, str, Any], T], default: T | None = None) -> None:
        self.check = check
        self.default = default
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Parameter[T]: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> T: ...

    def __get__(self, obj: object | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.get(self.name, self.default)

    def __set__(self, obj: object, value: object) -> None:
        obj.__dict__[self.name] = self.check(obj, f"estimator.{self.name}", value)


def direction_count(estimator: Estimator, key: str, value: object) -> int:
    """``num_directions``: an integer, at least the estimator's ``min_directions``."""
    return integer(key, value, minimum=estimator.min_directions)


def reverse_pass_bound(estimator: Estimator, key: str, value: object) -> int | None:
    """``max_reverse_passes``: a positive count, or ``None`` for no bound."""
    return None if value is None else integer(key, value, minimum=1)


class Estimator(ABC):
    """Base class of the spatial derivative estimators.

    Subclasses set ``name``, ``operators`` (those they can estimate) and
    ``forward_only`` (``True`` if they never back-propagate through ``x``), and
    implement :meth:`_estimate`, which :meth:`estimate` calls once the operators are
    checked. A subclass may override :meth:`estimate` instead (it then does its own
    opening).

    Randomized estimators keep their direction count in :attr:`num_directions`;
    deterministic ones leave it unset (``None``).
    """

    name: ClassVar[str] = "estimator"
    operators: ClassVar[frozenset[str]] = frozenset()
    forward_only: ClassVar[bool] = False
    #: Whether :meth:`estimate` runs :meth:`_estimate` inside
    #: :meth:`ModelFunction.shared_first_layer` (``W x`` computed once for all the
    #: evaluations without gradients on the same points).
    shares_first_layer: ClassVar[bool] = False
    #: Fewest random directions an estimate works with; :meth:`halves` keeps at least
    #: this many in each half.
    min_directions: ClassVar[int] = 1

    #: Random directions per estimate; ``None`` for a deterministic estimator.
    num_directions = Parameter(direction_count)
    #: Most reverse passes one estimate may take (:meth:`reverse_passes`) before the
    #: pre-flight refuses the run; ``None``: no bound.
    max_reverse_passes = Parameter(reverse_pass_bound)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        allow_public_override(cls, "estimate", "_estimate")

    @classmethod
    def parameter_names(cls) -> tuple[str, ...]:
        """Names of the :class:`Parameter` attributes of the class, base classes' first."""
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            for key, attr in vars(klass).items():
                if isinstance(attr, Parameter) and key not in names:
                    names.append(key)
        return tuple(names)

    def parameter_values(self) -> dict[str, Any]:
        """The parameters set on this estimator (by its constructor), name -> value."""
        return {key: getattr(self, key) for key in self.parameter_names() if key in vars(self)}

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.parameter_values().items())
        return f"{type(self).__name__}({args})"

    def step_numel(self, points: int, input_dim: int, hidden: int, graph: bool) -> int:
        """Numbers one estimate allocates at its peak beside the batch (the memory pre-flight's).

        Args:
            points: Collocation points ``N``.
            input_dim: Inputs per point.
            hidden: The network's hidden units (the output sizes of its linear layers, summed).
            graph: Whether the parameters' gradient is taken through the estimate (a
                first-order method keeps its graph).

        The default, ``0``, is that of an estimator whose temporaries are a few ``(N, width)``
        activations (negligible beside the parameters and the batch).
        """
        return 0

    def reverse_passes(self, ops: Collection[str], spatial_dim: int) -> int:
        """Reverse (back-propagation) passes through the network of one estimate of ``ops``.

        The pre-flight (:func:`~sdze_lightning.input_checks.check_reverse_passes`) compares
        it with :attr:`max_reverse_passes`. The default, ``0``, is that of an estimator whose
        passes do not grow with ``spatial_dim`` (forward-only ones, or batched products).
        """
        return 0

    def check(self, ops: Collection[str]) -> None:
        """Raise ``ValueError`` if an operator in ``ops`` is unknown or unsupported."""
        unknown = sorted(set(ops) - set(OPERATORS))
        if unknown:
            raise ValueError(
                f"Unknown operator(s) {unknown}; available: {sorted(OPERATORS)}."
            )
        missing = sorted(set(ops) - set(self.operators))
        if missing:
            raise ValueError(
                f"estimator={self.name} cannot provide {missing} (it supports "
                f"{sorted(self.operators)}); choose another estimator for this PDE."
            )

    def estimate(
        self,
        model: ModelFunction | Callable[[Tensor], Tensor],
        x: Tensor,
        ops: Collection[str],
        generator: torch.Generator,
        spatial_dim: int,
    ) -> dict[str, Tensor]:
        """Estimate the operators ``ops`` of ``model`` at the points ``x``.

        Wraps ``model`` as a :class:`~sdze_lightning.model_fn.ModelFunction`, refuses
        operators the estimator cannot provide (:meth:`check`), then returns
        :meth:`_estimate` (inside :meth:`ModelFunction.shared_first_layer` when
        :attr:`shares_first_layer`).

        Args:
            model: The solution as a function of the points: a
                :class:`~sdze_lightning.model_fn.ModelFunction` (``problem.model``) or
                any callable ``(N, D) -> (N,)`` such as ``problem.exact_solution``
                (wrapped by :func:`~sdze_lightning.model_fn.as_model_function`).
            x: Points ``(N, D)``; the first ``spatial_dim`` columns are space,
                a further last column, if any, is time.
            ops: Operator names (keys of :data:`OPERATORS`).
            generator: The only source of randomness.
            spatial_dim: Number of spatial coordinates ``d``.

        Returns:
            A dict from operator name to estimate.

        Raises:
            TypeError: ``model`` is not callable.
            ValueError: An operator in ``ops`` is unknown or unsupported.

        """
        model = as_model_function(model)
        ops = set(ops)
        self.check(ops)
        shared = model.shared_first_layer() if self.shares_first_layer else contextlib.nullcontext()
        with shared:
            return self._estimate(model, x, ops, generator, spatial_dim)

    @abstractmethod
    def _estimate(
        self,
        model: ModelFunction,
        x: Tensor,
        ops: set[str],
        generator: torch.Generator,
        spatial_dim: int,
    ) -> dict[str, Tensor]:
        """The estimator's own computation, called by :meth:`estimate` after the checks.

        Args:
            model: The solution.
            x: Points ``(N, D)``.
            ops: Operator names, all supported by the estimator.
            generator: The only source of randomness.
            spatial_dim: Number of spatial coordinates ``d``.

        Returns:
            A dict from operator name to estimate.

        """

    def halves(self) -> tuple[Estimator, Estimator]:
        """Two estimators with half the random directions each.

        Used for the unbiased squared residual ``r_1 * r_2``. Deterministic estimators
        (:attr:`num_directions` unset) cannot make independent halves and raise
        ``ValueError``; randomized ones return :meth:`split_directions`, each half
        keeping at least :attr:`min_directions`.
        """
        if self.num_directions is None:
            raise ValueError(
                f"estimator={self.name} is deterministic: the squared residual is already "
                "unbiased; use problem.squared_residual=biased."
            )
        return self.split_directions(2 * self.min_directions)

    def split_directions(self, minimum: int) -> tuple[Estimator, Estimator]:
        """Two copies with ``num_directions // 2`` random directions each (independent draws).

        For randomized estimators, which keep their direction count in ``num_directions``.

        Args:
            minimum: Fewest ``num_directions`` that still give two usable halves.

        Raises:
            ValueError: ``num_directions`` is unset or below ``minimum``.

        """
        if self.num_directions is None or self.num_directions < minimum:
            raise ValueError(
                f"estimator={self.name} needs num_directions >= {minimum} for "
                "squared_residual=unbiased (two independent halves)."
            )
        half = copy.copy(self)
        half.num_directions = self.num_directions // 2
        return half, copy.copy(half)
