"""The PDE-aware optimizer of Churiwala, Shukla and Khullar (2025, arXiv:2507.08118).

Adam-like, with moments built from the gradients of the PDE residual at each
collocation point, ``g_i = grad_theta R(x_i; theta)`` (the residual itself,
not its square)::

    m <- b1 m + (1 - b1) mean_i g_i
    v <- b2 v + (1 - b2) mean_i g_i * g_i
    theta <- theta - lr m / (sqrt(v) + eps)

with ``b1 = b2 = 0.99``, ``lr = 1e-3`` and no bias correction. ``v`` is the
uncentred second moment of the per-point gradients (the paper calls it their
variance). Boundary and initial terms stay out of ``v``; in this
implementation they enter the first moment: with ``first_moment="residual"``
(the paper) the first-moment input is ``mean_i g_i + grad(weighted boundary
term)``.

The paper's rule is available exactly (``first_moment="residual",
adam_floor=False``), but it is **not the default**, because out of the box it
fails on the two problems it was checked on (Allen-Cahn 1D, Poisson 2D):

* its first moment is the gradient of the *mean residual*, which is not a
  descent direction of the squared-residual loss (the sign of ``g_i`` is not
  tied to the sign of ``r_i``): on Allen-Cahn 1D it does not descend. The
  default ``first_moment="loss"`` (what the authors' public code does) builds
  ``m`` from the gradient of the total loss, from the closure's backward;
* a parameter the residual does not depend on (the output bias under
  ``Delta u = f``: Poisson 2D) has ``v = 0`` exactly and is moved by
  ``lr m / eps``, ``1e5 m`` at the defaults: the output runs away and the
  boundary loss overflows within a few steps, **with either first moment**
  (the authors' variant too).
  With ``adam_floor=True`` (default) the denominator is
  ``sqrt(max(v, s)) + eps``, ``s`` the moving average (``b2``) of the squared
  first-moment input, i.e. Adam's second moment (without bias correction): no
  coordinate moves by more than ``lr m / sqrt(s)``, Adam's step with the same
  ``m``, and where ``v >= s`` (per-point residual gradients larger than the
  loss gradient) the rule is the paper's. This is not in the paper; it costs
  a third state tensor.

Final relative L2 and loss of both modes with and without the floor (measured:
``benchmarks/README.md``, ``method_accuracy.py``); the tests in ``tests/unit/test_methods.py``
check both modes.

Per-point gradients are the rows of the Jacobian of the residual vector,
computed by ``torch.func.vmap`` over the vector-Jacobian product with one-hot
cotangents, reduced to the two moments on the fly (memory ``chunk_size x
parameters``). A one-hot cotangent still flows through the graph of every point
it was built with, so the residuals are recomputed on chunks of ``chunk_size``
points and each chunk's VJPs run through that chunk's graph only: the cost grows
like ``N x chunk_size`` backward rows instead of ``N^2``, a saving that grows with
the batch (measured: ``benchmarks/README.md``, ``method_matrix.py``). A ``residuals``
callable without a ``rows`` argument gets the whole-batch computation.

``moment_points`` (default 128) estimates ``v`` from the first that many points of
the batch (the points are i.i.d., so a random subset): an unbiased estimate of the
mean of ``g_i * g_i`` that the moving average (``b2 = 0.99``) smooths further, at a
cost independent of the batch size. ``moment_points=None`` uses every point, as the
paper does. This is the same quantity as
``vmap(grad(per-point residual))`` and, unlike it, also works with the
estimators that differentiate in ``x`` with ``torch.autograd.grad`` (``exact``,
``sdgd``), which cannot run inside ``torch.func.grad``.

The optimizer needs the per-point residuals, not only the loss: it sets
``PDEAware.traits.needs_residuals``, and :class:`~sdze_lightning.PINNProblem`
then calls ``step(closure, request=...)`` with a
:class:`~sdze_lightning.methods.base.FirstOrderStep` whose ``residuals()`` returns the
interior residual vector ``(N,)`` and the weighted boundary term (or ``None``),
both differentiable in the parameters. Given ``points``, the default rule
(``first_moment="loss"``) never builds the whole batch's residual graph: the
closure has the loss gradient and the chunks have the moments.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sdze_lightning.checks import boolean, positive_int, positive_int_or_none
from sdze_lightning.methods.base import FirstOrderStep, MethodTraits

#: Values of ``first_moment``.
FIRST_MOMENTS: tuple[str, ...] = ("residual", "loss")

ResidualFn = Callable[..., tuple[Tensor, Tensor | None]]


def per_point_moments(
    residual: Tensor, params: Sequence[Tensor], chunk_size: int = 256
) -> tuple[list[Tensor], list[Tensor]]:
    """``mean_i g_i`` and ``mean_i g_i * g_i`` of the per-point gradients ``g_i = d r_i / d theta``.

    Args:
        residual: Residual vector ``(N,)`` with a graph to ``params``.
        params: Parameters.
        chunk_size: Points per vmapped VJP.

    """
    r = residual.reshape(-1)
    n = r.numel()
    sums = [torch.zeros_like(p) for p in params]
    sq_sums = [torch.zeros_like(p) for p in params]

    def vjp(cotangent: Tensor) -> tuple[Tensor, ...]:
        return torch.autograd.grad(
            r, params, cotangent, retain_graph=True, allow_unused=True, materialize_grads=True
        )

    batched = torch.func.vmap(vjp)
    for start in range(0, n, chunk_size):
        c = min(chunk_size, n - start)
        cot = torch.zeros(c, n, dtype=r.dtype, device=r.device)
        cot[torch.arange(c), start + torch.arange(c)] = 1
        for s, q, g in zip(sums, sq_sums, batched(cot), strict=True):
            g = g.detach()
            s.add_(g.sum(0))
            q.add_((g * g).sum(0))
    return [s / n for s in sums], [q / n for q in sq_sums]


class PDEAware(torch.optim.Optimizer):
    """PDE-aware optimizer (Churiwala et al. 2025; defaults differ from the paper).

    The defaults (``first_moment="loss"``, ``adam_floor=True``) are the ones
    that train on Allen-Cahn 1D and Poisson 2D; ``first_moment="residual",
    adam_floor=False`` is the paper's rule exactly, which does not descend on
    the first and explodes on the second (zero residual gradient of the output
    bias). See the module docstring.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate.
        betas: ``(b1, b2)`` of the moments.
        eps: Denominator term.
        first_moment: ``"loss"`` (authors' code: gradient of the total loss;
            default) or ``"residual"`` (paper: mean per-point residual gradient
            plus the boundary term's gradient).
        chunk_size: Points per vmapped VJP of the per-point gradients (and per
            recomputed residual chunk).
        moment_points: Points of the batch that estimate ``v`` (``None``: all).
        adam_floor: Denominator ``sqrt(max(v, s)) + eps`` with ``s`` the moving
            average of the squared first-moment input (Adam's second moment),
            instead of the paper's ``sqrt(v) + eps``.

    """

    #: The problem passes the residuals to :meth:`step`; a closure's non-finite loss
    #: applies nothing: ``divergence="skip"`` needs no copy of the parameters.
    traits: ClassVar[MethodTraits] = MethodTraits(needs_residuals=True,
                                                  withholds_nonfinite_step=True)

    @staticmethod
    def state_per_parameter(adam_floor: bool = True, **_: Any) -> int:
        """Parameter-sized state tensors (the memory pre-flight's count).

        ``exp_avg``, ``exp_avg_sq`` and, with ``adam_floor``, ``exp_avg_sq_first``.
        """
        return 3 if adam_floor else 2

    @staticmethod
    def step_temporary_numel(module: nn.Module, chunk_size: int = 8, **_: Any) -> int:
        """Numbers a step allocates (the memory pre-flight's count).

        The per-point gradients of one chunk (``chunk_size`` per parameter) and, in
        :func:`per_point_moments`, their square for the largest parameter; eight more per
        parameter: the chunk's two sums and their means, the running sum of squares and
        its mean, the update's denominator and step (fitted to measured peaks;
        measured: ``benchmarks/README.md``, ``preflight_accuracy.py``).
        """
        sizes = [p.numel() for p in module.parameters() if p.requires_grad]
        return (chunk_size + 8) * sum(sizes) + chunk_size * max(sizes, default=0)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.99, 0.99),
        eps: float = 1e-8,
        first_moment: str = "loss",
        chunk_size: int = 8,
        adam_floor: bool = True,
        moment_points: int | None = 128,
    ) -> None:
        if first_moment not in FIRST_MOMENTS:
            raise ValueError(
                f"method.first_moment must be one of {list(FIRST_MOMENTS)}, got {first_moment!r}."
            )
        if not lr >= 0 or not eps > 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Invalid lr={lr}, eps={eps} or betas={betas}.")
        positive_int("method.chunk_size", chunk_size)
        positive_int_or_none("method.moment_points", moment_points)
        boolean("method.adam_floor", adam_floor)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))
        self.first_moment = first_moment
        self.chunk_size = chunk_size
        self.adam_floor = adam_floor
        self.moment_points = moment_points

    @staticmethod
    def _takes_rows(residuals: ResidualFn) -> bool:
        try:
            return "rows" in inspect.signature(residuals).parameters
        except (TypeError, ValueError):
            return False

    def _chunked_squares(
        self, residuals: ResidualFn, params: Sequence[Tensor], n: int
    ) -> list[Tensor]:
        """``mean_i g_i * g_i`` with each chunk's residuals recomputed on its points alone."""
        n = n if self.moment_points is None else min(n, self.moment_points)
        sq_sums = [torch.zeros_like(p) for p in params]
        for start in range(0, n, self.chunk_size):
            rows = slice(start, min(start + self.chunk_size, n))
            r_chunk, _ = residuals(rows=rows)
            _, sq = per_point_moments(r_chunk, params, self.chunk_size)
            for total, part in zip(sq_sums, sq, strict=True):
                total.add_(part, alpha=r_chunk.numel())
        return [q / n for q in sq_sums]

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Tensor] | None = None,
        residuals: ResidualFn | None = None,
        points: int | None = None,
        *,
        request: FirstOrderStep | None = None,
    ) -> Tensor | None:
        """One update.

        A closure that returns a non-finite loss applies nothing: the parameters and the
        moments stay as they were and the residuals are not evaluated.

        Args:
            closure: Computes the total loss and back-propagates it (needed for
                ``first_moment="loss"``; otherwise only used for the returned loss).
            residuals: Returns the interior residual vector ``(N,)`` and the
                weighted boundary term (or ``None``), differentiable in the parameters.
            points: ``N``, if known: spares the whole-batch residual when only the
                chunks need it (``first_moment="loss"`` with a ``rows`` argument).
            request: The step as the problem hands it over (its ``closure``,
                ``residuals`` and ``points`` replace the arguments above).

        Returns:
            The closure's loss, if a closure was given.

        """
        if request is not None:
            closure, residuals, points = request.closure, request.residuals, request.points
        if residuals is None:
            raise ValueError(
                "pde_aware needs the per-point PDE residuals: train it through PINNProblem "
                "(which passes them in its request) or call step(closure, residuals=fn)."
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        elif self.first_moment == "loss":
            raise ValueError("first_moment='loss' needs a closure that back-propagates the loss.")
        if loss is not None and not bool(torch.isfinite(torch.as_tensor(loss)).all()):
            return loss
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        with torch.enable_grad():
            if points is not None and self.first_moment == "loss" and self._takes_rows(residuals):
                first = self._grads(params)
                mean_g2 = self._chunked_squares(residuals, params, points)
            else:
                first, mean_g2 = self._moments(residuals, params)
        self._update(params, first, mean_g2)
        return loss

    def _moments(
        self, residuals: ResidualFn, params: Sequence[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """First-moment input and ``mean_i g_i * g_i`` from the whole batch's residuals."""
        r, boundary = residuals()
        if self._takes_rows(residuals):
            mean_g2 = self._chunked_squares(residuals, params, r.numel())
            mean_g = torch.autograd.grad(
                r.mean(), params, allow_unused=True, materialize_grads=True
            ) if self.first_moment == "residual" else None
        else:
            mean_g, mean_g2 = per_point_moments(r, params, self.chunk_size)
        if self.first_moment == "residual":
            first = list(mean_g)
            if boundary is not None:
                gb = torch.autograd.grad(
                    boundary, params, allow_unused=True, materialize_grads=True
                )
                first = [a + b for a, b in zip(first, gb, strict=True)]
        else:
            first = self._grads(params)
        return first, list(mean_g2)

    @staticmethod
    def _grads(params: Sequence[Tensor]) -> list[Tensor]:
        """The closure's gradients (zero where a parameter got none)."""
        return [torch.zeros_like(p) if p.grad is None else p.grad for p in params]

    def _update(
        self, params: Sequence[Tensor], first: Sequence[Tensor], mean_g2: Sequence[Tensor]
    ) -> None:
        """Apply the rule given the first-moment input and ``mean_i g_i * g_i``."""
        pairs = zip(first, mean_g2, strict=True)
        moments = {id(p): fs for p, fs in zip(params, pairs, strict=True)}
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if id(p) not in moments:
                    continue
                f, s = moments[id(p)]
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                if self.adam_floor and "exp_avg_sq_first" not in st:
                    st["exp_avg_sq_first"] = torch.zeros_like(p)
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(b1).add_(f, alpha=1 - b1)
                v.mul_(b2).add_(s, alpha=1 - b2)
                if self.adam_floor:
                    floor = st["exp_avg_sq_first"]
                    floor.mul_(b2).addcmul_(f, f, value=1 - b2)
                    denom = torch.maximum(v, floor).sqrt_()
                else:
                    denom = v.sqrt()
                p.addcdiv_(m, denom.add_(group["eps"]), value=-group["lr"])
