"""Preparing the next step's collocation batch on a background thread.

At large input dimension a forward-only step spends much of its time on work
that does not depend on the network: drawing the ``N x d`` batch and computing
per-batch data such as an analytic source term (both ``O(N d)``). A
:class:`BatchPrefetcher` computes the batch of step ``k + 1`` on one background
thread while step ``k`` evaluates the network, so on a machine with a spare
core the two overlap. PyTorch operators release the GIL, so a thread is
enough; no process, no shared-memory copy.

The batch of a step is a pure function of the step (seeded generators), so
prefetching changes no number, only when it is computed. It costs one more
batch in memory while a step runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")


class BatchPrefetcher(Generic[T]):
    """Builds ``make(step + 1)`` on one background thread while step ``step`` runs.

    Args:
        make: Builds the batch of a step. It must depend on the step only (the
            same step gives the same batch on either thread); it runs under
            ``torch.no_grad()``.

    Example:
        >>> prefetcher = BatchPrefetcher(lambda step: torch.full((2,), float(step)))
        >>> prefetcher.get(0)  # built now; step 1 starts in the background
        tensor([0., 0.])
        >>> prefetcher.get(1)  # taken from the background thread
        tensor([1., 1.])
        >>> prefetcher.close()

    """

    def __init__(self, make: Callable[[int], T]) -> None:
        self._make = make
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[int, Future[T]] | None = None

    def _build(self, step: int) -> T:
        with torch.no_grad():
            return self._make(step)

    def get(self, step: int) -> T:
        """The batch of ``step``; starts building the batch of ``step + 1``.

        If the background thread is building ``step``, waits for it (an error
        raised there is raised here); otherwise (first step, a resume, a
        skipped step number) drops what it was building and builds ``step`` now.
        """
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == step:
            value = pending[1].result()
        else:
            _drop(pending)
            value = self._build(step)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="sdze-prefetch")
        self._pending = (step + 1, self._executor.submit(self._build, step + 1))
        return value

    @property
    def pending_step(self) -> int | None:
        """Step being built in the background, or ``None``."""
        return None if self._pending is None else self._pending[0]

    def close(self) -> None:
        """Drop the batch being built and stop the thread (it restarts on the next ``get``)."""
        pending, self._pending = self._pending, None
        _drop(pending)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy, pickling for spawned processes) starts without thread or batch.
        return {"_make": self._make, "_executor": None, "_pending": None}


def _drop(pending: tuple[int, Future] | None) -> None:
    """Cancel a pending build, or wait for it to finish and discard its result or error."""
    if pending is not None and not pending[1].cancel():
        with contextlib.suppress(Exception):
            pending[1].result()
