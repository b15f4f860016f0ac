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

from sdze_lightning.collocation import seeded_generator
from sdze_lightning.metrics import RelativeL2Error
from sdze_lightning.seeding import Stream

if TYPE_CHECKING:
    from sdze_lightning.contract import ProblemContract

#: Input numbers per held-out chunk at most (1 GiB in float32).
EVAL_CHUNK_ELEMENTS = 1 << 28
#: Points per held-out chunk at most: up to d = 524,288 a chunk is 512 points.
EVAL_MAX_CHUNK = 512


class HeldOutSet:
    """The held-out points of a problem and its error on them (its ``held_out`` attribute).

    Draws the points with the problem's ``sample_interior`` and their reference values
    with its ``exact_solution``, and evaluates the problem (its network with the
    constraint) on them.

    Args:
        problem: The problem.

    """

    def __init__(self, problem: ProblemContract) -> None:
        self.problem = problem

    def chunk_rows(self) -> int:
        """Held-out points per chunk: :data:`EVAL_CHUNK_ELEMENTS` input numbers at most."""
        return max(1, min(EVAL_MAX_CHUNK, EVAL_CHUNK_ELEMENTS // self.problem.input_dim))

    def batches(self, chunk: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Held-out points and reference values in chunks of ``chunk`` points.

        Each chunk is drawn when it is asked for: drop the previous one before asking
        for the next to hold one chunk at a time. ``chunk`` defaults to
        :meth:`chunk_rows` (the points depend on it). Nothing is yielded without a
        reference solution.
        """
        problem = self.problem
        gen = seeded_generator(problem.device, problem.seed, 0, 0, stream=Stream.EVAL)
        rows = chunk or self.chunk_rows()
        for start in range(0, problem.n_eval, rows):
            x = problem.sample_interior(min(rows, problem.n_eval - start), gen)
            ref = problem.exact_solution(x)
            if ref is None:
                return
            yield x, ref.to(problem.dtype)
            del x, ref

    @torch.no_grad()
    def update(self, metric: RelativeL2Error) -> bool:
        """Stream the held-out set into ``metric``, one chunk in memory.

        The chunks are the problem's ``eval_batches()`` (:meth:`batches` unless a
        subclass overrides it). Returns ``False`` when there is no reference solution.
        """
        found = False
        for x, ref in self.problem.eval_batches():
            metric.update(self.problem(x), ref)
            found = True
            del x, ref  # before the next chunk is drawn
        return found

    def relative_l2_error(self) -> float | None:
        """Relative L2 error on the held-out points, or ``None`` without a reference."""
        metric = RelativeL2Error().to(self.problem.device)
        return float(metric.compute()) if self.update(metric) else None
