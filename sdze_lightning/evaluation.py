"""Evaluation: the relative L2 error on a held-out set, streamed chunk by chunk.

The held-out points are drawn from a fixed seed (:attr:`~sdze_lightning.seeding.Stream.EVAL`),
so every evaluation of a run, and of a resumed run, uses the same points. They are
drawn, evaluated and dropped one chunk at a time: ``n_eval`` costs time, not memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sdze_lightning.metrics import RelativeL2Error
from sdze_lightning.seeding import Stream

if TYPE_CHECKING:
    from sdze_lightning.problem import PINNProblem

#: Input numbers per held-out chunk at most (1 GiB in float32).
EVAL_CHUNK_ELEMENTS = 1 << 28
#: Points per held-out chunk at most: up to d = 524,288 a chunk is 512 points.
EVAL_MAX_CHUNK = 512


def eval_chunk_rows(problem: PINNProblem) -> int:
    """Held-out points per chunk: :data:`EVAL_CHUNK_ELEMENTS` input numbers at most."""
    return max(1, min(EVAL_MAX_CHUNK, EVAL_CHUNK_ELEMENTS // problem.input_dim))


def eval_batches(problem: PINNProblem, chunk: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Held-out points and reference values of ``problem`` in chunks of ``chunk`` points.

    Each chunk is drawn when it is asked for: drop the previous one before asking
    for the next to hold one chunk at a time. ``chunk`` defaults to
    ``problem.eval_chunk_rows()`` (the points depend on it). Nothing is yielded without
    a reference solution.
    """
    gen = problem.generator(0, 0, stream=Stream.EVAL)
    rows = chunk or problem.eval_chunk_rows()
    for start in range(0, problem.n_eval, rows):
        x = problem.sample_interior(min(rows, problem.n_eval - start), gen)
        ref = problem.exact_solution(x)
        if ref is None:
            return
        yield x, ref.to(problem.dtype)
        del x, ref


@torch.no_grad()
def update_error(problem: PINNProblem, metric: RelativeL2Error) -> bool:
    """Stream the held-out set (``problem.eval_batches()``) into ``metric``, one chunk in memory.

    Returns ``False`` when the problem has no reference solution.
    """
    found = False
    for x, ref in problem.eval_batches():
        metric.update(problem(x), ref)
        found = True
        del x, ref  # before the next chunk is drawn
    return found


def relative_l2_error(problem: PINNProblem) -> float | None:
    """Relative L2 error of ``problem`` on its held-out points, or ``None`` without a reference."""
    metric = RelativeL2Error().to(problem.device)
    return float(metric.compute()) if update_error(problem, metric) else None


def validation_step(problem: PINNProblem, batch: object, batch_idx: int) -> None:
    """Log ``val/rel_l2`` on the held-out points (torchmetrics, DDP-safe)."""
    if update_error(problem, problem.rel_l2):
        problem.log("val/rel_l2", problem.rel_l2, prog_bar=True)
