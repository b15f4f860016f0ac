"""Taylor-mode estimator: exact directional derivatives by forward-mode jets.

``D_v^k u(x)``, ``k <= 4``, comes from :meth:`ModelFunction.jets`: for an
:class:`~sdze_lightning.nn.MLP` a hand-written Taylor-mode pass through the
first-layer shortcut (``W x`` once per point, a coordinate direction is a
column lookup), for any other network nested ``torch.func.jvp``. Neither
back-propagates, so the estimate is forward-only and, under
``torch.no_grad()``, builds no graph; with gradients enabled it stays
differentiable with respect to the parameters (Adam over ``taylor`` needs one
backward pass). The randomness is only in the choice of directions (STDE-style);
the derivatives along them are exact. See
:mod:`sdze_lightning.estimators.directional` for how they are combined.
"""

from __future__ import annotations

from collections.abc import Collection

from torch import Tensor

from sdze_lightning.directions import Directions
from sdze_lightning.estimators.directional import DirectionalEstimator
from sdze_lightning.model_fn import ModelFunction


class TaylorEstimator(DirectionalEstimator):
    """Forward-mode jets along random directions (orders 1 to 4).

    Args:
        num_directions: Directions ``K`` per set.
        distribution: ``"coordinate"`` (default; axes without replacement,
            scaled ``d / K``, dimension-free through the first-layer shortcut),
            ``"rademacher"`` or ``"gaussian"`` (dense, ``W v`` costs ``K * d``).

    """

    name = "taylor"
    operators = frozenset({"u", "grad", "grad_norm2", "laplacian", "dt", "third", "biharmonic"})
    forward_only = True

    def directional(
        self,
        model: ModelFunction,
        x: Tensor,
        dirs: Directions,
        orders: Collection[int],
        u0: Tensor | None = None,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Exact ``u`` and ``D_v^k u`` for ``k`` in ``orders`` from one jet pass."""
        jet = model.jets(x, dirs, max(orders))
        return jet[0], {k: jet[k] for k in orders}

    def directional_means(
        self,
        model: ModelFunction,
        x: Tensor,
        dirs: Directions,
        orders: Collection[int],
        u0: Tensor | None = None,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """One jet pass with the highest order carried summed over the directions.

        For a Laplacian from ``K`` directions the network's products then take
        ``N (K + 2)`` rows instead of ``N (2 K + 1)`` (``sum_top`` of
        :meth:`ModelFunction.jets`).
        """
        top = max(orders)
        jet = model.jets(x, dirs, top, sum_top=True)
        k = dirs.count
        return jet[0], {
            o: jet[o] if o == 1 else (jet[o] / k if o == top else jet[o].mean(dim=0))
            for o in orders
        }
