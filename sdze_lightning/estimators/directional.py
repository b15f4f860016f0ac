"""Shared machinery of the estimators built from directional derivatives.

The ``fd``, ``taylor`` and ``hte`` estimators differ only in how they obtain
``D_v^k u(x)`` for a set of directions ``v`` shared by all points. Everything
else (which directions to draw, how to combine ``D_v^k u`` into the operators,
the two halves of the unbiased squared residual) lives in
:class:`DirectionalEstimator`.

Identities used (``E`` over the direction distribution):

* coordinate axes ``e_j`` drawn without replacement, ``|J| = K``:
  ``(d / K) sum_{j in J} a_j`` is unbiased for ``sum_j a_j`` (Laplacian,
  ``|grad u|^2``, the third-order term ``sum_j d^3u/dx_j^3``), and
  ``(d / K) sum_{j in J} (d_j u) e_j`` for the gradient;
* Rademacher or Gaussian ``v`` (``E[v v^T] = I``): ``E[D_v^2 u] = Delta u``,
  ``E[(D_v u)^2] = |grad u|^2``, ``E[(D_v u) v] = grad u``;
* Gaussian ``v`` only: ``E[D_v^4 u] = 3 Delta^2 u`` (Isserlis' theorem; for
  Rademacher ``v`` the pure fourth derivatives enter with weight 1 instead of 3).

Odd moments of a symmetric distribution vanish, so ``E[D_v^3 u] = 0`` and the
third-order term always uses coordinate axes. The sum of pure fourth
derivatives ``sum_j d^4u/dx_j^4`` from coordinate axes misses the mixed terms
``2 sum_{i<j} d^2_i d^2_j u`` of the biharmonic, so the biharmonic always uses
Gaussian directions (a separate set when ``distribution`` is not Gaussian),
which cost ``K * d`` for ``W v`` instead of a column lookup.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Collection
from typing import ClassVar

import torch
from torch import Tensor

from sdze_lightning.directions import (
    DISTRIBUTIONS,
    Directions,
    sample_coordinates,
    sample_directions,
    time_axis,
)
from sdze_lightning.estimators.base import Estimator, Parameter
from sdze_lightning.model_fn import ModelFunction

# The samplers live in sdze_lightning.directions; importing them from here keeps working.
__all__ = [
    "DirectionalEstimator",
    "sample_coordinates",
    "sample_directions",
    "scatter_gradient",
]


def scatter_gradient(d1: Tensor, dirs: Directions, spatial_dim: int, scale: float) -> Tensor:
    """Return ``scale / K * sum_k (D_{v_k} u) v_k`` restricted to space, ``(N, d)``.

    Args:
        d1: ``D_v u``, shape ``(K, N)``.
        dirs: The ``K`` directions.
        spatial_dim: Number of spatial coordinates ``d``.
        scale: ``d`` for coordinate axes (sparse, unbiased), ``1`` for dense ones.

    """
    k, n = d1.shape
    if dirs.index is not None:
        g = d1.new_zeros(n, spatial_dim)
        return g.index_add(1, dirs.index, d1.T) * (scale / k)
    return d1.T @ dirs.dense[:, :spatial_dim].to(d1.dtype) * (scale / k)


def distribution_name(estimator: DirectionalEstimator, key: str, value: object) -> str:
    """``distribution``: one of the estimator's ``distributions``."""
    if value not in estimator.distributions:
        raise ValueError(f"{key} must be one of {estimator.distributions}, got {value!r}.")
    return str(value)


