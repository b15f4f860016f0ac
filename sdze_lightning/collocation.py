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

The functions take the problem first: :class:`~sdze_lightning.problem.PINNProblem`
binds them as its methods (``problem.points(step, key)``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from sdze_lightning.prefetch import BatchPrefetcher, PreparePlacement
from sdze_lightning.seeding import Stream, mix

if TYPE_CHECKING:
    from sdze_lightning.problem import PINNProblem


class Collocation:
    """The collocation state of one problem (its ``collocation`` attribute).

    Args:
        problem: The problem whose batches are prefetched.
        prefetch: Build the next step's interior batch on a background thread.

    Attributes:
        cache: Interior points of the current step, by ``(step, key)``.
        boundary_cache: Boundary points of the current step, by ``(step, key)``.
        prefetcher: The background builder (``None`` without prefetching).
        placement: Which thread prepares prefetched batches (chosen from measured times).
        prepare_takes_rows: Whether ``prepare_batch`` takes ``rows`` (an older override
            may not).

    """

    def __init__(self, problem: PINNProblem, prefetch: bool) -> None:
        self.cache: dict[tuple[int, int], Tensor] = {}
        self.boundary_cache: dict[tuple[int, int], Tensor] = {}
        make = functools.partial(training_batch, problem)
        self.prefetcher = BatchPrefetcher(make) if prefetch else None
        self.placement = PreparePlacement()
        self.prepare_takes_rows = "rows" in inspect.signature(problem.prepare_batch).parameters
        self.main_since: float | None = None


def generator(problem: PINNProblem, *parts: int, stream: Stream = Stream.USER) -> torch.Generator:
    """A generator on the problem's device seeded from ``(stream, seed, *parts)``.

    The library's draws have their own streams (:mod:`sdze_lightning.seeding`).
    """
    gen = torch.Generator(device=problem.device)
    gen.manual_seed(mix(stream, problem.seed, *parts))
    return gen


def rand(problem: PINNProblem, *shape: int, generator: torch.Generator) -> Tensor:
    """Uniform ``[0, 1)`` samples on the problem's device and dtype."""
    return torch.rand(*shape, generator=generator, device=problem.device, dtype=problem.dtype)


def randn(problem: PINNProblem, *shape: int, generator: torch.Generator) -> Tensor:
    """Standard normal samples on the problem's device and dtype."""
    return torch.randn(*shape, generator=generator, device=problem.device, dtype=problem.dtype)


def prefetching(problem: PINNProblem) -> bool:
    """Whether training batches are prefetched (the problem's ``prefetch`` argument)."""
    return problem.collocation.prefetcher is not None


def points(problem: PINNProblem, step: int, key: int) -> Tensor:
    """Interior points of ``step`` for noise key ``key`` (cached within the step).

    Under data parallelism, this rank's share (``problem.shard``) of the batch:
    every rank samples the whole batch from the same seed and keeps its rows.
    """
    return _step_cached(problem.collocation, "cache", step, key,
                        lambda: sample_points(problem, step, key))


def _step_cached(state: Collocation, name: str, step: int, key: int,
                 draw: Callable[[], Tensor]) -> Tensor:
    """``state.<name>[(step, key)]``, drawn on first use; entries of other steps dropped."""
    cache: dict[tuple[int, int], Tensor] = getattr(state, name)
    cached = cache.get((step, key))
    if cached is None:
        cached = draw()
        setattr(state, name, {(step, key): cached} | {
            k: v for k, v in cache.items() if k[0] == step
        })
    return cached


def sample_points(problem: PINNProblem, step: int, key: int = 0) -> Tensor:
    """Interior points of ``step`` for noise key ``key``, drawn anew (not cached)."""
    gen = problem.generator(step, key, stream=Stream.INTERIOR)
    return problem.shard.take(problem.sample_interior(problem.n_interior, gen))


def boundary_points(problem: PINNProblem, step: int, key: int = 0) -> Tensor:
    """Boundary/initial points of ``step`` for noise key ``key`` (cached within the step).

    This rank's share under data parallelism, as :func:`points`.
    """
    return _step_cached(problem.collocation, "boundary_cache", step, key,
                        lambda: sample_boundary_points(problem, step, key))


def sample_boundary_points(problem: PINNProblem, step: int, key: int = 0) -> Tensor:
    """Boundary/initial points of ``step`` for noise key ``key``, drawn anew (not cached)."""
    gen = problem.generator(step, key, stream=Stream.BOUNDARY)
    xb = problem.sample_boundary(problem.n_boundary, gen)
    if xb.shape[0] == 0:
        raise ValueError(f"{type(problem).__name__}.sample_boundary() returned no points.")
    return problem.shard.take(xb)


@contextlib.contextmanager
def isolated_points(problem: PINNProblem) -> Iterator[None]:
    """Points cached inside the block (probes, measurements) are dropped at its end.

    The per-step caches of :func:`points` and :func:`boundary_points` are left as the
    block found them.
    """
    state = problem.collocation
    saved, saved_boundary = dict(state.cache), dict(state.boundary_cache)
    try:
        yield
    finally:
        state.cache, state.boundary_cache = saved, saved_boundary


def training_batch(problem: PINNProblem, step: int) -> tuple[Tensor, float, float]:
    """Interior points of training ``step`` (key 0) with the times of building them.

    Returns ``(x, sampling seconds, prepare seconds)``; on the prefetch thread the
    problem's ``prepare_batch`` gets the share of rows that the placement gives that
    thread (none: 0 s).
    """
    state = problem.collocation
    t0 = time.perf_counter()
    x = sample_points(problem, step, 0)
    t1 = time.perf_counter()
    rows = state.placement.rows_ahead(len(x))
    if state.prepare_takes_rows:
        if rows > 0:
            problem.prepare_batch(x, rows)
    elif 2 * rows >= len(x):  # an override of the one-argument hook: all or nothing
        problem.prepare_batch(x)
    return x, t1 - t0, time.perf_counter() - t1


def begin_step(problem: PINNProblem, step: int) -> None:
    """Make the interior batch of training ``step`` ready (``prefetch=True``).

    Takes it from the prefetch thread (waiting if it is not done), prepares
    the rows the prefetch thread left (:class:`~sdze_lightning.prefetch.PreparePlacement`
    splits them between the threads) and starts the batch of ``step + 1``;
    without prefetching, does nothing (the batch is drawn when the loss first
    asks for it).
    """
    state = problem.collocation
    if state.prefetcher is None:
        return
    now = time.perf_counter()
    main_s = None if state.main_since is None else now - state.main_since
    x, sample_s, ahead_s = state.prefetcher.get(step)
    t0 = time.perf_counter()
    problem.prepare_batch(x)
    state.placement.record(sample_s, ahead_s + time.perf_counter() - t0, main_s)
    state.cache = {(step, 0): x}
    state.main_since = time.perf_counter()


def end_step(problem: PINNProblem) -> None:
    """Drop the points of the step."""
    problem.collocation.cache = {}
    problem.collocation.boundary_cache = {}


def stop_prefetch(problem: PINNProblem) -> None:
    """Stop the prefetch thread and drop the batch it was building."""
    state = problem.collocation
    state.main_since = None
    if state.prefetcher is not None:
        state.prefetcher.close()


def drop_prefetch_without_crns(problem: PINNProblem, zeroth_order: Iterable[Any]) -> None:
    """Turn prefetching off (warned) if a zeroth-order method draws points per evaluation.

    A method with ``crns=False`` never uses the shared key-0 batch that is prefetched.
    """
    state = problem.collocation
    if state.prefetcher is not None and any(not o.crns for o in zeroth_order):
        warnings.warn(
            "prefetch=true has no effect with method.crns=false (each evaluation draws "
            "its own points); prefetching is turned off.",
            stacklevel=3,
        )
        state.prefetcher = None


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


def step_indices(problem: PINNProblem, n: int) -> StepLoader:
    """``n`` step indices: the Trainer's batches (the points are sampled in the step)."""
    # An own generator: a loader's iterator draws its base seed from it, not globally.
    gen = torch.Generator().manual_seed(problem.seed)
    return StepLoader(range(n), batch_size=None, generator=gen)


def train_dataloader(problem: PINNProblem) -> StepLoader:
    """The step indices of an epoch (``steps_per_epoch``); resumable mid-epoch."""
    return step_indices(problem, problem.steps_per_epoch)


def val_dataloader(problem: PINNProblem) -> StepLoader:
    """One index: validation evaluates the held-out set."""
    return step_indices(problem, 1)
