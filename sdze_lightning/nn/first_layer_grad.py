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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class FirstLayerGradient:
    """``dL/dW = sum_dense Delta^T Z + sum_sparse scatter(Delta^T, J)``, in factors.

    Attributes:
        dense: Pairs ``(Delta, Z)``: ``(n, out)`` and ``(n, D)``.
        sparse: Pairs ``(Delta, J)``: ``(K, out)`` and the ``K`` column indices.
    """

    dense: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    sparse: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.dense or self.sparse)

    def product(self, z: Tensor, weight: Tensor) -> Tensor:
        """``z @ weight.T``, recording ``(dL/d out, z)`` when back-propagated."""
        return _RecordedProduct.apply(z, weight, self)

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
    def forward(ctx: Any, z: Tensor, weight: Tensor, sink: FirstLayerGradient) -> Tensor:
        ctx.sink = sink
        ctx.save_for_backward(z, weight)
        return z @ weight.T

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        z, weight = ctx.saved_tensors
        ctx.sink.dense.append((grad, z))
        grad_z = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_z, None, None


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
