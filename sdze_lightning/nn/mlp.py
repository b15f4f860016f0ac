"""Multilayer perceptron with dimension-free directional evaluation.

Besides the plain forward pass, :class:`MLP` evaluates

* ``line``: the network at ``x + t v`` for a few step sizes ``t`` and directions
  ``v`` (finite differences, Stein smoothing), and
* ``jets``: the exact directional derivatives ``D_v^k u(x)``, ``k <= 4``, by a
  hand-written Taylor-mode pass (no back-propagation, one pass per order);
  with ``sum_top`` the highest order is carried summed over the directions
  (one row per point instead of ``K``: the sum of a Laplacian-type estimate is
  all an operator needs, and every layer is linear in that coefficient),

both through the first-layer shortcut of the design: ``W (x + t v) = W x + t W v``
with ``W x`` computed once per point and ``W v`` a column lookup for a
coordinate direction. Inside :meth:`MLP.first_layer_cache` the product ``W x``
is also shared between evaluations on the same points (the ``+eps`` and
``-eps`` evaluations of a zeroth-order step).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from sdze_lightning.checks import integer, positive_int
from sdze_lightning.directions import Directions
from sdze_lightning.nn.first_layer_grad import FirstLayerGradient, autocast_dtype, input_product
from sdze_lightning.nn.perturb import delta_of, linear_forward

Jet = list[Tensor | None]


def _act_derivatives(name: str, h: Tensor, order: int) -> list[Tensor]:
    """Return ``[f(h), f'(h), ..., f^(order)(h)]`` for the activation ``name``."""
    if name == "tanh":
        t = torch.tanh(h)
        out = [t]
        if order >= 1:
            f1 = 1 - t * t
            out.append(f1)
        if order >= 2:
            f2 = -2 * t * f1
            out.append(f2)
        if order >= 3:
            f3 = -2 * (f1 * f1 + t * f2)
            out.append(f3)
        if order >= 4:
            out.append(-2 * (3 * f1 * f2 + t * f3))
        return out
    if name == "sin":
        s, c = torch.sin(h), torch.cos(h)
        return [s, c, -s, -c, s][: order + 1]
    raise ValueError(f"Unknown activation {name!r}; use 'tanh' or 'sin'.")


def _mul(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return None if a is None or b is None else a * b


def _sum(*terms: Tensor | None) -> Tensor | None:
    present = [t for t in terms if t is not None]
    if not present:
        return None
    out = present[0]
    for t in present[1:]:
        out = out + t
    return out


def compose_jet(derivs: Sequence[Tensor], h: Jet) -> Jet:
    """Faa di Bruno: jet of ``f(h(t))`` from ``f^(k)(h0)`` and the jet ``h``.

    Entries are derivatives (not Taylor coefficients) along the direction;
    ``None`` stands for an identically zero coefficient.
    """
    order = len(h) - 1
    f = derivs
    out: Jet = [f[0]]
    h1 = h[1] if order >= 1 else None
    h2 = h[2] if order >= 2 else None
    h3 = h[3] if order >= 3 else None
    h4 = h[4] if order >= 4 else None
    if order >= 1:
        out.append(_mul(f[1], h1))
    if order >= 2:
        out.append(_sum(_mul(f[2], _mul(h1, h1)), _mul(f[1], h2)))
    if order >= 3:
        out.append(
            _sum(
                _mul(f[3], _mul(h1, _mul(h1, h1))),
                _mul(3 * f[2], _mul(h1, h2)),
                _mul(f[1], h3),
            )
        )
    if order >= 4:
        h1sq = _mul(h1, h1)
        out.append(
            _sum(
                _mul(f[4], _mul(h1sq, h1sq)),
                _mul(6 * f[3], _mul(h1sq, h2)),
                _mul(f[2], _sum(_mul(4 * h1, h3), _mul(3 * h2, h2) if h2 is not None else None)),
                _mul(f[1], h4),
            )
        )
    if order > 4:
        raise ValueError("Taylor-mode jets are implemented up to order 4.")
    return out


def summed_top(rule: Callable[[Jet], Jet], linear_top: Callable[[Tensor], Tensor],
               jet: Jet, count: int) -> Jet:
    """Apply a jet ``rule`` to a jet whose top coefficient is summed over the directions.

    The top coefficient a jet rule returns is ``chain(lower orders) +
    linear_top(top)``, linear in the incoming top. With the incoming top summed
    over the ``count`` directions (shape ``(1, ...)``), the outgoing top is
    ``sum_k chain_k + linear_top(top)``: the rule runs with the top left out
    (``None``), its top is summed over the direction axis, and the linear part
    is added. Entries of order >= 1 carry the direction axis first (size
    ``count``, or 1 when the same for every direction).

    Args:
        rule: A jet rule (``compose_jet``, ``product_jet``) with its other argument bound.
        linear_top: The part of the outgoing top that is linear in the incoming one.
        jet: Lower orders per direction, the top summed over the directions (``None`` = 0).
        count: Number of directions ``K``.

    """
    top = jet[-1]
    out = rule(jet[:-1] + [None])
    chain = out[-1]
    if chain is not None:
        chain = chain.expand(count, *chain.shape[1:]).sum(dim=0, keepdim=True)
    out[-1] = _sum(chain, None if top is None else linear_top(top))
    return out


def product_jet(a: Jet, b: Jet) -> Jet:
    """Leibniz rule: jet of ``a(t) * b(t)`` (derivatives, ``None`` = zero)."""
    order = len(a) - 1
    out: Jet = []
    for k in range(order + 1):
        terms = [_mul(a[j], b[k - j]) for j in range(k + 1)]
        terms = [math.comb(k, j) * t if t is not None else None for j, t in enumerate(terms)]
        out.append(_sum(*terms))
    return out


def _layer_shapes(in_features: int, width: int, depth: int, out_features: int) -> list[tuple]:
    """``(in, out)`` of each linear layer of an MLP: ``depth`` hidden layers of ``width``."""
    sizes = [in_features] + [width] * depth + [out_features]
    return list(zip(sizes[:-1], sizes[1:], strict=True))


def _xavier_normal(layer: nn.Linear, gen: torch.Generator) -> None:
    nn.init.xavier_normal_(layer.weight, generator=gen)
    nn.init.zeros_(layer.bias)


def _kaiming_uniform(layer: nn.Linear, gen: torch.Generator) -> None:
    # nn.Linear.reset_parameters, with an explicit generator: bound 1/sqrt(fan_in) for both
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=gen)
    bound = 1 / math.sqrt(layer.in_features)
    nn.init.uniform_(layer.bias, -bound, bound, generator=gen)


#: ``MLP(init=...)``: how each linear layer is initialised from the seeded generator.
INITS: dict[str, Callable[[nn.Linear, torch.Generator], None]] = {
    "xavier_normal": _xavier_normal,
    "kaiming_uniform": _kaiming_uniform,
}


class MLP(nn.Module):
    """Fully connected network ``R^in -> R^out`` with a smooth activation.

    Args:
        in_features: Input dimension (spatial dimensions plus time, if any).
        width: Hidden width.
        depth: Number of hidden layers (linear layers = ``depth + 1``).
        out_features: Output dimension.
        activation: ``"tanh"`` or ``"sin"``.
        seed: Seed of the initialisation; the global RNG is not used.
        init: ``"xavier_normal"`` (zero biases) or ``"kaiming_uniform"`` (what
            ``nn.Linear`` does by default, and the JAX STDE code's default: weights and
            biases uniform in ``+-1/sqrt(fan_in)``).
    """

    #: Zeroth-order offsets are applied by this class (:func:`linear_forward`), not by hooks.
    applies_linear_offsets: ClassVar[bool] = True

    @staticmethod
    def parameter_count(
        in_features: int, width: int = 128, depth: int = 4, out_features: int = 1, **_: object
    ) -> int:
        """The number of parameters of ``MLP(in_features, width, depth, out_features)``.

        Lets a problem check the network's memory before allocating it; other
        keyword arguments of the constructor are accepted and ignored.
        """
        return sum(a * b + b for a, b in _layer_shapes(in_features, width, depth, out_features))

    def __init__(
        self,
        in_features: int,
        width: int = 128,
        depth: int = 4,
        out_features: int = 1,
        activation: str = "tanh",
        seed: int = 0,
        init: str = "xavier_normal",
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"model.init must be one of {list(INITS)}, got {init!r}")
        for name, value in (
            ("model.in_features", in_features),
            ("model.width", width),
            ("model.depth", depth),
            ("model.out_features", out_features),
        ):
            positive_int(name, value)
        integer("model.seed", seed)
        _act_derivatives(activation, torch.zeros(1), 0)  # validates the name early
        #: The constructor's arguments: ``MLP(**net.init_args)`` is a network of the same
        #: shape and initialisation (what a checkpoint records to rebuild the network).
        self.init_args: dict[str, int | str] = {
            "in_features": in_features, "width": width, "depth": depth,
            "out_features": out_features, "activation": activation, "seed": seed, "init": init,
        }
        self.activation = activation
        # skip_init: nn.Linear's own initialisation would draw from the global RNG.
        self.layers = nn.ModuleList(
            nn.utils.skip_init(nn.Linear, a, b)
            for a, b in _layer_shapes(in_features, width, depth, out_features)
        )
        gen = torch.Generator().manual_seed(seed)
        for layer in self.layers:
            INITS[init](layer, gen)
        self._cache: dict | None = None
        self._capture: FirstLayerGradient | None = None

    @property
    def in_features(self) -> int:
        """Input dimension."""
        return self.layers[0].in_features

    @property
    def input_layer(self) -> nn.Linear:
        """The first linear layer (``width x in_features``)."""
        return self.layers[0]

    @property
    def output_layer(self) -> nn.Linear:
        """The last linear layer."""
        return self.layers[-1]

    # ----------------------------------------------------------------- first layer
    @contextlib.contextmanager
    def first_layer_cache(self) -> Iterator[None]:
        """Share ``W x`` (and ``x B``) between evaluations on the same points."""
        previous, self._cache = self._cache, {}
        try:
            yield
        finally:
            self._cache = previous

    @contextlib.contextmanager
    def capture_first_layer_gradient(self) -> Iterator[FirstLayerGradient]:
        """Back-propagate into the first layer's weight as low-rank factors.

        Inside, every product with the first layer's weight records the factors of
        its gradient in the yielded :class:`~sdze_lightning.nn.first_layer_grad.FirstLayerGradient`
        when back-propagated, and the weight itself receives no ``.grad``
        (:mod:`sdze_lightning.nn.first_layer_grad`). Only evaluations with gradients
        enabled are affected; the values are the same as outside.
        """
        if delta_of(self.layers[0]) is not None:
            raise RuntimeError("The first-layer gradient cannot be captured under an SDZE offset.")
        previous, self._capture = self._capture, FirstLayerGradient()
        try:
            yield self._capture
        finally:
            self._capture = previous

    def _recording(self) -> FirstLayerGradient | None:
        return self._capture if self._capture is not None and torch.is_grad_enabled() else None

    def _wx(self, x: Tensor) -> Tensor:
        """``x W^T`` for the first layer, without bias or offset (cached)."""
        layer = self.layers[0]
        capture = self._recording()
        if capture is not None:
            return capture.product(x, layer.weight, points=True)
        if self._cache is None or torch.is_grad_enabled():
            return input_product(x, layer.weight)
        key = ("wx", id(x), layer.weight._version)
        hit = self._cache.get(key)
        if hit is None or hit[0] is not x:
            hit = (x, input_product(x, layer.weight))
            self._cache[key] = hit
        return hit[1]

    def _xb(self, x: Tensor, basis: Tensor) -> Tensor:
        if self._cache is None or torch.is_grad_enabled():
            return x.to(basis.dtype) @ basis
        key = ("xb", id(x), id(basis))
        hit = self._cache.get(key)
        if hit is None or hit[0] is not x or hit[1] is not basis:
            hit = (x, basis, x.to(basis.dtype) @ basis)
            self._cache[key] = hit
        return hit[2]

    def first_layer(self, x: Tensor) -> Tensor:
        """Pre-activation of the first layer, ``(N, width)``, offset included."""
        layer = self.layers[0]
        h = self._wx(x) + layer.bias
        delta = delta_of(layer)
        if delta is not None:
            h = h + delta.linear_from_projection(self._xb(x, delta.B)).to(h.dtype)
            if delta.cb is not None:
                h = h + delta.bias().to(h.dtype)
        return h

    def first_layer_directions(self, dirs: Directions) -> Tensor:
        """``W v`` for every direction, ``(K, width)``, offset included, no bias.

        A coordinate direction is a column lookup: its cost does not depend on
        the input dimension. Under autocast a dense direction's product casts the
        weight one block of columns at a time (:func:`~sdze_lightning.nn.first_layer_grad.
        input_product`), never the whole weight.
        """
        layer = self.layers[0]
        capture = self._recording()
        if capture is not None:
            if dirs.index is not None:
                return capture.columns(layer.weight, dirs.index)
            return capture.product(dirs.dense.to(layer.weight.dtype), layer.weight)
        if dirs.index is not None:
            wv = layer.weight[:, dirs.index].T
            delta = delta_of(layer)
            if delta is not None:
                wv = wv + delta.columns(dirs.index).to(wv.dtype)
            return wv
        dense = dirs.dense.to(layer.weight.dtype)
        if autocast_dtype(layer.weight) is None:
            return linear_forward(layer, dense, bias=False)
        wv = input_product(dense, layer.weight)  # linear_forward, without F.linear's cast
        delta = delta_of(layer)
        if delta is not None:
            wv = wv + delta.linear(dense.to(delta.B.dtype)).to(wv.dtype)
        return wv

    # ---------------------------------------------------------------------- passes
    def tail(self, h: Tensor) -> Tensor:
        """Network output from the first-layer pre-activation ``h``."""
        for layer in self.layers[1:]:
            h = linear_forward(layer, _act_derivatives(self.activation, h, 0)[0])
        return h

    def forward(self, x: Tensor) -> Tensor:
        """Evaluate the network on points ``x`` of shape ``(N, in_features)``."""
        return self.tail(self.first_layer(x))

    def line(self, x: Tensor, dirs: Directions, ts: Sequence[float]) -> Tensor:
        """Values at ``x + t v`` for every step ``t`` and direction ``v``.

        Returns:
            Tensor of shape ``(T, K, N, out_features)``.
        """
        h0 = self.first_layer(x)  # (N, m)
        wv = self.first_layer_directions(dirs)  # (K, m)
        t = torch.as_tensor(list(ts), dtype=h0.dtype, device=h0.device)
        h = h0[None, None] + t[:, None, None, None] * wv[None, :, None, :]
        return self.tail(h)

    def jets(self, x: Tensor, dirs: Directions, order: int, sum_top: bool = False) -> Jet:
        """Exact directional derivatives ``D_v^k u(x)`` for ``k = 0..order``.

        Args:
            x: Points ``(N, in_features)``.
            dirs: ``K`` directions.
            order: Highest order, 0 to 4.
            sum_top: Carry the highest order (>= 2) summed over the directions:
                one row per point instead of ``K`` in every layer's product (the
                lower orders stay per direction; the result is the same up to
                rounding).

        Returns:
            A list: entry 0 is ``u(x)`` of shape ``(N, out)``, entry ``k >= 1`` is
            ``D_v^k u(x)`` of shape ``(K, N, out)``; with ``sum_top``, the last
            entry is ``sum_k D_{v_k}^order u(x)``, shape ``(1, N, out)``.
        """
        if not 0 <= order <= 4:
            raise ValueError(f"Jet order must be between 0 and 4, got {order}.")
        sum_top = sum_top and order >= 2
        h0 = self.first_layer(x)
        # contiguous: a column lookup is a transposed view, whose products would be too
        # (every later matrix product would then copy its input first)
        wv = self.first_layer_directions(dirs).contiguous()[:, None, :]  # (K, 1, m)
        jet: Jet = [h0] + [wv] + [None] * (order - 1) if order >= 1 else [h0]
        k = dirs.count
        for layer in self.layers[1:]:
            derivs = _act_derivatives(self.activation, jet[0], order)
            if sum_top:
                jet = summed_top(functools.partial(compose_jet, derivs),
                                 derivs[1].mul, jet, k)
            else:
                jet = compose_jet(derivs, jet)
            jet = [linear_forward(layer, jet[0])] + [
                None if c is None else linear_forward(layer, c, bias=False) for c in jet[1:]
            ]
        shape = (k, *jet[0].shape)
        out = [jet[0]] + [
            torch.zeros(shape, dtype=jet[0].dtype, device=jet[0].device)
            if c is None
            else c.expand(shape)
            for c in (jet[1:-1] if sum_top else jet[1:])
        ]
        if sum_top:  # the top stays summed, (1, N, out)
            top = jet[-1]
            out.append(jet[0].new_zeros((1, *jet[0].shape)) if top is None else top)
        return out
