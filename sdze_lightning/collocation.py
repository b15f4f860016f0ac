"""Collocation points: sampling, the per-step cache and the prefetch hand-over.

The points of a step are a pure function of ``(seed, step, key, stream)``
(:mod:`sdze_lightning.seeding`): every evaluation of a step with the same noise key
sees the same points, and under data parallelism every rank draws the whole batch
and keeps its share (:class:`~sdze_lightning.distributed.Shard`). Within a step the
interior and boundary points are cached per key (:attr:`Collocation.cache`,
:attr:`Collocation.boundary_cache`): the paired evaluations of a zeroth-order step
draw them once, and a problem can cache what depends on them by tensor; with ``prefetch`` the
batch of the next step is built on a background thread (:mod:`sdze_lightning.prefetch`)
and handed over when the step begins.

:class:`Collocation` is the problem's collaborator for all of this (its
``collocation`` attribute); the problem's ``points``, ``begin_step``, ... delegate to it.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from sdze_lightning.distributed import Shard
from sdze_lightning.prefetch import BatchPrefetcher, PreparePlacement
from sdze_lightning.seeding import Stream, mix

if TYPE_CHECKING:
    from sdze_lightning.contract import ProblemContract


def seeded_generator(device: torch.device, seed: int, *parts: int,
                     stream: Stream = Stream.USER) -> torch.Generator:
    """A generator on ``device`` seeded from ``(stream, seed, *parts)``.

    The library's draws have their own streams (:mod:`sdze_lightning.seeding`).
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(mix(stream, seed, *parts))
    return gen


class Collocation:
    """The collocation points of one problem (its ``collocation`` attribute) and their state.

    Draws the points of a step through the problem's user contract
    (``sample_interior``, ``sample_boundary``, ``prepare_batch``), keeps them for the
    step, and hands over prefetched batches.

    Args:
        problem: The problem whose points these are.
        prefetch: Build the next step's interior batch on a background thread.

    Attributes:
        shard: This rank's share of each batch (the whole batch unless data-parallel).
        cache: Interior points of the current step, by ``(step, key)``.
        boundary_cache: Boundary points of the current step, by ``(step, key)``.
        prefetcher: The background builder (``None`` without prefetching).
        placement: Which thread prepares prefetched batches (chosen from measured times).
        prepare_takes_rows: Whether ``prepare_batch`` takes ``rows`` (an older override
            may not).

    """

    def __init__(self, problem: ProblemContract, prefetch: bool) -> None:
        self.problem = problem
        self.shard = Shard()
        self.cache: dict[tuple[int, int], Tensor] = {}
        self.boundary_cache: dict[tuple[int, int], Tensor] = {}
        self.prefetcher = BatchPrefetcher(self.training_batch) if prefetch else None
        self.placement = PreparePlacement()
        self.prepare_takes_rows = "rows" in inspect.signature(problem.prepare_batch).parameters
        self.main_since: float | None = None

    @property
    def prefetching(self) -> bool:
        """Whether training batches are prefetched (the problem's ``prefetch`` argument)."""
        return self.prefetcher is not None

    def generator(self, step: int, key: int, stream: Stream) -> torch.Generator:
        """The generator of ``stream`` for ``(step, key)`` on the problem's device."""
        return seeded_generator(self.problem.device, self.problem.seed, step, key, stream=stream)

    def points(self, step: int, key: int) -> Tensor:
        """Interior points of ``step`` for noise key ``key`` (cached within the step).

        Under data parallelism, this rank's share (:attr:`shard`) of the batch: every
        rank samples the whole batch from the same seed and keeps its rows.
        """
        return self._step_cached("cache", step, key, lambda: self.sample_points(step, key))

    def _step_cached(self, name: str, step: int, key: int, draw: Callable[[], Tensor]) -> Tensor:
        """``self.<name>[(step, key)]``, drawn on first use; entries of other steps dropped."""
        cache: dict[tuple[int, int], Tensor] = getattr(self, name)
        cached = cache.get((step, key))
        if cached is None:
            cached = draw()
            setattr(self, name, {(step, key): cached} | {
                k: v for k, v in cache.items() if k[0] == step
            })
        return cached

    def sample_points(self, step: int, key: int = 0) -> Tensor:
        """Interior points of ``step`` for noise key ``key``, drawn anew (not cached)."""
        problem = self.problem
        gen = self.generator(step, key, Stream.INTERIOR)
        return self.shard.take(problem.sample_interior(problem.n_interior, gen))

    def boundary_points(self, step: int, key: int = 0) -> Tensor:
        """Boundary/initial points of ``step`` for noise key ``key`` (cached within the step).

        This rank's share under data parallelism, as :meth:`points`.
        """
        return self._step_cached("boundary_cache", step, key,
                                 lambda: self.sample_boundary_points(step, key))

    def sample_boundary_points(self, step: int, key: int = 0) -> Tensor:
        """Boundary/initial points of ``step`` for noise key ``key``, drawn anew (not cached)."""
        problem = self.problem
        gen = self.generator(step, key, Stream.BOUNDARY)
        xb = problem.sample_boundary(problem.n_boundary, gen)
        if xb.shape[0] == 0:
            raise ValueError(f"{type(problem).__name__}.sample_boundary() returned no points.")
        return self.shard.take(xb)

    @contextlib.contextmanager
    def isolated(self) -> Iterator[None]:
        """Points cached inside the block (probes, measurements) are dropped at its end.

        The per-step caches of :meth:`points` and :meth:`boundary_points` are left as the
        block found them.
        """
        saved, saved_boundary = dict(self.cache), dict(self.boundary_cache)
        try:
            yield
        finally:
            self.cache, self.boundary_cache = saved, saved_boundary

    def training_batch(self, step: int) -> tuple[Tensor, float, float]:
        """Interior points of training ``step`` (key 0) with the times of building them.

        Returns ``(x, sampling seconds, prepare seconds)``; on the prefetch thread the
        problem's ``prepare_batch`` gets the share of rows that the placement gives that
        thread (none: 0 s).
        """
        t0 = time.perf_counter()
        x = self.sample_points(step, 0)
        t1 = time.perf_counter()
        rows = self.placement.rows_ahead(len(x))
        if self.prepare_takes_rows:
            if rows > 0:
                self.problem.prepare_batch(x, rows)
        elif 2 * rows >= len(x):  # an override of the one-argument hook: all or nothing
            self.problem.prepare_batch(x)
        return x, t1 - t0, time.perf_counter() - t1

    def begin_step(self, step: int) -> None:
        """Make the interior batch of training ``step`` ready (``prefetch=True``).

        Takes it from the prefetch thread (waiting if it is not done), prepares
        the rows the prefetch thread left (:class:`~sdze_lightning.prefetch.PreparePlacement`
        splits them between the threads) and starts the batch of ``step + 1``;
        without prefetching, does nothing (the batch is drawn when the loss first
        asks for it).
        """
        if self.prefetcher is None:
            return
        now = time.perf_counter()
        main_s = None if self.main_since is None else now - self.main_since
        x, sample_s, ahead_s = self.prefetcher.get(step)
        t0 = time.perf_counter()
        self.problem.prepare_batch(x)
        self.placement.record(sample_s, ahead_s + time.perf_counter() - t0, main_s)
        self.cache = {(step, 0): x}
        self.main_since = time.perf_counter()

    def end_step(self) -> None:
        """Drop the points of the step."""
        self.cache = {}
        self.boundary_cache = {}

    def stop_prefetch(self) -> None:
        """Stop the prefetch thread and drop the batch it was building."""
        self.main_since = None
        if self.prefetcher is not None:
            self.prefetcher.close()

    def drop_prefetch_without_crns(self, zeroth_order: Iterable[Any]) -> None:
        """Turn prefetching off (warned) if a zeroth-order method draws points per evaluation.

        A method with ``crns=False`` never uses the shared key-0 batch that is prefetched.
        """
        if self.prefetcher is not None and any(not o.crns for o in zeroth_order):
            warnings.warn(
                "prefetch=true has no effect with method.crns=false (each evaluation draws "
                "its own points); prefetching is turned off.",
                stacklevel=3,
            )
            self.prefetcher = None


