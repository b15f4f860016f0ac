"""The first layer's weight gradient as low-rank factors, never as a ``width x d`` matrix.

Every use of the first layer's weight ``W`` (``out x D``) in
:class:`~sdze_lightning.nn.MLP` is one of two products:

* ``Z W^T`` for a dense ``Z`` (``n x D``): the collocation points, or dense
  directions of an estimator (Gaussian, Rademacher);
* ``W[:, J]^T``: coordinate directions, a column lookup.

Back-propagation through ``Z W^T`` gives ``dL/dW += Delta^T Z`` with
``Delta = dL/d(Z W^T)`` (``n x out``), and through the lookup
``dL/dW[:, J] += Delta^T``. Inside :meth:`MLP.capture_first_layer_gradient
<sdze_lightning.nn.MLP.capture_first_layer_gradient>` the two products run
through the autograd functions below, which hand ``W`` no gradient and record
the pair ``(Delta, Z)`` (or ``(Delta, J)``) in a :class:`FirstLayerGradient`
instead. ``Delta`` is small (points or directions times the width) and ``Z`` is
a reference to a tensor that is in memory anyway, so the gradient costs
``O((n + K) x width)`` numbers instead of ``width x D``. Consumers read it one
block of input columns at a time (:meth:`FirstLayerGradient.block`).

Under autocast (``trainer.precision=bf16-mixed``) a matrix product casts its
operands to autocast's dtype, which for the first layer would be a
``width x D`` copy of ``W`` per product. :func:`input_product` and the recorded
products of :class:`FirstLayerGradient` therefore run with autocast disabled, casting one
block of ``W``'s columns at a time (:data:`CAST_BLOCK_BYTES`), and return
autocast's dtype, so that the layers after them run as under autocast;
back-propagation gives ``W`` its gradient in ``W``'s own dtype, with no cast
copy either. Outside autocast, and for a weight already in autocast's dtype,
every product is the plain one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

#: Bound on the bytes of one block of the input weight cast to autocast's dtype for a
#: product under autocast (``width x columns`` numbers): the only weight-sized
#: temporary of such a product is one block.
CAST_BLOCK_BYTES = 4 * 2**20


def autocast_dtype(weight: Tensor) -> torch.dtype | None:
    """The dtype autocast would cast ``weight`` to in a matrix product, or ``None``.

    ``None`` outside autocast on the weight's device type, for a float64 weight
    (autocast leaves float64 operands alone) and for a weight already in autocast's
    dtype: then the plain product makes no copy of the weight.
    """
    device_type = weight.device.type
    if weight.dtype == torch.float64 or not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return None if dtype == weight.dtype else dtype


def input_product(z: Tensor, weight: Tensor) -> Tensor:
    """``z @ weight.T`` for ``z`` of shape ``(..., D)``, with no ``weight``-sized cast.

    Outside autocast (see :func:`autocast_dtype`) this is ``z @ weight.T`` itself.
    Under autocast the product runs one block of input columns at a time with autocast
    disabled: each block of ``weight`` and ``z`` is cast to autocast's dtype and
    multiplied, the block products are summed in float32, and the sum is returned in
    autocast's dtype, the dtype autocast gives a matrix product. Back-propagation gives
    ``z`` its gradient the same way (a product per block) and ``weight`` its gradient
    in ``weight``'s own dtype; it supports higher derivatives (estimators that
    differentiate in ``x``).
    """
    dtype = autocast_dtype(weight)
    if dtype is None:
        return z @ weight.T
    return _CastProduct.apply(z, weight, dtype)


def _product(z: Tensor, weight: Tensor) -> Tensor:
    """``z @ weight.T`` (no autograd), through :func:`_cast_product` under autocast."""
    dtype = autocast_dtype(weight)
    return z @ weight.T if dtype is None else _cast_product(z, weight, dtype)


def _column_blocks(weight: Tensor, dtype: torch.dtype) -> Iterator[slice]:
    """Slices of ``weight``'s columns, each at most :data:`CAST_BLOCK_BYTES` in ``dtype``."""
    rows, cols = weight.shape
    itemsize = torch.empty((), dtype=dtype).element_size()
    width = max(1, CAST_BLOCK_BYTES // (rows * itemsize))
    for start in range(0, cols, width):
        yield slice(start, min(cols, start + width))


def _cast_product(z: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``z @ weight.T`` in ``dtype``, one block of columns at a time, summed in float32."""
    out: Tensor | None = None
    with torch.autocast(z.device.type, enabled=False):
        for cols in _column_blocks(weight, dtype):
            part = z[..., cols].to(dtype) @ weight[:, cols].to(dtype).T
            # out of place: the sum may be batched by vmap where a block is not
            out = part.to(torch.promote_types(dtype, torch.float32)) if out is None else out + part
    assert out is not None  # a weight has at least one column
    return out.to(dtype)


def _cast_product_t(grad: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``grad @ weight`` in ``dtype`` (``(..., D)``), one block of columns at a time."""
    with torch.autocast(grad.device.type, enabled=False):
        g = grad.to(dtype)
        return torch.cat([g @ weight[:, cols].to(dtype) for cols in _column_blocks(weight, dtype)],
                         dim=-1)


def _weight_gradient(grad: Tensor, z: Tensor, weight: Tensor) -> Tensor:
    """``sum grad^T z`` over the leading axes, in ``weight``'s dtype (its gradient)."""
    with torch.autocast(grad.device.type, enabled=False):
        g = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
        return g.T @ z.reshape(-1, z.shape[-1]).to(weight.dtype)


def _will_run(ctx: Any, index: int) -> bool:
    """Whether this backward pass needs the gradient of input ``index`` of ``ctx``.

    ``ctx.needs_input_grad`` only says that the input requires a gradient;
    ``torch.autograd.grad(y, x)`` asks for ``x``'s alone, and the weight's
    gradient would be formed for nothing. Where the engine cannot tell (no such
    query in this torch, a ``torch.func`` transform), the gradient is formed.
    """
    if not ctx.needs_input_grad[index]:
        return False
    try:
        node = ctx.next_functions[index][0]
        return node is None or bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError, IndexError, TypeError):
        return True


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


class _CastProduct(torch.autograd.Function):
    """``z @ W^T`` computed under autocast with block casts (:func:`input_product`).

    Written for ``torch.func`` too (``setup_context``, a generated vmap rule, a
    ``jvp``): the ``hte`` estimator differentiates the network with ``torch.func.grad``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
        return _cast_product(z, weight, dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        z, weight, dtype = inputs
        ctx.save_for_backward(z, weight)
        ctx.save_for_forward(z, weight)
        ctx.dtype = dtype

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        z, weight = ctx.saved_tensors
        grad_z = grad_w = None
        if _will_run(ctx, 0):
            grad_z = _CastProductT.apply(grad, weight, ctx.dtype).to(z.dtype)
        if _will_run(ctx, 1):
            grad_w = _weight_gradient(grad, z, weight)
        return grad_z, grad_w, None

    @staticmethod
    def jvp(ctx: Any, dz: Tensor | None, dweight: Tensor | None, _: Any) -> Tensor:
        z, weight = ctx.saved_tensors
        out = _add(None if dz is None else _CastProduct.apply(dz, weight, ctx.dtype),
                   None if dweight is None else _CastProduct.apply(z, dweight, ctx.dtype))
        assert out is not None  # called with at least one tangent
        return out


class _CastProductT(torch.autograd.Function):
    """``g @ W`` with block casts: the gradient of :class:`_CastProduct` in ``z``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
        return _cast_product_t(grad, weight, dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        grad, weight, dtype = inputs
        ctx.save_for_backward(grad, weight)
        ctx.save_for_forward(grad, weight)
        ctx.dtype = dtype

    @staticmethod
    def backward(ctx: Any, out_grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        grad, weight = ctx.saved_tensors
        grad_g = grad_w = None
        if _will_run(ctx, 0):
            grad_g = _CastProduct.apply(out_grad, weight, ctx.dtype).to(grad.dtype)
        if _will_run(ctx, 1):
            grad_w = _weight_gradient(grad, out_grad, weight)
        return grad_g, grad_w, None

    @staticmethod
    def jvp(ctx: Any, dgrad: Tensor | None, dweight: Tensor | None, _: Any) -> Tensor:
        grad, weight = ctx.saved_tensors
        out = _add(None if dgrad is None else _CastProductT.apply(dgrad, weight, ctx.dtype),
                   None if dweight is None else _CastProductT.apply(grad, dweight, ctx.dtype))
        assert out is not None  # called with at least one tangent
        return out


@dataclass
class FirstLayerGradient:
    """``dL/dW = sum_dense Delta^T Z + sum_sparse scatter(Delta^T, J)``, in factors.

    Attributes:
        dense: Pairs ``(Delta, Z)``: ``(n, out)`` and ``(n, D)``.
        sparse: Pairs ``(Delta, J)``: ``(K, out)`` and the ``K`` column indices.
        points: The ``Z`` of the dense pairs that are points (products recorded with
            ``points=True``), not directions: what the input layer's step is scaled by.
    """

    dense: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    sparse: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    points: list[Tensor] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.dense or self.sparse)

    def product(self, z: Tensor, weight: Tensor, points: bool = False) -> Tensor:
        """``z @ weight.T``, recording ``(dL/d out, z)`` when back-propagated.

        With ``points``, ``z`` (the network's input points, not directions) is also
        recorded in :attr:`points`.
        """
        return _RecordedProduct.apply(z, weight, self, points)

    def points_rms_norm(self) -> float | None:
        """Root mean square of the recorded points' Euclidean norms (``None``: no points)."""
        if not self.points:
            return None
        # in the points' dtype: a dtype argument would cast (copy) the whole batch first
        norms = torch.cat([torch.linalg.vector_norm(z, dim=1).double() for z in self.points])
        return float(norms.square().mean().sqrt())

    def columns(self, weight: Tensor, index: Tensor) -> Tensor:
        """``weight[:, index].T``, recording ``(dL/d out, index)`` when back-propagated."""
        return _RecordedColumns.apply(weight, index, self)

    def block(self, start: int, stop: int, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        """Columns ``start:stop`` of the gradient, ``(out_features, stop - start)``.

        Args:
            start: First input column.
            stop: One past the last input column.
            dtype: Dtype of the result (the factors are cast to it).
            out: Optional buffer of the right shape to write into (reused between blocks).

        """
        rows = self._rows()
        if out is None:
            out = torch.empty(rows, stop - start, dtype=dtype, device=self._device())
        for i, (delta, z) in enumerate(self.dense):
            if i == 0:  # written, not accumulated: no zero fill
                torch.mm(delta.T.to(dtype), z[:, start:stop].to(dtype), out=out)
            else:
                out.addmm_(delta.T.to(dtype), z[:, start:stop].to(dtype))
        if not self.dense:
            out.zero_()
        for delta, index in self.sparse:
            inside = (index >= start) & (index < stop)
            if bool(inside.any()):
                out.index_add_(1, index[inside] - start, delta[inside].T.to(dtype))
        return out

    def across_ranks(self, shard: Any) -> FirstLayerGradient:
        """The factors of the mean over data-parallel ranks of each rank's gradient.

        Every rank recorded its share of the points (a view of the whole batch, which
        every rank sampled: ``shard.full_batch``) and the step's directions (the same on
        every rank). Then ``mean_r dL_r/dW = (1 / R) sum_r Delta_r^T Z_r`` has the
        factors ``(cat_r Delta_r / R, whole batch)`` for the points and ``(sum_r Delta_r
        / R, Z)`` for the directions: one ``all_gather`` of the points' ``Delta``
        (``N x width`` numbers in all) and one ``all_reduce`` of the directions' ``Delta``
        (``K x width`` each), whatever ``D`` is. The ranks also compare a checksum of
        their directions, so that directions that differ between ranks stop the step.

        Args:
            shard: This rank's :class:`~sdze_lightning.distributed.Shard` (its
                ``rank``, ``world_size``, ``bounds`` and ``full_batch``).

        Raises:
            ValueError: If a recorded point is not this rank's rows of a batch that every
                rank sampled, or if the ranks' directions differ.

        """
        world = shard.world_size
        point_ids = {id(z) for z in self.points}
        points = [(d, z) for d, z in self.dense if id(z) in point_ids]
        shared = [(d, z) for d, z in self.dense if id(z) not in point_ids]
        batches = []
        for _, z in points:
            batch = shard.full_batch(z)
            if batch is None:
                raise ValueError(
                    "method=fused_adafactor under data parallelism needs the network to be "
                    "evaluated on the sampled points themselves (each rank rebuilds the "
                    "others' from the shared seed); this problem or estimator evaluates it "
                    f"on other inputs ({tuple(z.shape)}). Use trainer.devices=1 or method=adam."
                )
            batches.append(batch)
        deltas = [d for d, _ in points] + [d for d, _ in shared] + [d for d, _ in self.sparse]
        dtype = deltas[0].dtype
        for d in deltas[1:]:
            dtype = torch.promote_types(dtype, d.dtype)
        device, width = deltas[0].device, deltas[0].shape[1]
        # the points' Delta, padded to the largest share, and the checksums of the directions
        rows = [-(-b.shape[0] // world) for b in batches]
        checks = [z.sum(dtype=torch.float64) for _, z in shared] + [
            j.sum(dtype=torch.float64) for _, j in self.sparse]
        sent = torch.zeros(sum(rows) * width + len(checks), dtype=dtype, device=device)
        offset = 0
        for (d, _), n in zip(points, rows, strict=True):
            sent[offset:offset + d.numel()] = d.reshape(-1)
            offset += n * width
        if checks:
            sent[offset:] = torch.stack(checks).to(dtype)
        gathered = [torch.empty_like(sent) for _ in range(world)]
        dist.all_gather(gathered, sent)
        if checks and not all(torch.equal(g[offset:], sent[offset:]) for g in gathered):
            raise ValueError(
                "method=fused_adafactor under data parallelism needs the same estimator "
                "directions on every rank; they differ (an estimator that draws them from "
                "a per-rank generator?)."
            )
        out = FirstLayerGradient()
        offset = 0
        for (d, _), batch, n in zip(points, batches, rows, strict=True):
            parts = []
            for rank, g in enumerate(gathered):
                start, stop = dataclasses.replace(shard, rank=rank).bounds(batch.shape[0])
                parts.append(g[offset:offset + (stop - start) * width].view(-1, width))
            out.dense.append(((torch.cat(parts) / world).to(d.dtype), batch))
            out.points.append(batch)
            offset += n * width
        summed = torch.cat([d.reshape(-1).to(dtype) for d, _ in [*shared, *self.sparse]]
                           or [sent.new_empty(0)])
        if summed.numel():
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
            summed /= world
        offset = 0
        for target, pairs in ((out.dense, shared), (out.sparse, self.sparse)):
            for d, z in pairs:
                target.append((summed[offset:offset + d.numel()].view_as(d).to(d.dtype), z))
                offset += d.numel()
        return out

    def dense_gradient(self, in_features: int, dtype: torch.dtype) -> Tensor:
        """The whole ``out x D`` gradient (for checks on small problems only)."""
        return self.block(0, in_features, dtype)

    def _rows(self) -> int:
        first = (self.dense or self.sparse)[0][0]
        return first.shape[1]

    def _device(self) -> torch.device:
        return (self.dense or self.sparse)[0][0].device


class _RecordedProduct(torch.autograd.Function):
    """``z @ W^T`` whose backward records ``(grad, z)`` instead of forming ``dL/dW``."""

    @staticmethod
    def forward(
        ctx: Any, z: Tensor, weight: Tensor, sink: FirstLayerGradient, points: bool
    ) -> Tensor:
        ctx.sink, ctx.points = sink, points
        ctx.save_for_backward(z, weight)
        return _product(z, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        z, weight = ctx.saved_tensors
        ctx.sink.dense.append((grad, z))
        if ctx.points:
            ctx.sink.points.append(z)
        grad_z = None
        if ctx.needs_input_grad[0]:
            grad_z = (grad @ weight if grad.dtype == weight.dtype
                      else _cast_product_t(grad, weight, grad.dtype).to(z.dtype))
        return grad_z, None, None, None


class _RecordedColumns(torch.autograd.Function):
    """``W[:, J]^T`` whose backward records ``(grad, J)`` instead of forming ``dL/dW``."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, index: Tensor, sink: FirstLayerGradient) -> Tensor:
        ctx.sink = sink
        ctx.save_for_backward(index)
        return weight[:, index].T

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None, None]:
        (index,) = ctx.saved_tensors
        ctx.sink.sparse.append((grad, index))
        return None, None, None
