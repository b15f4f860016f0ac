"""Exact gradients at (almost) inference memory: the input layer updated from its factors.

In an MLP PINN on ``d`` inputs nearly all parameters sit in the first layer's
weight ``W`` (``width x d``): 1.28e9 of them at ``d = 1e7``, width 128. Adam
over them keeps a ``width x d`` gradient and two moments of that size (4x the
parameters: 4 x 1.28e9 float32 numbers, 20.5 GB at ``d = 1e7``, before the batch).
Yet the gradient of ``W`` is low-rank: ``dL/dW = Delta^T Z`` with ``Z`` the collocation
points and the estimator's directions (``M`` rows, already in memory) and ``Delta`` the
back-propagated signal at the first layer (``M x width``, from a backward pass
through the small layers only; :mod:`sdze_lightning.nn.first_layer_grad`).

:class:`FusedAdafactor` therefore

* back-propagates the estimated loss as usual (``manual_backward``), with the
  first layer's products recording ``(Delta, Z)`` instead of a ``W.grad``;
* updates every other parameter (the first-layer bias, the hidden and output
  layers: ``O(width^2)`` numbers) with Adam, exactly as ``torch.optim.Adam``;
* updates ``W`` in place, one block of input columns at a time (LOMO-style
  fused gradient and update): ``G_blk = Delta^T Z[:, blk]``, then the
  factored second moment of Adafactor (Shazeer & Stern, 2018)::

      r <- b2 r + (1 - b2) (mean_j G_ij^2 + eps1)      one number per row
      c <- b2 c + (1 - b2) (mean_i G_ij^2 + eps1)      one number per input column
      V = r c^T / mean(r) / (1 - b2^t)                  (Adam's bias correction)
      W <- W - lr G / (sqrt(V) + eps)

  This step's row statistic needs every column before the first block can be
  applied, which takes two passes over the blocks. By default the update uses
  the row statistic of the previous step instead (the column statistic is
  this step's), so that each block is formed once, applied to ``W`` at once,
  and its row sums feed the next step's row statistic: one pass. The first
  step, which has no previous statistic, takes two passes, and
  ``exact_rows=True`` takes two passes at every step (Adafactor exactly).
  ``W`` takes no first moment: a momentum buffer would be ``width x d`` again.

What the lag leaves out. The row factor enters ``V`` only through the profile
``r / mean(r)``, in which the bias correction cancels. Bias-corrected, the row
statistic ``R_t = r_t / (1 - b2^t)`` is a weighted mean::

    R_t = (1 - w_t) R_(t-1) + w_t (m_t + eps1),   m_t = mean_j G_ij^2 of this step,
    w_t = (1 - b2) / (1 - b2^t) = 1 / (1 + b2 + ... + b2^(t-1)),

so the lagged statistic misses this step's row mean square, whose weight
``w_t`` lies between ``1 / t`` and ``1 / (t b2^(t-1))``: about ``1 / t`` while
``t << 1 / (1 - b2)`` (half of the statistic at the second step), falling to
``1 - b2`` only once ``t >> 1 / (1 - b2)``. The current statistic is
``(1 - w_t) + w_t m_t / R_(t-1)`` times the lagged one: near 1 where a row's
gradient keeps its scale, without bound where it jumps; the lagged update of
that row is then too large by about the square root of that factor.

The lag bound. Adafactor bounds its step by update clipping (``U / max(1,
RMS(U) / c)``, ``c = 1``, the RMS over the whole matrix), which this scheme
cannot apply: the RMS of a row or of the matrix is known only after the last
block has been applied. Clipping each (row, block) tile by its own RMS would
be possible in one pass, but the step would then depend on ``block_bytes``,
and ``c = 1`` binds on ordinary steps of exact Adafactor too (without a first
moment, ``RMS(U)`` is about 1 while the gradient's scale is steady and above
1 while it grows, and the rank-one fit ``V`` of ``G^2`` adds to it). The
one-pass update instead bounds the lagged row statistic from below by what
this step has shown of the current one. When block ``B`` is applied, the row
sums ``S_i`` of ``G^2`` over the columns up to and including ``B`` are known,
and ``rho_i = b2 r_i + (1 - b2) (S_i / d + eps1)`` is at most this step's
``r_i``; block ``B`` takes the row statistic ``max(R_(t-1), rho / ((1 - b2^t)
lag_bound))`` (bias-corrected, row by row), with the lagged ``mean(r)`` as
before. Hence:

* the floor rises above the lagged statistic only in rows whose statistic
  grows more than ``lag_bound``-fold in the step (``rho <= r_t``), and every
  other row's update is bit for bit the unbounded one. Such rows are those
  whose gradient jumps; at the second step, where ``w_2 = 1 / (1 + b2)`` is
  about 1/2, also a row whose mean square grows more than ``lag_bound (1 +
  b2) - b2``-fold (31-fold with the default);
* binding or not, every entry's update is at most ``sqrt(lag_bound q_i (1 +
  b2) / b2)`` times the exact-rows update from the same state, where ``q_i``
  is row ``i``'s sum of ``G^2`` over all columns divided by its sum over the
  columns up to ``B``: ``q_i = 1`` in the last block (at every entry when
  ``W`` is one block) and largest in a row's first blocks when ``W`` spans
  many. The size of the jump drops out; ``(1 + b2) / b2 >= 1 / (1 - w_t)``
  covers the lagged ``mean(r)``;
* it costs ``O(width)`` work per block, no pass and no state.

Extra memory: the statistics (``width + d`` numbers), ``Delta`` and the
temporaries of one block (``block_bytes`` each, two of them), whatever ``d``
is. The step costs one product of ``W``'s shape (the pass over the blocks)
and a few element-wise passes over ``W`` more than a forward and backward pass.

Scope: the library's :class:`~sdze_lightning.nn.MLP` (the first layer is read
through its products), the forward-mode estimators (``taylor``, ``fd``,
``stein``: an estimator that back-propagates through ``x`` would need the
gradient of a gradient, which the recorded factors do not give).

Data parallelism (``trainer.strategy=ddp``): every rank samples the whole batch
and keeps its share, and the step's directions are the same on every rank, so a
rank can rebuild the others' factors ``Z`` and needs only their ``Delta``. The
input weight stays out of DDP (no ``width x d`` gradient bucket); after the
backward pass the ranks gather the points' ``Delta`` (``N x width`` numbers per
step in all) and sum the directions' (``K x width``)
(:meth:`~sdze_lightning.nn.first_layer_grad.FirstLayerGradient.across_ranks`),
DDP averages the small layers' gradients, and every rank applies the same update
to its copy of ``W``. Communication per step does not depend on ``d``. The
update itself is not split: each rank forms the whole batch's ``Delta^T Z``, one
product of ``W``'s shape, as one process would; the ranks share the forward and
backward passes.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from sdze_lightning.checks import boolean, positive_float_or_none, positive_int
from sdze_lightning.methods.base import FirstOrderStep, MethodTraits
from sdze_lightning.methods.shampoo import GraftedShampoo
from sdze_lightning.nn.first_layer_grad import FirstLayerGradient
from sdze_lightning.nn.protocol import first_layer_network

#: Default bound on the bytes of one block temporary (``width x columns``): small enough
#: for a block and its statistics to stay in the CPU's cache between the passes over it.
BLOCK_BYTES = 4 * 2**20

#: Default ``lag_bound``: a row's statistic grows 16-fold in a step only where its mean square
#: grows 31-fold at the second step (where this step weighs about half) and more later; a
#: bound row's step stays within ``sqrt(2 * 16)`` times the exact one (``W`` in one block).
LAG_BOUND = 16.0

#: Values of ``small_layers``: the update of the small layers' matrices.
SMALL_LAYER_RULES = ("adam", "shampoo")


class FusedAdafactor(torch.optim.Adam):
    """Adam on the small layers, a fused factored update on the input layer's weight.

    Built from the network module (an :class:`~sdze_lightning.nn.MLP`), like
    the zeroth-order methods, but first-order: the problem runs its closure
    with ``manual_backward``. Learning-rate schedulers act on both parameter
    groups (group 0: the input layer's weight, learning rate ``input_lr``; group 1:
    the rest, ``lr``).

    Args:
        module: The network, an :class:`~sdze_lightning.nn.MLP`.
        lr: Learning rate of the small layers, and of the input layer's weight unless
            ``input_lr`` is given.
        input_lr: Learning rate of the input layer's weight; ``None``: ``lr``, times
            ``((width / 2) / |x|)^2`` where the step's points' RMS norm ``|x|`` exceeds
            ``width / 2`` (:func:`input_rate_scale`). A number is used as it is.
        betas: Adam's ``(b1, b2)``; the input layer's factored second moment uses ``b2``.
        eps: Added to the root of the second moment (as in Adam).
        eps1: Added to ``G^2`` in the factored statistics (Adafactor's ``eps1``).
        block_bytes: Bound on one block temporary of the input-layer update
            (``width x columns`` numbers of the statistics' dtype; two of them).
        exact_rows: Use this step's row statistic (two passes over the blocks per
            step, Adafactor exactly) instead of the previous step's (one pass; the
            first step always takes two).
        lag_bound: Bound on the one-pass update (``exact_rows=False``): the lagged row
            statistic is floored at ``1 / lag_bound`` of the part of this step's statistic
            known when a block is applied, so a row's update is at most about
            ``sqrt(2 lag_bound)`` times the exact one where ``W`` is one block (module
            docs). It binds only in rows whose statistic grows more than ``lag_bound``-fold
            in one step; ``None``: no bound (a row whose gradient jumps can take a step of
            any size). At least 1.
        small_layers: How the small layers' matrices are updated: ``"adam"`` (Adam), or
            ``"shampoo"``: Shampoo's direction with Adam's step length per matrix
            (:class:`~sdze_lightning.methods.shampoo.GraftedShampoo`); biases keep Adam.
        precondition_every: Steps between Shampoo's inverse-root updates.

    """

    #: Built from the network module; estimators that back-propagate through ``x`` are
    #: refused (see the module docs); without a backward (a non-finite loss under
    #: divergence=skip) neither its Adam step nor the input-layer update (an empty recorded
    #: gradient) changes anything; under DDP it exchanges the input layer's factors itself.
    traits: ClassVar[MethodTraits] = MethodTraits(
        takes_module=True, needs_forward_only_estimator=True, withholds_nonfinite_step=True,
        reduces_input_layer=True,
    )

    def __init__(
        self,
        module: nn.Module,
        lr: float = 1e-3,
        input_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eps1: float = 1e-30,
        block_bytes: int = BLOCK_BYTES,
        exact_rows: bool = False,
        lag_bound: float | None = LAG_BOUND,
        small_layers: str = "adam",
        precondition_every: int = 10,
    ) -> None:
        (weight,) = self.self_reduced_parameters(module)
        positive_int("method.block_bytes", block_bytes)
        input_lr = positive_float_or_none("method.input_lr", input_lr)
        if not eps1 >= 0:
            raise ValueError(f"method.eps1 must be >= 0, got {eps1!r}.")
        if lag_bound is not None and (isinstance(lag_bound, bool) or not isinstance(
                lag_bound, numbers.Real) or not lag_bound >= 1):
            raise ValueError(f"method.lag_bound must be >= 1 or null, got {lag_bound!r}.")
        if small_layers not in SMALL_LAYER_RULES:
            raise ValueError(f"method.small_layers must be one of {SMALL_LAYER_RULES}, "
                             f"got {small_layers!r}.")
        super().__init__(
            [{"params": [weight], "factored": True, "scaled_by_points": input_lr is None,
              "lr": lr if input_lr is None else input_lr},
             {"params": _small_parameters(module), "factored": False}],
            lr=lr, betas=betas, eps=eps,
        )
        self.module = module
        self.eps1 = float(eps1)
        self.block_bytes = block_bytes
        self.exact_rows = boolean("method.exact_rows", exact_rows)
        self.lag_bound = None if lag_bound is None else float(lag_bound)
        self._saved_statistics: dict[int, tuple[Tensor, Tensor]] = {}
        every = positive_int("method.precondition_every", precondition_every)  # with adam too
        self.shampoo = None if small_layers == "adam" else GraftedShampoo(
            self.param_groups[1]["params"], self.state, beta2=betas[1], every=every)
        self.register_load_state_dict_pre_hook(_remember_statistics)
        self.register_load_state_dict_post_hook(_restore_statistics)

    @staticmethod
    def self_reduced_parameters(module: nn.Module) -> list[nn.Parameter]:
        """The parameters whose gradient the method exchanges between ranks itself: ``W``."""
        return [first_layer_network(module, "method=fused_adafactor updates",
                                    "method=adam").input_layer.weight]

    @staticmethod
    def gradient_numel(module: nn.Module) -> int:
        """Dense gradient numbers: every parameter but the input layer's weight (factored)."""
        return sum(p.numel() for p in _small_parameters(module))

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, shard: Any = None, *,
        request: FirstOrderStep | None = None,
    ) -> Any:
        """Run ``closure`` (forward + ``manual_backward``), then update every parameter.

        Args:
            closure: Computes the loss and back-propagates it.
            shard: This rank's :class:`~sdze_lightning.distributed.Shard` under data
                parallelism: the input layer's factors are then exchanged with the other
                ranks first. ``None``: one process.
            request: The step as the problem hands it over (its ``closure`` and ``shard``
                replace the arguments above).

        Raises:
            ValueError: without a closure: the input layer's gradient exists only as
                factors recorded while the closure back-propagates.

        """
        if request is not None:
            closure, shard = request.closure, request.shard
        if closure is None:
            raise ValueError(
                "FusedAdafactor.step needs the closure that computes the loss and "
                "back-propagates it (the input layer's gradient is recorded during it)."
            )
        with self.module.capture_first_layer_gradient() as grad, torch.enable_grad():
            loss = closure()
        taken = self.shampoo.snapshot() if self.shampoo is not None else None
        super().step()  # Adam on group 1; the input weight has no .grad and is skipped
        if taken:
            self.shampoo.apply(taken)
        if grad and shard is not None and shard.active:
            grad = grad.across_ranks(shard)
        if grad:
            for group in self.param_groups:
                if group["factored"]:
                    self._factored_update(group, grad)
        return loss

    def _factored_update(self, group: dict[str, Any], grad: FirstLayerGradient) -> None:
        (weight,) = group["params"]
        _, beta2 = group["betas"]
        stats_dtype = torch.float32 if weight.element_size() < 4 else weight.dtype
        state = self.state[weight]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["row_sq"] = torch.zeros(weight.shape[0], dtype=stats_dtype, device=weight.device)
            state["col_sq"] = torch.zeros(weight.shape[1], dtype=stats_dtype, device=weight.device)
        state["step"] += 1
        step = float(state["step"])
        rows, cols = weight.shape
        row, col = state["row_sq"], state["col_sq"]
        width = min(cols, max(1, self.block_bytes // (rows * torch.finfo(stats_dtype).bits // 8)))
        blocks = [(start, min(cols, start + width)) for start in range(0, cols, width)]
        buffers = torch.empty(2, rows, width, dtype=stats_dtype, device=weight.device)
        lagged = not self.exact_rows and step > 1
        if not lagged:  # pass 1: this step's row sums, before any column is updated
            row_sum = self._column_pass(grad, blocks, col, beta2, buffers, accumulate=True)
            self._update_row(row, row_sum, beta2, cols)
        # V_ij = row_i col_j / (mean(row) (1 - b2^t)): the row part as one vector
        norm = row.mean() * (1 - beta2**step)
        row_scale = (row / norm).sqrt_()
        floor = None
        if lagged and self.lag_bound is not None:
            # rho = b2 row + (1 - b2) (S / cols + eps1) <= this step's row statistic (S: the
            # row sums so far), put on the lagged statistic's scale and divided by the bound:
            # floor = base + coef S
            shrink = (1 - beta2 ** (step - 1)) / ((1 - beta2**step) * self.lag_bound)
            base = (row * beta2 + (1 - beta2) * self.eps1) * shrink
            floor = _LagFloor(base, (1 - beta2) * shrink / cols, row, norm)
        row_sum = self._column_pass(grad, blocks, col, beta2, buffers, accumulate=lagged,
                                    apply=(weight, row_scale, group), floor=floor)
        if lagged:  # the row statistic of this step serves the next one
            self._update_row(row, row_sum, beta2, cols)

    def _update_row(self, row: Tensor, row_sum: Tensor, beta2: float, cols: int) -> None:
        row.mul_(beta2).add_(row_sum / cols + self.eps1, alpha=1 - beta2)

    def _column_pass(
        self, grad: FirstLayerGradient, blocks: list[tuple[int, int]], col: Tensor,
        beta2: float, buffers: Tensor, accumulate: bool,
        apply: tuple[Tensor, Tensor, dict] | None = None, floor: _LagFloor | None = None,
    ) -> Tensor:
        """One pass over the column blocks of the gradient.

        Forms each block ``G_blk``; with ``accumulate``, adds it to the column
        statistic ``col`` and returns the row sums of ``G^2``; with ``apply = (W,
        row_scale, group)``, then updates ``W[:, blk]`` with the column statistic.
        With ``floor`` (and ``accumulate``), each block's row factor comes from the
        lagged row statistic floored by the row sums up to that block (module docs).
        """
        row_sum = torch.zeros(buffers.shape[1], dtype=buffers.dtype, device=buffers.device)
        rate_scale = 1.0
        # absent from the groups of checkpoints saved before the rule, which used lr as it is
        if apply is not None and apply[2].get("scaled_by_points", False):
            rate_scale = input_rate_scale(grad.points_rms_norm(), apply[0].shape[0])
        for start, stop in blocks:
            n = stop - start
            g = grad.block(start, stop, buffers.dtype, out=buffers[0, :, :n])
            if accumulate:
                g2 = torch.mul(g, g, out=buffers[1, :, :n])
                row_sum += g2.sum(dim=1)
                col[start:stop].mul_(beta2).add_(g2.mean(dim=0) + self.eps1, alpha=1 - beta2)
            if apply is not None:
                weight, row_scale, group = apply
                if floor is not None:
                    row_scale = floor.row_scale(row_sum)
                denom = torch.outer(row_scale, col[start:stop].sqrt(),
                                    out=buffers[1, :, :n]).add_(group["eps"])
                lr = group["lr"] * rate_scale
                if weight.dtype == buffers.dtype:
                    weight[:, start:stop].addcdiv_(g, denom, value=-lr)
                else:
                    weight[:, start:stop] += g.div_(denom).mul_(-lr).to(weight.dtype)
        return row_sum

    def describe_state(self) -> str:
        """The learning rates and step count, for divergence reports."""
        steps = [float(s["step"]) for s in self.state.values() if "step" in s]
        lrs = [g["lr"] for g in self.param_groups]
        return f"FusedAdafactor(lr={lrs}, step={int(max(steps)) if steps else 0})"


def input_rate_scale(points_rms_norm: float | None, width: int) -> float:
    """The factor on ``lr`` of the input layer's step: ``min(1, ((width / 2) / |x|)^2)``.

    ``|x|`` is the RMS norm of the step's points. The factored step moves each entry of
    ``W`` by about the learning rate: on a fresh point ``x`` the pre-activation ``W x`` moves
    by about ``lr |x|``, on the step's own points by up to ``lr |x|_1 / sqrt(N)`` (the
    update's signs follow theirs), which grows like ``d``, not ``sqrt(d)``. The factor keeps
    the rate where ``|x| <= width / 2`` (the unit ball; the cube up to ``d = 3 (width /
    2)^2``, 12288 at width 128) and divides it by ``|x|^2`` beyond: a rate proportional to
    ``1 / d`` on the cube, the one measured to train there (``1e-3`` at ``d = 1e4``,
    ``1e-4`` at ``1e5``, ``1e-5`` at ``1e6``; benchmarks/README.md, ``scale_first.py``).
    ``None`` (no points recorded): 1.
    """
    reference = width / 2
    if points_rms_norm is None or not points_rms_norm > reference:
        return 1.0
    return (reference / points_rms_norm) ** 2


class _LagFloor(NamedTuple):
    """The lag bound's floor on the row statistic: ``base + coef S`` for row sums ``S``."""

    base: Tensor
    coef: float
    row: Tensor  # the lagged row statistic
    norm: Tensor  # mean(row) (1 - b2^t)

    def row_scale(self, row_sum: Tensor) -> Tensor:
        """``sqrt(max(row, floor) / norm)``: bit for bit ``sqrt(row / norm)`` where unbound."""
        used = torch.add(self.base, row_sum, alpha=self.coef)
        return torch.maximum(used, self.row, out=used).div_(self.norm).sqrt_()


def _small_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Every trainable parameter but the input layer's weight: Adam's group."""
    weight = module.input_layer.weight
    return [p for p in module.parameters() if p is not weight and p.requires_grad]


def _remember_statistics(optimizer: FusedAdafactor, state_dict: dict[str, Any]) -> None:
    """Before loading: keep the saved statistics (torch casts state to the weight's dtype)."""
    optimizer._saved_statistics = {
        int(key): (value["row_sq"], value["col_sq"])
        for key, value in state_dict.get("state", {}).items()
        if isinstance(value, dict) and "row_sq" in value
    }


def _restore_statistics(optimizer: FusedAdafactor) -> None:
    """After loading: float32 statistics of a bfloat16 weight come back float32, bit for bit."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for key, (row, col) in optimizer._saved_statistics.items():
        state = optimizer.state[params[key]]
        state["row_sq"] = row.to(device=params[key].device, copy=True)
        state["col_sq"] = col.to(device=params[key].device, copy=True)
    optimizer._saved_statistics = {}
