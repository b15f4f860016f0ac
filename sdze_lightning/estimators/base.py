"""The interface every spatial derivative estimator implements.

An estimator turns the solution ``u`` (a :class:`~sdze_lightning.model_fn.ModelFunction`),
collocation points ``x`` and a set of operator names into a dict of tensors,
one ``(N,)`` tensor per operator (``(N, d)`` for ``"grad"``). All randomness
comes from the ``generator`` argument: the same generator state gives
bit-identical estimates, which is what Common Random Numbers Synchronisation
(CRNS) relies on. No estimator touches the global RNG.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from typing import ClassVar

import torch
from torch import Tensor

from sdze_lightning.model_fn import ModelFunction

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


class Estimator(ABC):
    """Base class of the spatial derivative estimators.

    Subclasses set ``name``, ``operators`` (those they can estimate) and
    ``forward_only`` (``True`` if they never back-propagate through ``x``).
    """

    name: ClassVar[str] = "estimator"
    operators: ClassVar[frozenset[str]] = frozenset()
    forward_only: ClassVar[bool] = False
    #: Most reverse passes one estimate may take (:meth:`reverse_passes`) before the
    #: pre-flight refuses the run; ``None``: no bound.
    max_reverse_passes: int | None = None

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

    @abstractmethod
    def estimate(
        self,
        model: ModelFunction | Callable[[Tensor], Tensor],
        x: Tensor,
        ops: Collection[str],
        generator: torch.Generator,
        spatial_dim: int,
    ) -> dict[str, Tensor]:
        """Estimate the operators ``ops`` of ``model`` at the points ``x``.

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
        """

    def halves(self) -> tuple[Estimator, Estimator]:
        """Two estimators with half the random directions each.

        Used for the unbiased squared residual ``r_1 * r_2``. Deterministic
        estimators cannot make independent halves and raise ``ValueError``;
        randomized ones return :meth:`split_directions`.
        """
        raise ValueError(
            f"estimator={self.name} is deterministic: the squared residual is already "
            "unbiased; use problem.squared_residual=biased."
        )

    def split_directions(self, minimum: int) -> tuple[Estimator, Estimator]:
        """Two copies with ``num_directions // 2`` random directions each (independent draws).

        For randomized estimators, which keep their direction count in ``num_directions``.

        Args:
            minimum: Fewest ``num_directions`` that still give two usable halves.

        Raises:
            ValueError: ``num_directions`` is below ``minimum``.

        """
        if self.num_directions < minimum:
            raise ValueError(
                f"estimator={self.name} needs num_directions >= {minimum} for "
                "squared_residual=unbiased (two independent halves)."
            )
        half = copy.copy(self)
        half.num_directions = self.num_directions // 2
        return half, copy.copy(half)
