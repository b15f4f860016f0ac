"""Preparing the next step's collocation batch on a background thread.

At large input dimension a forward-only step spends much of its time on work
that does not depend on the network: drawing the ``N x d`` batch and computing
per-batch data such as an analytic source term (both ``O(N d)``). A
:class:`BatchPrefetcher` computes the batch of step ``k + 1`` on one background
thread while step ``k`` evaluates the network, so on a machine with a spare
core the two overlap. PyTorch operators release the GIL, so a thread is
enough; no process, no shared-memory copy.

The batch of a step is a pure function of the step (seeded generators), so
prefetching changes no number, only when it is computed. Autocast is
thread-local: the background thread builds under the autocast state the main
thread had when it asked for the batch (``trainer.precision=bf16-mixed``
computes the same products in bfloat16 on either thread). It costs one more
batch in memory while a step runs. Per-batch data (the source term) is
split between the two threads so that they finish together
(:class:`PreparePlacement`): at moderate ``d`` the prefetch thread has time to
spare for all of it, at large ``d`` sampling alone keeps it about as busy as
the main thread and the main thread takes most rows.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")

log = logging.getLogger(__name__)
#: An autocast state: ``(device type, dtype)`` of every device type with autocast on.
AutocastState = tuple[tuple[str, torch.dtype], ...]


def autocast_state() -> AutocastState:
    """This thread's autocast state (autocast is thread-local)."""
    types = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    return tuple(
        (t, torch.get_autocast_dtype(t)) for t in types if torch.is_autocast_enabled(t)
    )


def autocast_as(state: AutocastState) -> contextlib.ExitStack:
    """Enter ``state`` (from :func:`autocast_state`) on this thread."""
    stack = contextlib.ExitStack()
    for device_type, dtype in state:
        stack.enter_context(torch.autocast(device_type, dtype=dtype))
    return stack


class BatchPrefetcher(Generic[T]):
    """Builds ``make(step + 1)`` on one background thread while step ``step`` runs.

    Args:
        make: Builds the batch of a step. It must depend on the step only (the
            same step gives the same batch on either thread); it runs under
            ``torch.no_grad()`` and, on the background thread, under the autocast
            state of the :meth:`get` call that started it.

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

    def _build(self, step: int, autocast: AutocastState = ()) -> T:
        with torch.no_grad(), autocast_as(autocast):
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
        future = self._executor.submit(self._build, step + 1, autocast_state())
        self._pending = (step + 1, future)
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


class PreparePlacement:
    """Splits the preparation of a prefetched batch (e.g. its source term) between threads.

    From smoothed per-step times of sampling a batch ``S``, preparing all of it
    ``P`` and the main thread's own work ``M`` (everything of a step but waiting
    for and preparing its batch): if the prefetch thread prepares a share ``s``
    of the batch's rows and the main thread the rest, a step takes about
    ``max(S + s P, M + (1 - s) P)``. :attr:`share` is the ``s`` in ``[0, 1]``
    that balances the two, ``(M + P - S) / (2 P)`` clipped: the step is never
    longer than with either whole-batch choice (``s = 1``: ``max(S + P, M)``;
    ``s = 0``: ``max(S, M + P)``). Either way the numbers are the same; only
    which core does the work changes. The model assumes the two parts can run
    at once: a fused kernel (:mod:`sdze_lightning.kernels`) runs on one thread
    at a time, so where both threads reach their share together one waits
    (the main thread prepares its share right after the hand-over, while the
    prefetch thread is still sampling the next batch, so this is rare).

    Args:
        smoothing: Weight of a new measurement in the running averages.

    Attributes:
        share: Fraction of the rows prepared on the prefetch thread (all at first).
        auto: Update :attr:`share` from the measurements (``False`` pins it).

    """

    def __init__(self, smoothing: float = 0.3) -> None:
        self.smoothing = smoothing
        self.share = 1.0
        self.auto = True
        self.times: dict[str, float] = {}

    def record(self, sample_s: float, prepare_s: float, main_s: float | None) -> None:
        """Add one step's times (``main_s`` is ``None`` when unknown, e.g. the first step).

        ``prepare_s`` is the time of preparing the whole batch, both threads' parts.
        """
        for key, value in (("sample", sample_s), ("prepare", prepare_s), ("main", main_s)):
            if value is None:
                continue
            old = self.times.get(key)
            self.times[key] = value if old is None else old + self.smoothing * (value - old)
        if self.auto and len(self.times) == 3:
            s, p, m = self.times["sample"], self.times["prepare"], self.times["main"]
            self.share = 1.0 if p <= 0 else min(1.0, max(0.0, (m + p - s) / (2 * p)))

    def rows_ahead(self, n: int) -> int:
        """Rows of an ``n``-row batch to prepare on the prefetch thread."""
        return round(self.share * n)


def _drop(pending: tuple[int, Future] | None) -> None:
    """Cancel a pending build, or wait for it to finish and discard its result.

    An error raised by the discarded build is logged (as a warning, with its
    traceback), not raised: nobody asked for that batch, and a step that does
    ask for it builds it again and gets the error then.
    """
    if pending is None or pending[1].cancel():
        return
    error = pending[1].exception()
    if error is not None:
        log.warning("Building the prefetched batch of step %d failed (the batch was not used): "
                    "%s: %s", pending[0], type(error).__name__, error, exc_info=error)
