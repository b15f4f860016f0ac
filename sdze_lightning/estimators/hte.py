"""Hutchinson trace estimator (HTE) with ``torch.func`` Hessian-vector products.

``Delta u = E[v^T H v]`` for Rademacher (default, lower variance) or Gaussian
``v`` shared by all points; ``v^T H v = v . grad(v . grad u)`` by nested
``torch.func.grad`` (a Hessian-vector product), all directions in one batched
call (see :func:`directional_autodiff`). Further operators:

* ``u``, ``grad``, ``grad_norm2``, ``dt``: exact, from one reverse pass;
* ``biharmonic``: ``E[D_v^4 u] / 3`` with Gaussian ``v`` (a separate Gaussian
  set when ``distribution="rademacher"``), ``D_v^4 u`` by four nested ``grad``;
* ``third``: ``(d / K) sum_{j in J} d^3u/dx_j^3`` on random coordinate axes
  (symmetric probes give ``E[D_v^3 u] = 0``).

The estimator back-propagates through ``x`` (it is not forward-only) but its
cost does not grow with ``d`` beyond the cost of one gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import ClassVar

import torch
from torch import Tensor

from sdze_lightning.directions import Directions, time_axis
from sdze_lightning.estimators.directional import DirectionalEstimator
from sdze_lightning.model_fn import ModelFunction


def directional_autodiff(model: ModelFunction, x: Tensor, v: Tensor, order: int) -> Tensor:
    """``D_v^order u`` at every point along every direction by nested ``torch.func.grad``.

    ``D_v^{k+1} u = v . grad(D_v^k u)`` (reverse over reverse: ``k = 2`` is the
    Hessian-vector product ``v^T H v``). The ``K`` directions are stacked into
    the batch (``K * N`` rows, each with its own direction), which relies on
    ``u`` acting point by point; on CPU this is faster than ``vmap`` over
    forward-mode ``jvp`` for the small MLPs of a PINN.

    Args:
        model: The solution.
        x: Points ``(N, D)``.
        v: Directions ``(K, D)``.
        order: Derivative order ``>= 1``.

    Returns:
        ``(K, N)`` tensor.

    """
    k, n = v.shape[0], x.shape[0]
    rows = x[None].expand(k, n, -1).reshape(k * n, -1)
    tangent = v[:, None].expand(k, n, -1).reshape(k * n, -1).to(x.dtype)

    def along(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        return lambda z: (torch.func.grad(lambda w: fn(w).sum())(z) * tangent).sum(dim=1)

    fn: Callable[[Tensor], Tensor] = model
    for _ in range(order):
        fn = along(fn)
    return fn(rows).reshape(k, n)


def _distinct_up_to_sign(v: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct rows of ``v`` up to sign (first non-zero entry positive), with counts."""
    lead = torch.gather(v, 1, (v != 0).to(torch.int8).argmax(dim=1, keepdim=True))
    canonical = v * torch.where(lead < 0, -1.0, 1.0).to(v.dtype)
    return torch.unique(canonical, dim=0, return_counts=True)


class HutchinsonEstimator(DirectionalEstimator):
    """Hutchinson's ``E[v^T H v]`` via ``torch.func`` HVPs (back-propagates in ``x``).

    Args:
        num_directions: Probe vectors ``V`` per set.
        distribution: ``"rademacher"`` (default) or ``"gaussian"``.

    """

    name = "hte"
    operators = frozenset({"u", "grad", "grad_norm2", "laplacian", "dt", "third", "biharmonic"})
    forward_only = False
    distributions: ClassVar[tuple[str, ...]] = ("rademacher", "gaussian")

    def __init__(self, num_directions: int = 16, distribution: str = "rademacher") -> None:
        super().__init__(num_directions, distribution)

    #: ``(V N, input_dim)`` arrays an estimate holds at its peak: the points and the probes
    #: copied into ``V N`` rows, and the gradients and products of the two nested
    #: ``torch.func.grad``, which keep their own graph, so as many without the parameters'
    #: graph (zeroth-order methods) as with it (the count fitted to measured peaks; measured:
    #: ``benchmarks/README.md``, ``preflight_accuracy.py``).
    INPUT_COPIES: ClassVar[float] = 8.0

    def step_numel(self, points: int, input_dim: int, hidden: int, graph: bool) -> int:
        """``(V N, input_dim)`` copies of points, probes and gradients (:data:`INPUT_COPIES`)."""
        return int(self.INPUT_COPIES * self.num_directions * points * input_dim)

    def directional(
        self,
        model: ModelFunction,
        x: Tensor,
        dirs: Directions,
        orders: Collection[int],
        u0: Tensor | None = None,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """``D_v^k u`` by forward-over-reverse autodiff, vectorised over the directions."""
        v = dirs.materialize(x.dtype, x.device)
        out = {k: directional_autodiff(model, x, v, k) for k in sorted(orders)}
        return (model(x) if u0 is None else u0), out

    def directional_means(
        self, model: ModelFunction, x: Tensor, dirs: Directions, orders: Collection[int],
        u0: Tensor | None = None,
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Means over the directions, each probe that repeats up to sign computed once.

        In ``D`` dimensions there are only ``2^(D-1)`` Rademacher probes up to sign, and
        an even order ``D_v^k u`` is the same for ``v`` and ``-v``: with more probes
        than that (16 probes on a 2-D problem: 2 distinct ones), the repeats are
        evaluated once and weighted by their count. Same estimator, same value up to
        the order of summation; the cost falls to that of the distinct probes.
        """
        repeats = (
            dirs.dense is not None
            and all(k % 2 == 0 for k in orders)
            and 2 ** (dirs.dim - 1) < dirs.count
        )
        if repeats:
            unique, counts = _distinct_up_to_sign(dirs.dense)
            if unique.shape[0] < dirs.count:
                weights = counts.to(x.dtype) / dirs.count
                u, dv = self.directional(model, x, Directions(dirs.dim, dense=unique), orders, u0)
                return u, {k: weights @ val for k, val in dv.items()}
        return super().directional_means(model, x, dirs, orders, u0)

    def _estimate(
        self,
        model: ModelFunction,
        x: Tensor,
        ops: set[str],
        generator: torch.Generator,
        spatial_dim: int,
    ) -> dict[str, Tensor]:
        """Exact first-order operators from one ``vjp``, Hutchinson-type higher orders."""
        if "dt" in ops:
            time_axis(x, spatial_dim)
        out = super()._estimate(
            model, x, ops & {"laplacian", "third", "biharmonic"}, generator, spatial_dim
        )
        if ops & {"u", "grad", "grad_norm2", "dt"}:
            u, pullback = torch.func.vjp(model, x)
            g = pullback(torch.ones_like(u))[0]
            first = {
                "u": u,
                "grad": g[:, :spatial_dim],
                "grad_norm2": (g[:, :spatial_dim] ** 2).sum(dim=1),
                "dt": g[:, -1],
            }
            out.update({k: v for k, v in first.items() if k in ops})
        return out
