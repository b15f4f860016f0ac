"""SDZE: forward-only steps in an implicit, periodically refreshed low-rank subspace.

Every linear layer ``W`` (``m x n``) gets, per window of ``period`` steps, a
subspace ``W + A C B^T`` (:class:`LayerSubspace`). Inside a
window SDZE keeps per layer a coordinate vector ``c`` (core ``C`` of
``ra x rb`` and bias part ``c_b``): the network computes with
``W_eff = W + A C B^T`` implicitly through the layers' offsets
(:func:`~sdze_lightning.nn.perturb.set_offset`), never by
writing ``W``. A step

1. draws ``q`` Gaussian directions ``u_j`` in the coordinates (``u ~ N(0, I)``
   per layer: the parameter-space direction ``A S B^T`` is then a standard
   Gaussian of the subspace, since ``A`` and ``B`` are orthonormal);
2. evaluates the loss at ``c + eps u_j`` and ``c - eps u_j`` (two-point,
   CRNS as in :mod:`~sdze_lightning.methods.zeroth_order`), each evaluation only
   swapping the small core of the offset: ``W x`` is shared by all of them;
3. forms ``g = (1/q) sum_j (L_+ - L_-) / (2 eps) u_j`` (an estimate of the
   gradient projected on the subspace) and updates ``c`` with the chosen rule
   (plain, momentum or Adam, whose state lives in the coordinates);

and at the start of each new window folds ``W += A C B^T`` (the only
parameter-sized write, once per period), resets ``c`` to zero and either
resets the rule state or carries it into the new subspace.

Memory: the optimizer state is ``O(r^2)`` numbers per layer, whatever the
input dimension. The bases are not state: they are a function of
``(seed, window, layer)`` (QR of seeded Gaussians), never saved, and redrawn
after a resume. Within a window they are kept in memory, ``(m + n) r`` numbers
per layer (``r / width`` of the first layer's weight): the network's offset
``A C B^T`` is live between steps (validation, logging and any other forward
pass compute with ``W_eff``), so it needs ``A`` and ``B`` at every forward
anyway; drawing them again per step would cost a QR of an ``n x r`` matrix per
layer and would not lower the peak.

**Subspaces** (:class:`LayerSubspace`). For a linear layer with weight ``W`` (``m x n``)
and bias ``b`` (``m``), the subspace of a window is spanned by orthonormal factors ``A``
(``m x ra``) and ``B`` (``n x rb``), ``ra = min(r, m)``, ``rb = min(r, n)``: a point of
it has coordinates ``C`` (``ra x rb``) and, for the bias, ``c_b`` (``ra``), and stands
for ``W + A C B^T``, ``b + A c_b``. The coordinates are kept as one flat vector of
``ra * rb + ra`` numbers per layer, independent of ``n`` (the input dimension for the
first layer).

The factors are the Q factors of seeded Gaussian matrices, signs fixed by the
diagonal of R so that the basis is Haar distributed and unique
(:func:`torch.nn.init.orthogonal_` with the seeded generator). They are a pure
function of ``(seed, window, layer)``: they are never part of the optimizer
state, and after a resume they are simply drawn again.

**Update rules** (:func:`apply_rule`: plain, momentum, Adam, with torch.optim's
arithmetic). SDZE keeps its optimizer state in the subspace coordinates: per layer a
flat coordinate vector and a small dict of rule tensors of the same shape (memory
``O(size of the coordinates)``). :func:`apply_rule` updates them in place with the
functional forms of ``torch.optim.SGD`` and ``torch.optim.Adam``
(:func:`torch.optim.sgd.sgd`, :func:`torch.optim.adam.adam`). The optimizer classes are
not used because they bind to tensor objects and count steps per tensor, while SDZE
replaces the coordinates at every window change, resets or rotates the rule state into
the new subspace and checkpoints it in its own state (a ``rule_step`` counter shared by
the layers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.adam import adam
from torch.optim.sgd import sgd

from sdze_lightning.checks import positive_int
from sdze_lightning.methods.zeroth_order import LossAt, TwoPointOptimizer, perturbation_sweep
from sdze_lightning.nn.perturb import (
    HookHold,
    LowRankDelta,
    attach_hooks,
    linear_layers,
    set_offset,
)
from sdze_lightning.seeding import PROBE_KEY_BASE, Stream, generator

# -------------------- subspaces

def orthonormal_basis(
    rows: int, rank: int, seed: int, window: int, layer: int, side: Stream,
    dtype: torch.dtype, device: torch.device,
) -> Tensor:
    """Orthonormal ``(rows, rank)`` matrix: QR of a seeded Gaussian matrix (``orthogonal_``).

    Args:
        rows: Number of rows (``m`` or ``n``); ``rank <= rows``.
        rank: Number of columns.
        seed: The method's seed.
        window: Index of the refresh window.
        layer: Index of the layer.
        side: ``Stream.SUBSPACE_LEFT`` or ``Stream.SUBSPACE_RIGHT``.
        dtype: Floating dtype of the result (bfloat16 and float16 are drawn and
            factored in float32, which has a QR, then cast).
        device: Device of the result (the generator lives there too).

    """
    gen = generator(device, side, seed, window, layer)
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    # Column-major, the layout of LAPACK's Q factor, so the products with the basis
    # round as they would with the factor itself.
    basis = torch.empty(rank, rows, dtype=work, device=device).T
    return nn.init.orthogonal_(basis, generator=gen).to(dtype)


@dataclass
class LayerSubspace:
    """The subspace of one linear layer in one window.

    Attributes:
        layer: The linear layer.
        A: Left factor ``(out_features, ra)``.
        B: Right factor ``(in_features, rb)``.

    """

    layer: nn.Linear
    A: Tensor
    B: Tensor

    @staticmethod
    def draw(layer: nn.Linear, rank: int, seed: int, window: int, index: int) -> LayerSubspace:
        """Draw the factors of ``layer`` (index ``index``) for ``window``."""
        m, n = layer.weight.shape
        kw = dict(dtype=layer.weight.dtype, device=layer.weight.device)
        a = orthonormal_basis(m, min(rank, m), seed, window, index, Stream.SUBSPACE_LEFT, **kw)
        b = orthonormal_basis(n, min(rank, n), seed, window, index, Stream.SUBSPACE_RIGHT, **kw)
        return LayerSubspace(layer, a, b)

    @staticmethod
    def size_for(layer: nn.Linear, rank: int) -> int:
        """Number of coordinates of ``layer`` at rank ``rank``."""
        m, n = layer.weight.shape
        ra, rb = min(rank, m), min(rank, n)
        return ra * rb + (ra if layer.bias is not None else 0)

    @property
    def ra(self) -> int:
        """Rank of the left factor."""
        return self.A.shape[1]

    @property
    def rb(self) -> int:
        """Rank of the right factor."""
        return self.B.shape[1]

    @property
    def size(self) -> int:
        """Number of coordinates ``ra * rb (+ ra)``."""
        return self.ra * self.rb + (self.ra if self.layer.bias is not None else 0)

    def split(self, coords: Tensor) -> tuple[Tensor, Tensor | None]:
        """Core ``(ra, rb)`` and bias part ``(ra,)`` (or ``None``) of a flat vector."""
        k = self.ra * self.rb
        core = coords[:k].view(self.ra, self.rb)
        return core, (coords[k:] if self.layer.bias is not None else None)

    def delta(self, coords: Tensor) -> LowRankDelta:
        """The implicit offset ``A C B^T``, ``A c_b`` for coordinates ``coords``."""
        core, cb = self.split(coords)
        return LowRankDelta(self.A, self.B, core, cb)

    @torch.no_grad()
    def fold(self, coords: Tensor) -> None:
        """Write ``W += A C B^T`` and ``b += A c_b`` in place (one parameter-sized write)."""
        core, cb = self.split(coords)
        w = self.layer.weight
        w.addmm_((self.A @ core.to(self.A.dtype)).to(w.dtype), self.B.T.to(w.dtype))
        if cb is not None:
            self.layer.bias.add_((self.A @ cb.to(self.A.dtype)).to(self.layer.bias.dtype))

    def rotation(self, old: LayerSubspace) -> tuple[Tensor, Tensor]:
        """``(A_new^T A_old, B_new^T B_old)``: old coordinates to new ones."""
        return self.A.T @ old.A, self.B.T @ old.B

    def carry(self, old: LayerSubspace, coords: Tensor, second_moment: bool = False) -> Tensor:
        """Carry a coordinate vector of the ``old`` subspace into this one.

        A first-order quantity (offset, momentum, Adam's first moment) is
        projected: ``C <- A_new^T A_old C B_old^T B_new``, ``c_b <- A_new^T A_old c_b``.
        A second moment is mapped as the variances of independent coordinates:
        with the element-wise squared rotations, ``V <- (R_A^2) V (R_B^2)^T``.
        """
        ra_map, rb_map = self.rotation(old)
        if second_moment:
            ra_map, rb_map = ra_map * ra_map, rb_map * rb_map
        core, cb = old.split(coords)
        out = [(ra_map @ core @ rb_map.T).reshape(-1)]
        if cb is not None:
            out.append(ra_map @ cb)
        return torch.cat(out)


# -------------------- update rules of the coordinates

#: Names of the update rules.
UPDATE_RULES: tuple[str, ...] = ("plain", "momentum", "adam")

#: State tensors each rule keeps (same shape as the coordinates; torch.optim's names).
RULE_STATE: dict[str, tuple[str, ...]] = {
    "plain": (),
    "momentum": ("momentum_buffer",),
    "adam": ("exp_avg", "exp_avg_sq"),
}


def check_rule(rule: str) -> None:
    """Raise ``ValueError`` for an unknown rule name."""
    if rule not in UPDATE_RULES:
        raise ValueError(f"method.update must be one of {list(UPDATE_RULES)}, got {rule!r}.")


def apply_rule(
    rule: str,
    states: list[dict[str, Tensor]],
    grads: list[Tensor],
    lr: float,
    t: int,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """Update every layer's ``coords`` in place from its gradient estimate.

    Args:
        rule: ``"plain"`` (SGD, ``-lr g``), ``"momentum"`` (SGD with heavy-ball
            momentum, ``buf <- momentum buf + g``, ``-lr buf``) or ``"adam"``
            (bias-corrected moments, ``-lr m_hat / (sqrt(v_hat) + eps)``).
        states: Per layer, ``coords`` and the rule's tensors (:data:`RULE_STATE`;
            created on first use, updated in place).
        grads: Per layer, the gradient estimate of the coordinates.
        lr: Learning rate.
        t: Number of updates since the rule state was (re)started, this one included
            (Adam's bias correction).
        momentum: Momentum factor.
        betas: Adam's decay rates.
        eps: Adam's denominator term.

    """
    check_rule(rule)
    coords = [st["coords"] for st in states]
    grads = [g.to(c.dtype) for g, c in zip(grads, coords, strict=True)]
    if rule == "adam":
        for st, g in zip(states, grads, strict=True):
            for key in RULE_STATE["adam"]:
                if key not in st:
                    st[key] = torch.zeros_like(g)
        adam(
            coords, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
            [], [torch.tensor(float(t - 1)) for _ in states], foreach=False,
            amsgrad=False, beta1=betas[0], beta2=betas[1], lr=lr, weight_decay=0.0, eps=eps,
            maximize=False,
        )
        return
    buffers = [st.get("momentum_buffer") for st in states]  # sgd fills in new ones
    sgd(
        coords, grads, buffers, foreach=False, weight_decay=0.0,
        momentum=momentum if rule == "momentum" else 0.0, lr=lr, dampening=0.0,
        nesterov=False, maximize=False,
    )
    if rule == "momentum":
        for st, buf in zip(states, buffers, strict=True):
            st["momentum_buffer"] = buf


#: Values of ``carry``.
CARRY_MODES: tuple[str, ...] = ("reset", "project")


class SDZE(TwoPointOptimizer):
    """Stochastic dimension-free zeroth-order optimizer (a ``torch.optim.Optimizer``).

    Built from the network module (every parameter must belong to an
    ``nn.Linear``; networks other than :class:`~sdze_lightning.nn.MLP` get the
    implicit offset through forward hooks, one per layer however many SDZE
    instances share the network, removed by :meth:`close`). Step it with
    ``step(loss_at=fn, step_index=k)`` (:mod:`~sdze_lightning.methods.base`), or with
    a plain closure for a loss that does not depend on a noise key.

    Args:
        module: The network.
        lr: Learning rate (a ``param_groups`` entry, so LR schedulers work); the default
            is ``configs/method/sdze.yaml``'s (accuracy by lr: ``benchmarks/README.md``,
            ``method_accuracy.py``).
        eps: Perturbation size in the coordinates (about ``1e-3`` in float32,
            ``1e-5``-``1e-4`` in float64).
        rank: Subspace rank ``r`` per factor (capped at the layer's sizes).
        period: Steps per window ``T``: subspace refresh and fold.
        queries: Directions ``q`` per step (``2 q`` loss evaluations).
        crns: Common Random Numbers Synchronisation of the paired evaluations.
        update: ``"plain"``, ``"momentum"`` or ``"adam"`` in the coordinates.
        momentum: Momentum factor (``update="momentum"``).
        betas: Adam's decay rates (``update="adam"``).
        adam_eps: Adam's denominator term.
        carry: At a window change, ``"reset"`` the rule state or ``"project"``
            it into the new subspace (``C <- A_new^T A_old C B_old^T B_new``).
        seed: Seed of the method's random numbers (bases and directions); the
            global RNG is never used.

    """

    def __init__(
        self,
        module: nn.Module,
        lr: float = 1e-2,
        eps: float = 1e-3,
        rank: int = 4,
        period: int = 100,
        queries: int = 1,
        crns: bool = True,
        update: str = "adam",
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        carry: str = "reset",
        seed: int = 0,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"SDZE is built from the network module, got {type(module)}.")
        check_rule(update)
        if (
            not isinstance(betas, Sequence)
            or isinstance(betas, str)
            or len(betas) != 2
            or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in betas)
            or not all(0 <= b < 1 for b in betas)
        ):
            raise ValueError(f"method.betas must be two numbers in [0, 1), got {betas!r}.")
        if carry not in CARRY_MODES:
            raise ValueError(f"method.carry must be one of {list(CARRY_MODES)}, got {carry!r}.")
        positive_int("method.rank", rank)
        positive_int("method.period", period)
        layers = list(linear_layers(module))
        covered = {id(p) for layer in layers for p in layer.parameters()}
        outside = [
            n for n, p in module.named_parameters() if p.requires_grad and id(p) not in covered
        ]
        if not layers or outside:
            raise ValueError(
                "SDZE trains the weights and biases of nn.Linear layers; "
                + (f"parameters {outside} are outside any nn.Linear (freeze them with "
                   "requires_grad_(False) or use method=mezo)." if outside
                   else "the network has no nn.Linear layer.")
            )
        self.layers = [layer for layer in layers if layer.weight.requires_grad]
        if len(self.layers) != len(layers) or any(
            layer.bias is not None and not layer.bias.requires_grad for layer in self.layers
        ):
            raise ValueError("SDZE needs every nn.Linear weight and bias to be trainable.")
        defaults = dict(lr=lr)
        super().__init__(module, defaults, eps=eps, queries=queries, crns=crns, seed=seed)
        self.rank = rank
        self.period = period
        self.update = update
        self.momentum = float(momentum)
        self.betas = (float(betas[0]), float(betas[1]))
        self.adam_eps = float(adam_eps)
        self.carry = carry
        self.zo_state.update(window=0, rule_step=0)
        self._hooks: list[HookHold] | None = attach_hooks(self.module, self.layers)
        self._bases: tuple[int, list[LayerSubspace]] | None = None
        self._directions: list[list[Tensor]] = []
        #: ``(q, m)`` per-query estimates ``s_j u_j`` of the last step in the
        #: subspace coordinates (all layers concatenated), for variance monitors.
        self.last_query_estimates: Tensor | None = None
        #: ``(n,)`` float64 two-point scalars ``c_j`` of the last :meth:`probe` call.
        self.last_probe_scalars: Tensor | None = None

    # --------------------------------------------------------------- bookkeeping
    def layer_state(self, index: int) -> dict[str, Tensor]:
        """State of layer ``index``: ``coords`` and the rule's tensors (created on demand)."""
        layer = self.layers[index]
        st = self.state[layer.weight]
        if "coords" not in st:
            size = LayerSubspace.size_for(layer, self.rank)
            st["coords"] = torch.zeros(size, dtype=layer.weight.dtype, device=layer.weight.device)
        return st

    def subspaces(self, window: int | None = None) -> list[LayerSubspace]:
        """The layers' subspaces of ``window`` (default: the current one)."""
        window = self.zo_state["window"] if window is None else window
        if self._bases is not None and self._bases[0] == window:
            subs = self._bases[1]
            first = self.layers[0].weight
            if subs[0].A.dtype == first.dtype and subs[0].A.device == first.device:
                return subs
        subs = [
            LayerSubspace.draw(layer, self.rank, self.seed, window, i)
            for i, layer in enumerate(self.layers)
        ]
        self._bases = (window, subs)
        return subs

    def _change_window(self, window: int) -> None:
        """Fold the offset of the old window, then reset or carry the rule state."""
        old_window = self.zo_state["window"]
        old = self.subspaces(old_window)
        for i, sub in enumerate(old):
            st = self.layer_state(i)
            sub.fold(st["coords"])
            st["coords"].zero_()
        new = self.subspaces(window)
        for i, (sub_old, sub_new) in enumerate(zip(old, new, strict=True)):
            st = self.layer_state(i)
            st["coords"] = st["coords"].new_zeros(sub_new.size)
            for key in RULE_STATE[self.update]:
                if key not in st:
                    continue
                if self.carry == "reset":
                    del st[key]
                else:
                    st[key] = sub_new.carry(sub_old, st[key], second_moment=key == "exp_avg_sq")
        if self.carry == "reset":
            self.zo_state["rule_step"] = 0
        self.zo_state["window"] = window

    def _install(self, offsets: list[Tensor] | None = None) -> None:
        """Set every layer's implicit offset to its coordinates (plus ``offsets``)."""
        if self._hooks is None:  # used again after close(): hold the hooks again
            self._hooks = attach_hooks(self.module, self.layers)
        subs = self.subspaces()
        for i, (layer, sub) in enumerate(zip(self.layers, subs, strict=True)):
            coords = self.layer_state(i)["coords"]
            if offsets is not None:
                set_offset(layer, sub.delta(coords + offsets[i]))
            elif bool(coords.any()):
                set_offset(layer, sub.delta(coords))
            else:
                set_offset(layer, None)

    # --------------------------------------------------------------------- hooks
    def _prepare(self, step: int) -> None:
        window = step // self.period
        if window != self.zo_state["window"]:
            self._change_window(window)
        gen = generator(self.layers[0].weight.device, Stream.SDZE_DIRECTIONS, self.seed, step)
        self._directions = self._draw_directions(self.queries, gen)

    def _draw_directions(self, count: int, gen: torch.Generator) -> list[list[Tensor]]:
        """``count`` Gaussian directions in the current window's coordinates, one list per query."""
        subs = self.subspaces()
        device, dtype = self.layers[0].weight.device, self.layers[0].weight.dtype
        return [
            [torch.randn(sub.size, generator=gen, device=device, dtype=dtype) for sub in subs]
            for _ in range(count)
        ]

    def _offsets(
        self, directions: list[list[Tensor]], query: int | None, sign: int
    ) -> list[Tensor] | None:
        """Per-layer coordinate offsets ``sign eps u_query`` (``None`` for ``query=None``)."""
        if query is None:
            return None
        return [(sign * self.eps) * u for u in directions[query]]

    def _perturb(self, query: int | None, sign: int) -> None:
        self._install(self._offsets(self._directions, query, sign))

    def gradient(self, scalars: Tensor) -> list[Tensor]:
        """Per-layer coordinate gradient estimate ``(1/q) sum_j s_j u_j`` of scalars ``s``."""
        w = (scalars / self.queries).tolist()
        return [
            sum(w[j] * self._directions[j][i] for j in range(self.queries))
            for i in range(len(self.layers))
        ]

    def _update(self, scalars: Tensor) -> None:
        grads = self.gradient(scalars)
        self.last_query_estimates = torch.stack(
            [s * torch.cat(u) for s, u in zip(scalars.tolist(), self._directions, strict=True)]
        )
        self.zo_state["rule_step"] += 1
        apply_rule(
            self.update, [self.layer_state(i) for i in range(len(self.layers))], grads, self.lr,
            self.zo_state["rule_step"], self.momentum, self.betas, self.adam_eps,
        )
        self._install()

    # -------------------------------------------------------------------- public
    @torch.no_grad()
    def fold(self) -> None:
        """Write the current offset into the weights (``W += A C B^T``) and zero it.

        The network computes the same function before and after; the rule
        state is kept (the subspace does not change).
        """
        for i, sub in enumerate(self.subspaces()):
            st = self.layer_state(i)
            sub.fold(st["coords"])
            st["coords"].zero_()
        self._install()

    def close(self) -> None:
        """Fold the offset into the weights and release the forward hooks (Lightning teardown).

        The network computes the same function and is a plain module again when no
        other SDZE holds its hooks; a later step holds them again.
        """
        self.fold()
        for layer in self.layers:
            set_offset(layer, None)
        hooks, self._hooks = self._hooks, None
        for hold in hooks or []:
            hold.remove()

    @torch.no_grad()
    def probe(
        self, loss_at: LossAt, n: int, crns: bool = True,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """``n`` independent SDZE gradient estimates at the current point, changing nothing.

        Each probe is what a step with ``q = 1`` estimates: a Gaussian
        direction ``u_j`` in the current window's subspace coordinates and the
        two-point scalar ``c_j = (L(c + eps u_j) - L(c - eps u_j)) / (2 eps)``;
        the estimate is ``c_j u_j``; the scalars ``c_j`` alone (directional
        derivatives along ``u_j``, e.g. for their variance) are kept in
        :attr:`last_probe_scalars`. The directions come from their own
        counter-based stream (seed, step), so the parameters, the coordinates,
        the update-rule state, the step counter and every generator are as
        before. A window change that the next step would make is not made: the
        probes measure the subspace the last step worked in. Under data
        parallelism each pair of loss values is averaged across ranks like a
        step's (every rank must probe).

        Args:
            loss_at: Evaluates the loss (forward only) for a noise key.
            n: Number of probes (``2 n`` loss evaluations).
            crns: Whether the two evaluations of a probe share the noise key
                (collocation points and estimator directions). Probe ``j``
                uses key ``PROBE_KEY_BASE + 2 j`` (and ``+ 1`` for the minus
                evaluation without CRNS), never a training step's key.
            reduce: Combines the loss values across data-parallel ranks (as a step's
                ``reduce``); ``None``: one process.

        Returns:
            Float64 tensor ``(n, m)``, ``m`` = number of subspace coordinates
            of all layers (the coordinates are orthonormal in parameter space,
            so variances are those of the parameter-space estimates).

        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"probe needs a positive number of probes, got {n!r}.")
        first = self.layers[0].weight
        gen = generator(first.device, Stream.SDZE_PROBES, self.seed, self.zo_state["step"])
        directions = self._draw_directions(n, gen)

        def key_for(j: int, sign: int) -> int:
            return PROBE_KEY_BASE + 2 * j + (0 if crns or sign > 0 else 1)

        values = perturbation_sweep(
            n,
            lambda j, sign: self._install(self._offsets(directions, j, sign)),
            lambda j, sign: loss_at(key_for(j, sign)),
        )
        scalars = self.scalars(values if reduce is None else reduce(values))
        self.last_probe_scalars = scalars.cpu()
        return torch.stack(
            [s * torch.cat(u).to(torch.float64) for s, u in zip(scalars, directions, strict=True)]
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict` and re-install the offsets it holds."""
        super().load_state_dict(state_dict)
        self._bases = None
        self._install()

    def state_size(self) -> int:
        """Number of tensor elements in the optimizer state (independent of the input dimension)."""
        return sum(
            v.numel() for st in self.state.values() for v in st.values() if isinstance(v, Tensor)
        )

    def describe_state(self) -> str:
        """Counters, settings and the size of the offsets, for divergence reports."""
        norms = [
            f"{float(self.layer_state(i)['coords'].norm()):.3g}" for i in range(len(self.layers))
        ]
        return (
            f"{super().describe_state()[:-1]}, window={self.zo_state['window']}, "
            f"rank={self.rank}, period={self.period}, update={self.update}, carry={self.carry}, "
            f"|coords| per layer={norms})"
        )
