"""Direct unit tests of :mod:`sdze_lightning.collocation`.

The points of a step are a pure function of ``(seed, step, key, stream)``: the expected
points are drawn here with a fresh ``torch.Generator`` seeded from
:func:`~sdze_lightning.seeding.mix`, the way Poisson2D's samplers draw them (uniform in the
unit square; an edge parameter and an edge index on the boundary).
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from sdze_lightning.collocation import Collocation, StepLoader, seeded_generator, step_indices
from sdze_lightning.distributed import Shard
from sdze_lightning.nn import MLP
from sdze_lightning.problems import Poisson2D
from sdze_lightning.seeding import Stream, mix

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: 1 thread is faster here

F64 = torch.float64


def poisson(cls=Poisson2D, **kwargs) -> Poisson2D:
    kwargs.setdefault("n_interior", 8)
    kwargs.setdefault("seed", 7)
    return cls(n_boundary=4, n_eval=16, net=MLP(2, width=8, depth=1, seed=0), **kwargs).double()


def interior_by_hand(seed: int, step: int, key: int, n: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(mix(Stream.INTERIOR, seed, step, key))
    return torch.rand(n, 2, generator=gen, dtype=F64)


def boundary_by_hand(seed: int, step: int, key: int, n: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(mix(Stream.BOUNDARY, seed, step, key))
    s = torch.rand(n, generator=gen, dtype=F64)
    edge = torch.randint(0, 4, (n,), generator=gen)
    fixed = (edge % 2).to(F64)
    x1 = torch.where(edge < 2, fixed, s)
    x2 = torch.where(edge < 2, s, fixed)
    return torch.stack([x1, x2], dim=1)


def test_seeded_generator_is_seeded_from_the_stream_seed_and_parts():
    gen = seeded_generator(torch.device("cpu"), 7, 3, 1, stream=Stream.INTERIOR)
    assert gen.initial_seed() == mix(Stream.INTERIOR, 7, 3, 1)
    assert seeded_generator(torch.device("cpu"), 7, 3).initial_seed() == mix(Stream.USER, 7, 3)


def test_points_are_the_seeded_draw_of_their_step_and_key():
    problem = poisson()
    for step, key in [(0, 0), (0, 1), (9, 0)]:
        assert torch.equal(problem.collocation.points(step, key), interior_by_hand(7, step, key))
        assert torch.equal(problem.collocation.boundary_points(step, key),
                           boundary_by_hand(7, step, key))
    assert not torch.equal(interior_by_hand(7, 0, 0), interior_by_hand(7, 0, 1))


def test_the_same_seed_step_and_key_give_the_same_points_in_another_problem():
    a, b = poisson(), poisson()
    a.collocation.points(1, 0)  # a has drawn other points before: no state between draws
    assert torch.equal(a.collocation.points(5, 2), b.collocation.points(5, 2))
    assert torch.equal(a.collocation.sample_points(5, 2), b.collocation.points(5, 2))
    assert not torch.equal(poisson(seed=8).collocation.points(5, 2), b.collocation.points(5, 2))


def test_points_are_cached_within_a_step_and_dropped_for_another_step():
    col = poisson().collocation
    x0, x0_key1 = col.points(0, 0), col.points(0, 1)
    xb0 = col.boundary_points(0, 0)
    assert col.points(0, 0) is x0 and col.boundary_points(0, 0) is xb0  # cached
    assert col.sample_points(0, 0) is not x0  # drawn anew (same values)
    assert set(col.cache) == {(0, 0), (0, 1)} and set(col.boundary_cache) == {(0, 0)}
    x1 = col.points(1, 0)  # another step: the entries of step 0 go
    assert set(col.cache) == {(1, 0)} and col.points(1, 0) is x1
    assert col.points(0, 1) is not x0_key1  # redrawn
    assert torch.equal(col.points(0, 1), x0_key1)
    assert set(col.cache) == {(0, 1)}
    col.boundary_points(1, 0)
    assert set(col.boundary_cache) == {(1, 0)}


def test_end_step_drops_both_caches():
    col = poisson().collocation
    col.points(3, 0), col.boundary_points(3, 0)
    col.end_step()
    assert col.cache == {} and col.boundary_cache == {}


def test_isolated_restores_the_caches_as_the_block_found_them():
    col = poisson().collocation
    x, xb = col.points(2, 0), col.boundary_points(2, 0)
    with col.isolated():
        col.points(2, 5), col.boundary_points(2, 5)  # a probe of this step
        col.points(3, 0)  # a probe that even moves to another step
        assert (2, 0) not in col.cache
    assert col.cache == {(2, 0): x} and col.cache[(2, 0)] is x
    assert col.boundary_cache == {(2, 0): xb} and col.boundary_cache[(2, 0)] is xb
    with pytest.raises(RuntimeError), col.isolated():  # restored on an error too
        col.points(4, 0)
        raise RuntimeError
    assert set(col.cache) == {(2, 0)}


@pytest.mark.parametrize("n", [8, 7])
def test_a_shard_takes_its_contiguous_rows_of_the_whole_batch(n):
    """Shard(rank, 2) through Collocation: rows [0, ceil(n/2)) and [ceil(n/2), n) of the
    batch every rank draws, for interior and boundary points alike."""
    whole, whole_b = interior_by_hand(7, 4, 0, n), boundary_by_hand(7, 4, 0)
    cut = (n + 1) // 2
    for rank, rows, brows in [(0, slice(0, cut), slice(0, 2)), (1, slice(cut, n), slice(2, 4))]:
        col = poisson(n_interior=n).collocation
        col.shard = Shard(rank, 2)
        assert torch.equal(col.points(4, 0), whole[rows])
        assert torch.equal(col.sample_points(4, 0), whole[rows])
        assert torch.equal(col.boundary_points(4, 0), whole_b[brows])
        assert col.shard.full_batch(col.points(4, 0)) is not None  # a view of the batch


def test_an_empty_boundary_sample_is_refused():
    class NoBoundary(Poisson2D):
        def sample_boundary(self, n, generator):
            return torch.empty(0, 2, dtype=self.dtype)

    with pytest.raises(ValueError, match=r"NoBoundary.sample_boundary\(\) returned no points"):
        poisson(NoBoundary).collocation.boundary_points(0)


class Recording(Poisson2D):
    """Records each ``prepare_batch`` call as (number of points, rows)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.prepared: list[tuple[int, int | None]] = []

    def prepare_batch(self, x, rows=None):
        self.prepared.append((len(x), rows))