class DirectionalEstimator(Estimator):
    """Base of estimators assembled from directional derivatives ``D_v^k u``.

    Subclasses implement :meth:`directional`. Operators:

    * ``grad``, ``grad_norm2``, ``laplacian``: from the main direction set
      (``distribution``);
    * ``third``: ``(d / K) sum_{j in J} d^3u/dx_j^3`` on coordinate axes (the
      main set when ``distribution="coordinate"``, else a separate set);
    * ``biharmonic``: ``mean_k D_v^4 u / 3`` over Gaussian directions (the main
      set when ``distribution="gaussian"``, else a separate set);
    * ``dt``: the derivative along the time axis (no randomness).

    Sets are drawn from ``generator`` in that order: main, third, biharmonic.

    Args:
        num_directions: Directions ``K`` per set (coordinate sets are capped at ``d``).
        distribution: ``"coordinate"``, ``"rademacher"`` or ``"gaussian"``.

    """

    shares_first_layer = True
    #: The values ``distribution`` may take.
    distributions: ClassVar[tuple[str, ...]] = DISTRIBUTIONS
    #: Distribution of the main direction set.
    distribution = Parameter(distribution_name)

    def __init__(self, num_directions: int = 16, distribution: str = "coordinate") -> None:
        self.num_directions = num_directions
        self.distribution = distribution

    @abstractmethod
    def directional(
        self,
        model: ModelFunction,
        x: Tensor,
        dirs: Directions,
        orders: Collection[int],
        u0: Tensor | None = None,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Directional derivatives along shared directions.

        Args:
            model: The solution.
            x: Points ``(N, D)``.
            dirs: ``K`` directions.
            orders: Orders wanted (subset of 1..4).
            u0: ``u(x)`` if already known (an implementation may reuse it).

        Returns:
            ``u(x)`` ``(N,)`` and a dict order ``k`` -> ``D_v^k u(x)``, ``(K, N)``.

        """

    def directional_means(
        self,
        model: ModelFunction,
        x: Tensor,
        dirs: Directions,
        orders: Collection[int],
        u0: Tensor | None = None,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """:meth:`directional` with every order >= 2 averaged over the directions.

        The operators use ``D_v u`` per direction (the gradient, ``|grad u|^2``)
        but only the mean over the directions of the higher orders, which an
        implementation may compute more cheaply (Taylor mode carries the highest
        order summed through the network).

        Returns:
            ``u(x)`` ``(N,)`` and a dict order -> ``D_v u`` ``(K, N)`` for order 1,
            ``mean_k D_{v_k}^k u`` ``(N,)`` for orders >= 2.

        """
        u, dv = self.directional(model, x, dirs, orders, u0)
        return u, {k: v if k == 1 else v.mean(dim=0) for k, v in dv.items()}

    def _estimate(
        self,
        model: ModelFunction,
        x: Tensor,
        ops: set[str],
        generator: torch.Generator,
        spatial_dim: int,
    ) -> dict[str, Tensor]:
        """Draw the direction sets and combine ``D_v^k u`` into ``ops`` (see the class notes)."""
        d, dim = spatial_dim, x.shape[1]
        if "dt" in ops:
            t_axis = time_axis(x, d)
        dist = self.distribution
        main_orders = set()
        if ops & {"grad", "grad_norm2"}:
            main_orders.add(1)
        if "laplacian" in ops:
            main_orders.add(2)
        if "third" in ops and dist == "coordinate":
            main_orders.add(3)
        if "biharmonic" in ops and dist == "gaussian":
            main_orders.add(4)
        # Draws happen in a fixed order so that one generator state fixes every set.
        k = self.num_directions
        main = (
            sample_directions(dist, k, dim, d, generator, x.dtype, x.device)
            if main_orders
            else None
        )
        third = (
            sample_directions("coordinate", k, dim, d, generator, x.dtype, x.device)
            if "third" in ops and dist != "coordinate"
            else None
        )
        bih = (
            sample_directions("gaussian", k, dim, d, generator, x.dtype, x.device)
            if "biharmonic" in ops and dist != "gaussian"
            else None
        )

        out: dict[str, Tensor] = {}
        u: Tensor | None = None
        if main is not None:
            u, dv = self.directional_means(model, x, main, main_orders)
            scale = float(d) if dist == "coordinate" else 1.0
            if "grad" in ops:
                out["grad"] = scatter_gradient(dv[1], main, d, scale)
            if "grad_norm2" in ops:
                out["grad_norm2"] = scale * (dv[1] * dv[1]).mean(dim=0)
            if "laplacian" in ops:
                out["laplacian"] = scale * dv[2]
            if 3 in dv and "third" in ops:
                out["third"] = scale * dv[3]
            if 4 in dv and "biharmonic" in ops:
                out["biharmonic"] = dv[4] / 3
        if third is not None:
            u, dv = self.directional_means(model, x, third, {3}, u)
            out["third"] = float(d) * dv[3]
        if bih is not None:
            u, dv = self.directional_means(model, x, bih, {4}, u)
            out["biharmonic"] = dv[4] / 3
        if "dt" in ops:
            u, dv = self.directional(model, x, t_axis, {1}, u)
            out["dt"] = dv[1][0]
        if "u" in ops:
            out["u"] = model(x) if u is None else u
        return out
