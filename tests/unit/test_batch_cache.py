"""``sdze_lightning.problems.batch_cache.BatchCache``: per-batch caching of point-only terms.

On a toy subclass (blocks of 3 rows, a source that counts the rows it is computed on):
values equal the uncached ones to the bit; an entry is reused only for the same,
unmodified tensor; ``prepare_batch(x, rows)`` computes whole blocks ahead and the rest is
completed later without recomputing them; names are cached apart; entries of freed batches
are dropped. A shipped problem pickles once its cache holds a batch (the cache is left
out and recomputed).
"""

from __future__ import annotations

import copy
import pickle
import weakref

import pytest
import torch
from torch import Tensor

from sdze_lightning.problems import HardCube
from sdze_lightning.problems.batch_cache import BatchCache, _Entry

BLOCK = 3


class Toy(BatchCache):
    """Blocks of ``BLOCK`` rows; the source ``sum(x^2)`` per row; every computed row counted."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def _blocks(self, x: Tensor) -> tuple[Tensor, ...]:
        return x.split(BLOCK)

    def _block_source(self, xb: Tensor) -> Tensor:
        self.rows.append(len(xb))
        return xb.square().sum(dim=1)

    def source(self, x: Tensor) -> Tensor:
        return x.square().sum(dim=1)


def points(n: int = 10, seed: int = 0) -> Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_the_source_is_computed_once_per_batch():
    toy, x = Toy(), points()
    first = toy._source_of(x)
    assert torch.equal(first, toy.source(x))
    assert toy.rows == [3, 3, 3, 1]
    assert toy._source_of(x) is first
    assert toy.rows == [3, 3, 3, 1]  # served from the cache


def test_another_tensor_with_the_same_values_is_another_batch():
    toy, x = Toy(), points()
    first = toy._source_of(x)
    again = toy._source_of(x.clone())
    assert torch.equal(again, first) and again is not first
    assert sum(toy.rows) == 2 * len(x)


def test_a_batch_modified_in_place_is_computed_again():
    toy, x = Toy(), points()
    stale = toy._source_of(x).clone()
    x.mul_(2)
    fresh = toy._source_of(x)
    assert torch.equal(fresh, toy.source(x))
    assert torch.allclose(fresh, 4 * stale)
    assert sum(toy.rows) == 2 * len(x)


@pytest.mark.parametrize("rows,ahead", [(0, []), (1, []), (2, [3]), (7, [3, 3]),
                                        (10, [3, 3, 3]), (50, [3, 3, 3, 1])])
def test_prepare_batch_computes_whole_blocks_ahead(rows, ahead):
    """``rows`` is rounded to whole blocks (``round(rows / 3)``: 10 rows -> 3 blocks, 9 rows);
    the rest comes later."""
    toy, x = Toy(), points()
    toy.prepare_batch(x, rows=rows)
    assert toy.rows == ahead
    full = toy._source_of(x)
    assert toy.rows == [3, 3, 3, 1]  # each block once, in order
    assert torch.equal(full, toy.source(x))  # the same numbers however the rows were split


def test_prepare_batch_in_two_shares_then_all():
    toy, x = Toy(), points()
    toy.prepare_batch(x, rows=3)
    toy.prepare_batch(x, rows=3)  # nothing new: that share is there
    toy.prepare_batch(x, rows=6)
    assert toy.rows == [3, 3]
    toy.prepare_batch(x)  # the rest
    assert toy.rows == [3, 3, 3, 1]
    assert torch.equal(toy._source_of(x), toy.source(x))
    assert toy.rows == [3, 3, 3, 1]


def test_names_are_cached_apart():
    toy, x = Toy(), points()
    cubes: list[int] = []

    def cube(xb: Tensor) -> Tensor:
        cubes.append(len(xb))
        return xb.pow(3).sum(dim=1)

    target = toy._cached(x, "target", cube)
    assert torch.equal(target, x.pow(3).sum(dim=1))
    assert torch.equal(toy._source_of(x), toy.source(x))
    assert toy._cached(x, "target", cube) is target
    assert cubes == [3, 3, 3, 1] and toy.rows == [3, 3, 3, 1]


def test_entries_of_freed_batches_are_dropped():
    toy = Toy()
    kept = points(seed=1)
    toy._source_of(kept)
    for seed in range(2, 6):
        toy._source_of(points(seed=seed))  # freed right after the call (reference count)
    cache = toy.__dict__["_batch_cache"]
    # Each miss drops the dead entries first: the kept batch and the last one remain.
    assert len(cache) == 2
    assert (id(kept), "source") in cache


def test_a_dead_entry_under_a_reused_id_is_not_served():
    """An ``id`` of a freed batch can come back for a new one: the weak reference decides."""
    toy, x = Toy(), points()
    ghost = torch.zeros(1)
    dead = weakref.ref(ghost)
    del ghost
    assert dead() is None
    stale = torch.full((len(x),), -1.0, dtype=torch.float64)
    toy.__dict__["_batch_cache"] = {(id(x), "source"): _Entry(dead, x._version, full=stale)}
    assert torch.equal(toy._source_of(x), toy.source(x))


def test_the_hooks_are_for_the_subclass():
    bare = BatchCache()
    with pytest.raises(NotImplementedError):
        bare._source_of(points())


def test_a_copy_keeps_working_on_its_own():
    toy, x = Toy(), points()
    toy._source_of(x)
    twin = copy.deepcopy(toy)
    assert torch.equal(twin._source_of(x), toy.source(x))
    x.add_(1)
    assert torch.equal(twin._source_of(x), toy.source(x))


def test_a_problem_is_picklable_before_it_caches_a_batch():
    problem = HardCube(dim=3, n_eval=0, n_interior=4, n_boundary=4)
    assert isinstance(pickle.loads(pickle.dumps(problem)), HardCube)


def test_a_problem_stays_picklable_after_it_cached_a_batch():
    problem = HardCube(dim=3, n_eval=0, n_interior=4, n_boundary=4)
    x = problem.sample_interior(4, torch.Generator().manual_seed(0))
    source = problem._source_of(x)
    restored = pickle.loads(pickle.dumps(problem))
    assert "_batch_cache" in problem.__dict__  # the original keeps its cache
    assert "_batch_cache" not in restored.__dict__
    assert torch.equal(restored._source_of(x), source)  # recomputed, same numbers