class RecordingOneArgument(Poisson2D):
    """An older ``prepare_batch`` override without ``rows``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.prepared: list[int] = []

    def prepare_batch(self, x):
        self.prepared.append(len(x))


@pytest.mark.parametrize("share, expected", [(1.0, [(8, 8)]), (0.5, [(8, 4)]), (0.0, [])])
def test_training_batch_prepares_the_placements_rows(share, expected):
    problem = poisson(Recording)
    col = problem.collocation
    assert col.prepare_takes_rows
    col.placement.auto, col.placement.share = False, share
    x, sample_s, prepare_s = col.training_batch(6)
    assert torch.equal(x, interior_by_hand(7, 6, 0))
    assert problem.prepared == expected
    assert sample_s >= 0 and prepare_s >= 0


@pytest.mark.parametrize("share, calls", [(1.0, [8]), (0.5, [8]), (0.4, [])])
def test_training_batch_prepares_a_one_argument_override_all_or_nothing(share, calls):
    problem = poisson(RecordingOneArgument)
    col = problem.collocation
    assert not col.prepare_takes_rows
    col.placement.auto, col.placement.share = False, share  # 0.4 * 8 rounds to 3 < 4
    col.training_batch(0)
    assert problem.prepared == calls


def test_begin_step_without_prefetch_changes_nothing():
    col = poisson().collocation
    x = col.points(1, 0)
    col.begin_step(2)
    assert col.cache == {(1, 0): x}


def test_begin_step_hands_over_the_prefetched_batch_and_prepares_it():
    problem = poisson(Recording, prefetch=True)
    col = problem.collocation
    col.placement.auto, col.placement.share = False, 0.0  # all rows on the main thread
    try:
        col.begin_step(3)
        assert set(col.cache) == {(3, 0)}
        assert torch.equal(col.cache[(3, 0)], interior_by_hand(7, 3, 0))
        assert col.points(3, 0) is col.cache[(3, 0)]
        assert problem.prepared == [(8, None)]  # share 0: all of it on the main thread
    finally:
        col.stop_prefetch()
    assert col.main_since is None


def test_prefetch_is_dropped_with_a_warning_only_for_a_method_without_crns():
    col = poisson(prefetch=True).collocation
    assert col.prefetching
    col.drop_prefetch_without_crns([types.SimpleNamespace(crns=True)])
    assert col.prefetching
    with pytest.warns(UserWarning, match="crns=false"):
        col.drop_prefetch_without_crns([types.SimpleNamespace(crns=True),
                                        types.SimpleNamespace(crns=False)])
    assert not col.prefetching and col.prefetcher is None
    plain = poisson().collocation
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.drop_prefetch_without_crns([types.SimpleNamespace(crns=False)])  # no warning


def test_the_problem_owns_one_collocation_and_delegates_to_it():
    problem = poisson()
    assert isinstance(problem.collocation, Collocation)
    x = problem.points(4, 1)
    assert problem.collocation.points(4, 1) is x
    assert problem.boundary_points(4, 1) is problem.collocation.boundary_points(4, 1)


def test_step_indices_serve_zero_to_n_in_order_whatever_the_seed():
    for seed in (0, 11):
        loader = step_indices(seed, 5)
        assert isinstance(loader, StepLoader)
        assert [int(i) for i in loader] == [0, 1, 2, 3, 4]
        assert len(loader) == 5
