"""Exact operators by autodiff ("stacked back-propagation").

One reverse pass per coordinate for the Laplacian, so the cost grows like
``O(d)`` passes: the reference every randomized estimator is checked against.

Each pass costs about as much as a backward pass through the network (``O(N d width)`` in
the input layer), so one estimate costs ``O(d^2)``: a hundred times more per tenfold ``d``,
which puts it out of reach of a training step long before the dimensions that the
randomized estimators handle. The pre-flight refuses an estimate of more than
:data:`MAX_REVERSE_PASSES` passes (``max_reverse_passes``; ``None`` lifts the bound).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor

from sdze_lightning.estimators.base import Estimator
from sdze_lightning.model_fn import ModelFunction

#: Default bound on the reverse passes of one estimate: d = 2e4 for the Laplacian (one pass
#: per coordinate), past which an estimate's ``O(d^2)`` cost makes training impractical on a
#: CPU (measured: ``benchmarks/README.md``, ``preflight_accuracy.py``).
MAX_REVERSE_PASSES = 20_000


def _d(y: Tensor, x: Tensor) -> Tensor:
    """Gradient of ``y.sum()`` with respect to ``x``, keeping the graph."""
    return torch.autograd.grad(y.sum(), x, create_graph=True)[0]


def pure_derivatives(
    u: Tensor, x: Tensor, coords: Collection[int], order: int, create_graph: bool = True
) -> list[list[Tensor]]:
    """Return ``[[d^k u/dx_j^k for k in 1..order] for j in coords]`` by stacked back-prop.

    Each reverse pass gives a whole ``(N, input_dim)`` gradient of which column ``j`` is
    kept as a copy, so the pass's gradient is freed before the next coordinate's (kept as
    views, the ``d`` gradients held ``N d^2`` numbers at once). Without ``create_graph``
    the last order is computed without a graph (nothing back-propagates through it).
    """
    g = _d(u, x)
    out = []
    for j in coords:
        col = [g[:, j]]
        for k in range(order - 1):
            graph = create_graph or k < order - 2
            grad = torch.autograd.grad(col[-1].sum(), x, create_graph=graph, retain_graph=True)
            col.append(grad[0][:, j].clone())
        out.append(col)
    return out


class ExactEstimator(Estimator):
    """Autodiff operators on every coordinate (deterministic, back-propagates).

    Args:
        max_reverse_passes: Most reverse passes one estimate may take
            (:meth:`reverse_passes`: ``d + 1`` for the Laplacian) before the pre-flight
            refuses the run; ``None``: no bound.

    """

    name = "exact"
    operators = frozenset({"u", "grad", "grad_norm2", "laplacian", "dt", "third", "biharmonic"})
    forward_only = False

    def __init__(self, max_reverse_passes: int | None = MAX_REVERSE_PASSES) -> None:
        self.max_reverse_passes = max_reverse_passes

    def coordinate_count(self, spatial_dim: int) -> int:
        """How many coordinates one estimate differentiates (every one: ``spatial_dim``)."""
        return spatial_dim

    def reverse_passes(self, ops: Collection[str], spatial_dim: int) -> int:
        """Reverse passes of one estimate of ``ops``: ``k + 1`` for the Laplacian.

        ``k`` is :meth:`coordinate_count`; one pass gives the gradient (``grad``,
        ``grad_norm2``, ``dt``), and each further order takes one pass per coordinate
        (:func:`pure_derivatives`): the Laplacian ``1 + k``, ``third`` ``1 + 2k``, the
        biharmonic another ``1 + k`` on top of its Laplacian's.
        """
        ops, k = set(ops), self.coordinate_count(spatial_dim)
        passes = 1 if ops & {"grad", "grad_norm2", "dt"} else 0
        order = 3 if "third" in ops else (2 if ops & {"laplacian", "biharmonic"} else 0)
        if order:
            passes += 1 + (order - 1) * k
        if "biharmonic" in ops:
            passes += 1 + k
        return passes

    def coordinates(self, spatial_dim: int, generator: torch.Generator) -> tuple[list[int], float]:
        """Spatial coordinates to differentiate and the scale of their sum."""
        return list(range(spatial_dim)), 1.0

    def _estimate(
        self,
        model: ModelFunction,
        x: Tensor,
        ops: set[str],
        generator: torch.Generator,
        spatial_dim: int,
    ) -> dict[str, Tensor]:
        """Differentiate ``model`` at ``x`` by autodiff on :meth:`coordinates`."""
        outer_grad = torch.is_grad_enabled()
        coords, scale = self.coordinates(spatial_dim, generator)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            u = model(xg)
            out: dict[str, Tensor] = {"u": u}
            g = _d(u, xg) if ops & {"grad", "grad_norm2", "dt"} else None
            if g is not None:
                out["grad"] = g[:, :spatial_dim]
                out["grad_norm2"] = (g[:, :spatial_dim] ** 2).sum(dim=1)
                if "dt" in ops:
                    if x.shape[1] == spatial_dim:
                        raise ValueError(
                            "Operator 'dt' needs a time coordinate (time_dependent=True)."
                        )
                    out["dt"] = g[:, -1]
            need_lap = "laplacian" in ops or "biharmonic" in ops
            order = 3 if "third" in ops else (2 if need_lap else 0)
            if order:
                graph = outer_grad or "biharmonic" in ops  # else nothing differentiates it
                pure = pure_derivatives(u, xg, coords, order, create_graph=graph)
                if need_lap:
                    out["laplacian"] = scale * sum(p[1] for p in pure)
                if "third" in ops:
                    out["third"] = scale * sum(p[2] for p in pure)
            if "biharmonic" in ops:
                lap = out["laplacian"]
                out["biharmonic"] = scale * sum(
                    p[1] for p in pure_derivatives(lap, xg, coords, 2, create_graph=outer_grad)
                )
        out = {k: v for k, v in out.items() if k in ops}
        if not outer_grad:
            out = {k: v.detach() for k, v in out.items()}
        return out
