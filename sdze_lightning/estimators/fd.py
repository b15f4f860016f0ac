"""Finite-difference estimator: central stencils along random directions.

``D_v^k u(x)`` is approximated from values on the line ``x + t v`` obtained
through :meth:`ModelFunction.line` (first-layer shortcut for MLPs: ``W x`` once
per point, ``W v`` a column lookup for a coordinate axis). Stencils (second
order accurate, truncation error ``O(h^2)``):

* ``k = 1``: ``(f(h) - f(-h)) / (2h)``
* ``k = 2``: ``(f(h) - 2 f(0) + f(-h)) / h^2``
* ``k = 3``: ``(f(2h) - 2 f(h) + 2 f(-h) - f(-2h)) / (2 h^3)``
* ``k = 4``: ``(f(2h) - 4 f(h) + 6 f(0) - 4 f(-h) + f(-2h)) / h^4``

Round-off grows like ``eps / h^k`` and truncation like ``h^2``, so the default
step is ``h_k = eps^(1 / (k + 2))``, ``eps`` the machine epsilon of the points'
dtype (float64: 6e-6, 1.2e-4, 7.4e-4, 2.4e-3; float32: 4.9e-3, 1.9e-2, 4.1e-2,
6.9e-2 for ``k = 1..4``); ``step`` overrides it. Dense directions are stepped
along the unit vector ``v / |v|`` and rescaled by ``|v|^k``, so the step is a
distance whatever ``|v|`` (about ``sqrt(d)``). The estimate is forward-only and
biased by the truncation error; in float64 the bias is far below the sampling
noise of the random directions.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import Tensor

from sdze_lightning.directions import Directions
from sdze_lightning.estimators.base import Estimator, Parameter
from sdze_lightning.estimators.directional import DirectionalEstimator
from sdze_lightning.model_fn import ModelFunction

#: Stencils: order -> ((multiple of h, weight), ...); divide by h^order.
STENCILS: dict[int, tuple[tuple[int, float], ...]] = {
    1: ((1, 0.5), (-1, -0.5)),
    2: ((1, 1.0), (0, -2.0), (-1, 1.0)),
    3: ((2, 0.5), (1, -1.0), (-1, 1.0), (-2, -0.5)),
    4: ((2, 1.0), (1, -4.0), (0, 6.0), (-1, -4.0), (-2, 1.0)),
}


def default_step(dtype: torch.dtype, order: int) -> float:
    """Step ``eps^(1 / (order + 2))``: balances ``h^2`` truncation and ``eps / h^k`` round-off."""
    if order not in STENCILS:
        raise ValueError(f"Finite differences are implemented for orders 1 to 4, got {order}.")
    return float(torch.finfo(dtype).eps) ** (1.0 / (order + 2))


def central_differences(
    model: ModelFunction,
    x: Tensor,
    dirs: Directions,
    orders: Mapping[int, float],
    u0: Tensor | None = None,
) -> tuple[Tensor, dict[int, Tensor]]:
    """Central-difference ``D_v^k u`` for every ``k`` in ``orders`` with step ``orders[k]``.

    All stencil points go through one :meth:`ModelFunction.line` call.

    Args:
        model: The solution.
        x: Points ``(N, D)``.
        dirs: ``K`` directions.
        orders: Order -> step size ``h``.
        u0: ``u(x)`` if already known.

    Returns:
        ``u(x)`` ``(N,)`` and a dict order -> ``(K, N)`` estimate.

    """
    u0 = model(x) if u0 is None else u0
    norms = None
    if dirs.dense is not None:
        # Step a distance h whatever |v| (~ sqrt(d) for dense directions): equal
        # norms (Rademacher) shrink the step to h / |v|; otherwise step along
        # v / |v| and rescale, D_v^k = |v|^k D_{v/|v|}^k.
        norms = dirs.dense.to(x.dtype).norm(dim=1)
        if bool((norms == norms[0]).all()):
            orders = {k: h / float(norms[0]) for k, h in orders.items()}
            norms = None
        else:
            dirs = Directions(dirs.dim, dense=dirs.dense.to(x.dtype) / norms[:, None])
    ts = sorted({m * h for k, h in orders.items() for m, _ in STENCILS[k] if m != 0})
    vals = model.line(x, dirs, ts) if ts else None
    where = {t: i for i, t in enumerate(ts)}
    out: dict[int, Tensor] = {}
    for k, h in orders.items():
        acc = None
        for m, w in STENCILS[k]:
            term = w * (u0[None, :] if m == 0 else vals[where[m * h]])
            acc = term if acc is None else acc + term
        acc = acc.expand(dirs.count, x.shape[0]) / h**k
        out[k] = acc if norms is None else acc * norms[:, None] ** k
    return u0, out


def step_sizes(estimator: Estimator, key: str, value: object) -> float | dict[int, float] | None:
    """``step``: ``None``, one positive float, or a mapping order (1 to 4) -> positive float."""
    if isinstance(value, Mapping):
        step: float | dict[int, float] | None = {int(k): float(v) for k, v in value.items()}
        bad = {k: v for k, v in step.items() if k not in STENCILS or not v > 0}
    elif value is not None:
        step = float(value)  # type: ignore[arg-type]
        bad = {} if step > 0 else {"all": step}
    else:
        step, bad = None, {}
    if bad:
        raise ValueError(f"{key} must be positive, for orders 1 to 4; got {bad}.")
    return step


class FiniteDifferenceEstimator(DirectionalEstimator):
    """Central differences along random directions (orders 1 to 4), forward-only.

    Args:
        num_directions: Directions ``K`` per set.
        distribution: ``"coordinate"`` (default; axes without replacement,
            scaled ``d / K``), ``"rademacher"`` or ``"gaussian"``.
        step: Step size ``h``: ``None`` for the per-dtype, per-order default
            :func:`default_step`, one float for every order, or a mapping
            order -> step (missing orders keep the default).

    """

    name = "fd"
    operators = frozenset({"u", "grad", "grad_norm2", "laplacian", "dt", "third", "biharmonic"})
    forward_only = True
    #: Step size: ``None`` (the default per dtype and order), a float, or order -> step.
    step = Parameter(step_sizes)

    def __init__(
        self,
        num_directions: int = 16,
        distribution: str = "coordinate",
        step: float | Mapping[int, float] | None = None,
    ) -> None:
        super().__init__(num_directions, distribution)
        self.step = step

    def step_for(self, dtype: torch.dtype, order: int) -> float:
        """The step used for ``order`` on points of ``dtype``."""
        if isinstance(self.step, dict) and order in self.step:
            return self.step[order]
        if isinstance(self.step, float):
            return self.step
        return default_step(dtype, order)

    def directional(
        self,
        model: ModelFunction,
        x: Tensor,
        dirs: Directions,
        orders: Collection[int],
        u0: Tensor | None = None,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Central-difference ``D_v^k u`` for ``k`` in ``orders`` from one line evaluation."""
        return central_differences(
            model, x, dirs, {k: self.step_for(x.dtype, k) for k in sorted(orders)}, u0
        )
