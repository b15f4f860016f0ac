"""Start the network's output at the constant that minimises the problem's own loss.

A PINN's solution can sit far from zero (the two-body Allen-Cahn solution sums ``d - 1``
terms with standard normal coefficients, so its offset grows like ``sqrt(d)`` and varies
with the draw; measured: ``benchmarks/README.md``, ``scale_first.py``) while an
initialised network outputs about 0, and reaching that scale with Adam steps of ``lr``
on the small layers takes thousands of steps. :class:`OutputOffsetFit` therefore
solves, before the first step, the one-dimensional problem ``min_c loss(c)``: the
problem's own training loss (its residual, estimator, boundary terms and weights, on the
first step's points) when the network outputs the constant ``c`` everywhere, and then
shifts the output layer's bias so that the network's mean output on those points
is ``c``. Only the user contract is used (no exact solution), so it works for any
subclass whose network is the library's :class:`~sdze_lightning.nn.MLP`; the
hard constraint still multiplies the network (a constant network output ``c`` is
the solution ``c * g(x)``).

The search: the loss at ``c = 0`` and at ``+-1e-3 * 4^k`` (``k = 0 ... 15``, up to
about ``1e6``), then a golden-section search between the neighbours of the best
of them. Non-finite losses count as ``+inf``. With a forward-mode estimator the
evaluations share the first layer's product ``W x`` (the input layer, nearly all
of the work at large ``d``, runs once): the whole fit costs about one training
step plus one pass through the small layers per loss evaluation (60: the grid's 33
and the golden section's 27).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from sdze_lightning.distributed import all_reduce_mean
from sdze_lightning.nn.protocol import FIRST_LAYER_MEMBERS, missing_members

if TYPE_CHECKING:
    from sdze_lightning.contract import ProblemContract

#: The choices of the ``output_fit`` option.
MODES = ("constant", "none")

#: The grid of the search: 0 and +-GRID_START * GRID_FACTOR^k, k < GRID_STEPS.
GRID_START, GRID_FACTOR, GRID_STEPS = 1e-3, 4.0, 16
#: Golden-section iterations: the bracket (two grid cells) shrinks 0.618^25 ~ 6e-6-fold.
GOLDEN_STEPS = 25


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`MODES`.

    Raises:
        ValueError: Naming the choices.

    """
    if mode not in MODES:
        raise ValueError(f"output_fit must be one of {list(MODES)}, got {mode!r}.")
    return mode


def minimise_scalar(loss: Callable[[float], float]) -> float:
    """A minimiser of ``loss`` over the reals: best grid point, refined by golden section.

    The grid is 0 and ``+-GRID_START * GRID_FACTOR^k``; the refinement searches between
    the best grid point's neighbours (a local minimum there when ``loss`` is unimodal
    between them). Kept here rather than taken from SciPy: SciPy is not a dependency and
    the search is a dozen lines.
    """
    grid = sorted([0.0] + [s * GRID_START * GRID_FACTOR**k
                           for k in range(GRID_STEPS) for s in (1.0, -1.0)])
    values = [_finite_or_inf(loss(c)) for c in grid]
    best = min(range(len(grid)), key=values.__getitem__)
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    found, found_value = grid[best], values[best]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _finite_or_inf(loss(a)), _finite_or_inf(loss(b))
    for _ in range(GOLDEN_STEPS):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = _finite_or_inf(loss(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _finite_or_inf(loss(b))
    for c, value in ((a, fa), (b, fb)):
        if value < found_value:
            found, found_value = c, value
    return found


def _finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf


@contextlib.contextmanager
def constant_output(layer: nn.Linear) -> Iterator[Callable[[float], None]]:
    """Make ``layer`` (the output layer) output a settable constant; restore it after.

    Yields a function ``set(c)``: the layer's weight is zero and its bias ``c`` inside.
    """
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.weight.data.zero_()

    def set_constant(c: float) -> None:
        layer.bias.data.fill_(c)

    try:
        yield set_constant
    finally:
        layer.weight.data.copy_(weight)
        layer.bias.data.copy_(bias)


class OutputOffsetFit:
    """Fit the network's output offset to the problem's loss once, before the first step.

    Args:
        mode: ``"constant"`` (fit) or ``"none"`` (keep the initialisation).

    Attributes:
        mode: The mode.
        done: Whether the offset needs no fit (fitted, or the weights came from a
            checkpoint).
        constant: The constant found (``None`` before a fit or without one).

    """

    def __init__(self, mode: str = "constant") -> None:
        self.mode = check_mode(mode)
        self.done = mode == "none"
        self.constant: float | None = None

    def skip(self) -> None:
        """Never fit (the weights are trained ones, e.g. loaded from a checkpoint)."""
        self.done = True

    def apply(self, problem: ProblemContract, step: int = 0) -> float | None:
        """Fit the constant on ``step``'s points and shift the output bias to it.

        Under data parallelism each loss and the mean output are averaged over the ranks
        (one all-reduce of one number each): every rank takes the same decisions and
        the same shift, that of one process on the whole batch up to rounding.

        Returns:
            The constant, or ``None`` when nothing was fitted (mode ``"none"``, done
            already, or a network other than the library's MLP, with a warning).

        """
        if self.done:
            return None
        self.done = True
        net = problem.net
        missing = missing_members(net)
        if missing or net.output_layer.out_features != 1:
            lacks = f"lacks {', '.join(missing)}" if missing else "has more than one output"
            rank_zero_warn(
                f"output_fit={self.mode} needs a network with {', '.join(FIRST_LAYER_MEMBERS)} "
                f"and one output (the library's MLP); {type(net).__name__} {lacks}: its "
                "output offset is not fitted."
            )
            return None
        layer = net.output_layer

        def over_ranks(value: Tensor) -> float:
            """This rank's estimate of a batch mean, averaged over the ranks."""
            value = value.detach().reshape(1)
            return float(all_reduce_mean(value) if shard.active else value)

        collocation = problem.collocation
        shard = collocation.shard
        with torch.no_grad(), net.first_layer_cache():
            x = collocation.points(step, 0)
            with constant_output(layer) as set_constant:

                def loss(c: float) -> float:
                    set_constant(c)
                    return over_ranks(problem.physics_loss.terms(step)["loss"])

                constant = minimise_scalar(loss)
            mean = over_ranks(shard.mean(net(x).reshape(-1), problem.n_interior))
            layer.bias.add_(constant - mean)
        # the first step draws its batch afresh: under the Trainer's precision, and through
        # the prefetch thread where there is one (the same points either way)
        collocation.end_step()
        self.constant = constant
        return constant
