"""The solution ``u(x)`` as the estimators see it.

:class:`ModelFunction` joins the network and the hard constraint and offers
three ways to probe ``u``:

* ``__call__``: values (differentiable, for the autodiff estimators);
* ``line``: values at ``x + t v`` (finite differences, Stein smoothing);
* ``jets``: exact directional derivatives up to order 4 (Taylor mode).

When the network is an :class:`~sdze_lightning.nn.MLP` and the constraint is a
:class:`~sdze_lightning.constraints.Constraint` (or absent), ``line`` and
``jets`` take the dimension-free first-layer route. Otherwise they fall back
to generic code that materialises ``x + t v`` (``line``) or nests
``torch.func.jvp`` (``jets``): correct for any network, but its cost grows with
the dimension.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from sdze_lightning.constraints import Constraint
from sdze_lightning.directions import Directions
from sdze_lightning.nn.mlp import MLP, Jet, product_jet, summed_top


class ModelFunction:
    """Scalar solution ``u(x) = g(x) * net(x)`` (or a custom composition).

    Args:
        net: Network mapping ``(N, D)`` to ``(N, 1)`` or ``(N,)``, or any such
            function of the points (e.g. a problem's ``exact_solution``).
        constraint: Optional factor ``g``.
        compose: Optional custom ``(x, net_out) -> u`` used instead of ``g * net``;
            it disables the fast paths.
    """

    def __init__(
        self,
        net: nn.Module | Callable[[Tensor], Tensor],
        constraint: Constraint | None = None,
        compose: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        self.net = net
        self.constraint = constraint
        self.compose = compose

    @property
    def fast(self) -> bool:
        """Whether ``line`` and ``jets`` use the dimension-free first-layer route."""
        return isinstance(self.net, MLP) and self.compose is None

    @contextlib.contextmanager
    def shared_first_layer(self) -> Iterator[None]:
        """Compute the first-layer product ``W x`` once for all evaluations inside.

        Enters :meth:`MLP.first_layer_cache` unless one is already active (an
        outer cache, e.g. the one shared by the ``+eps``/``-eps`` evaluations of a
        zeroth-order step, is kept). The cache only acts with gradients disabled;
        otherwise, and for other networks, this does nothing.
        """
        if self.fast and getattr(self.net, "_cache", None) is None:
            with self.net.first_layer_cache():
                yield
        else:
            yield

    def __call__(self, x: Tensor) -> Tensor:
        """Return ``u(x)``, shape ``(N,)``."""
        out = self.net(x)
        out = out.reshape(x.shape[0], -1)[:, 0] if out.dim() > 1 else out
        if self.compose is not None:
            return self.compose(x, out)
        if self.constraint is not None:
            out = self.constraint.value(x).to(out.dtype) * out
        return out

    def line(self, x: Tensor, dirs: Directions, ts: Sequence[float]) -> Tensor:
        """Return ``u(x + t v)`` for every ``t`` and direction, shape ``(T, K, N)``."""
        if self.fast:
            vals = self.net.line(x, dirs, ts)[..., 0]
            if self.constraint is not None:
                degree = getattr(self.constraint, "degree", None)
                if degree is not None and degree <= 4:
                    # A polynomial factor equals its Taylor expansion along the line.
                    g = self.constraint.jet(x, dirs, degree)
                    t = torch.as_tensor(list(ts), dtype=vals.dtype, device=vals.device)
                    gl = g[0].to(vals.dtype).expand(len(ts), dirs.count, -1)
                    fact = 1.0
                    for k in range(1, degree + 1):
                        fact *= k
                        if g[k] is not None:
                            gl = gl + (t[:, None, None] ** k / fact) * g[k]
                else:
                    gl = self._generic_line_values(self.constraint.value, x, dirs, ts)
                vals = gl.to(vals.dtype) * vals
            return vals
        return self._generic_line_values(self, x, dirs, ts)

    @staticmethod
    def _generic_line_values(
        fn: Callable[[Tensor], Tensor], x: Tensor, dirs: Directions, ts: Sequence[float]
    ) -> Tensor:
        v = dirs.materialize(x.dtype, x.device)  # (K, D)
        t = torch.as_tensor(list(ts), dtype=x.dtype, device=x.device)
        pts = x[None, None] + t[:, None, None, None] * v[None, :, None, :]
        return fn(pts.reshape(-1, x.shape[1])).reshape(len(ts), v.shape[0], x.shape[0])

    def jets(self, x: Tensor, dirs: Directions, order: int, sum_top: bool = False) -> Jet:
        """Return ``[u, D_v u, ..., D_v^order u]``: ``(N,)`` then ``(K, N)`` each.

        With ``sum_top`` (and ``order >= 2``) the last entry is ``sum_k D_{v_k}^order u``,
        shape ``(N,)``; on the first-layer route the network carries it summed
        (:meth:`MLP.jets <sdze_lightning.nn.MLP.jets>`), which costs one row per
        point instead of ``K`` in its products.
        """
        sum_top = sum_top and order >= 2
        if not self.fast:
            out = self._generic_jets(x, dirs, order)
            if sum_top:
                out[-1] = out[-1].sum(dim=0)
            return out
        net_jet = [c[..., 0] for c in self.net.jets(x, dirs, order, sum_top=sum_top)]
        if self.constraint is None:
            out = net_jet
        else:
            g = self.constraint.jet(x, dirs, order)
            if sum_top:
                out = summed_top(lambda j: product_jet(g, j), lambda top: g[0] * top,
                                 net_jet, dirs.count)
            else:
                out = product_jet(g, net_jet)
        shape = (dirs.count, x.shape[0])
        per_direction, top = (out[1:-1], out[-1]) if sum_top else (out[1:], None)
        full = [out[0]] + [
            torch.zeros(shape, dtype=x.dtype, device=x.device) if c is None else c.expand(shape)
            for c in per_direction
        ]
        if sum_top:
            full.append(x.new_zeros(x.shape[0]) if top is None else top.reshape(x.shape[0]))
        return full

    def _generic_jets(self, x: Tensor, dirs: Directions, order: int) -> Jet:
        v = dirs.materialize(x.dtype, x.device)

        def nested(k: int) -> Callable[[Tensor, Tensor], Tensor]:
            if k == 0:
                return lambda p, d: self(p)

            inner = nested(k - 1)

            def f(p: Tensor, d: Tensor) -> Tensor:
                return torch.func.jvp(lambda q: inner(q, d), (p,), (d.expand_as(p),))[1]

            return f

        out: Jet = [self(x)]
        for k in range(1, order + 1):
            fk = nested(k)
            out.append(torch.stack([fk(x, v[i]) for i in range(v.shape[0])]))
        return out


def as_model_function(model: ModelFunction | Callable[[Tensor], Tensor]) -> ModelFunction:
    """``model`` as the estimators see it: a :class:`ModelFunction` is kept as it is.

    Any other callable of the points (a network, a problem's ``exact_solution``, a
    lambda) is wrapped; the estimators then use their generic routes for it
    (``torch.func.jvp`` jets, materialised ``x + t v``), so it must be written with
    torch operators.

    Raises:
        TypeError: ``model`` is not callable.

    """
    if isinstance(model, ModelFunction):
        return model
    if not callable(model):
        raise TypeError(
            f"An estimator needs the solution as a function of the points (a ModelFunction "
            f"such as problem.model, a network, or e.g. problem.exact_solution); got "
            f"{type(model).__name__}."
        )
    return ModelFunction(model)