class StepLoader(DataLoader[int]):
    """A loader of step indices that a resumed ``fit`` continues where its checkpoint stopped.

    Lightning saves :meth:`state_dict` with the fit loop's state (the indices served in the
    current epoch) and passes it to :meth:`load_state_dict` before a resumed run's first
    ``iter()``: that pass skips the indices already served, so the epoch (and validation
    once an epoch) ends where an uninterrupted run ends it; later passes start at 0. The
    arguments are :class:`~torch.utils.data.DataLoader`'s, passed through (Lightning
    rebuilds the loader with a ``DistributedSampler`` under DDP).

    Args:
        dataset: The step indices, ``range(n)``.
        **kwargs: Further :class:`~torch.utils.data.DataLoader` arguments.

    """

    # Not a stock DataLoader: it has no state_dict, so Lightning warns on a mid-epoch resume.

    def __init__(self, dataset: Sequence[int], **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)  # type: ignore[arg-type]
        self._served = 0  # indices of the current pass handed out (skipped ones included)
        self._skip = 0  # indices the next pass skips (a resumed epoch's served ones)

    def __iter__(self) -> Iterator[int]:  # type: ignore[override]
        """The indices of one pass (an epoch), after those a loaded state had served."""
        skip, self._skip = self._skip, 0
        self._served = skip
        return self._counted(itertools.islice(super().__iter__(), skip, None))

    def _counted(self, indices: Iterator[int]) -> Iterator[int]:
        for index in indices:
            self._served += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        """``{"served": indices of the current pass handed out so far}``."""
        return {"served": self._served}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Make the next pass continue after ``state_dict["served"]`` indices.

        A pass that was complete (or longer than this loader) starts the next epoch at 0.
        """
        served = int(state_dict["served"])
        self._skip = served if 0 <= served < len(self) else 0


def step_indices(seed: int, n: int) -> StepLoader:
    """``n`` step indices: the Trainer's batches (the points are sampled in the step)."""
    # An own generator: a loader's iterator draws its base seed from it, not globally.
    gen = torch.Generator().manual_seed(seed)
    return StepLoader(range(n), batch_size=None, generator=gen)
