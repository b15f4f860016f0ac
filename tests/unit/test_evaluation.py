"""Direct unit tests of :mod:`sdze_lightning.evaluation` (``HeldOutSet``).

The held-out points are drawn here from a fresh generator seeded with
``mix(Stream.EVAL, seed, 0, 0)``, one ``sample_interior`` call per chunk in order (the
docstring: the points depend on the chunk size), and the error is summed here in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from sdze_lightning import evaluation
from sdze_lightning.evaluation import HeldOutSet
from sdze_lightning.metrics import RelativeL2Error
from sdze_lightning.nn import MLP
from sdze_lightning.problems import Poisson2D
from sdze_lightning.seeding import Stream, mix

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: 1 thread is faster here

F64 = torch.float64


def poisson(cls=Poisson2D, n_eval: int = 16, seed: int = 2) -> Poisson2D:
    return cls(n_interior=8, n_boundary=4, n_eval=n_eval, seed=seed,
               net=MLP(2, width=8, depth=1, seed=0)).double()


def held_out_by_hand(seed: int, sizes: list[int]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(mix(Stream.EVAL, seed, 0, 0))
    return [torch.rand(n, 2, generator=gen, dtype=F64) for n in sizes]


def exact(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.sin(x[:, 0] + x[:, 1])


def test_chunk_rows_is_the_element_budget_over_the_input_width(monkeypatch):
    held = poisson().held_out
    assert held.chunk_rows() == evaluation.EVAL_MAX_CHUNK == 512  # 2 inputs: the cap
    monkeypatch.setattr(evaluation, "EVAL_CHUNK_ELEMENTS", 9)
    assert held.chunk_rows() == 4  # floor(9 / 2)
    monkeypatch.setattr(evaluation, "EVAL_CHUNK_ELEMENTS", 1)
    assert held.chunk_rows() == 1  # at least one point


@pytest.mark.parametrize("chunk, sizes", [
    (None, [16]),  # the default chunk (512) holds all 16 points
    (5, [5, 5, 5, 1]),
    (16, [16]),
    (1, [1] * 16),
])
def test_batches_are_successive_draws_of_chunk_points_with_exact_values(chunk, sizes):
    problem = poisson()
    got = list(problem.held_out.batches(chunk))
    expected = held_out_by_hand(2, sizes)
    assert [len(x) for x, _ in got] == sizes
    for (x, ref), want in zip(got, expected, strict=True):
        assert torch.equal(x, want)
        assert torch.equal(ref, exact(want)) and ref.dtype == F64


def test_the_held_out_set_is_the_same_at_every_evaluation_and_depends_on_the_seed():
    problem = poisson()
    first = torch.cat([x for x, _ in problem.held_out.batches(5)])
    problem.collocation.points(3, 0)  # training draws in between change nothing
    problem.held_out.relative_l2_error()
    again = torch.cat([x for x, _ in problem.held_out.batches(5)])
    assert torch.equal(first, again)
    other = torch.cat([x for x, _ in poisson(seed=3).held_out.batches(5)])
    assert not torch.equal(first, other)


def test_relative_l2_error_is_the_hand_computed_norm_ratio():
    problem = poisson()
    (x,) = held_out_by_hand(2, [16])
    with torch.no_grad():
        u = problem.net(x).reshape(-1)  # no constraint: u is the network's output
    ref = exact(x)
    expected = math.sqrt(float((u - ref).square().sum()) / float(ref.square().sum()))
    value = problem.held_out.relative_l2_error()
    # float64 sums of 16 terms: ~1e-16 relative; 1e-12 leaves room for the summation order
    assert value == pytest.approx(expected, rel=1e-12)
    assert value > 1e-3  # an untrained network: far from the solution, the test can fail
    assert problem.relative_l2_error() == value


def test_update_streams_every_chunk_into_the_metric(monkeypatch):
    monkeypatch.setattr(evaluation, "EVAL_CHUNK_ELEMENTS", 10)  # chunks of 5: 5, 5, 5, 1
    problem = poisson()
    metric = RelativeL2Error()
    metric.update(torch.ones(2, dtype=F64), torch.zeros(2, dtype=F64))  # earlier sums stay
    assert problem.held_out.update(metric) is True
    x = torch.cat(held_out_by_hand(2, [5, 5, 5, 1]))
    with torch.no_grad():
        u = problem.net(x).reshape(-1)
    ref = exact(x)
    torch.testing.assert_close(metric.err_sq, 2 + (u - ref).square().sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(metric.ref_sq, ref.square().sum(), rtol=1e-12, atol=0)


class NoReference(Poisson2D):
    def exact_solution(self, x):
        return None


def test_without_a_reference_nothing_is_yielded_and_the_error_is_none():
    problem = poisson(NoReference)
    assert list(problem.held_out.batches()) == []
    metric = RelativeL2Error()
    assert problem.held_out.update(metric) is False
    assert float(metric.ref_sq) == 0.0
    assert problem.held_out.relative_l2_error() is None


class OwnHeldOut(Poisson2D):
    """A problem with its own held-out set (a data file, say): three fixed points."""

    points = torch.tensor([[0.1, 0.2], [0.5, 0.5], [0.9, 0.3]], dtype=F64)

    def eval_batches(self, chunk=None):
        yield self.points, torch.tensor([1.0, -2.0, 0.5], dtype=F64)


def test_update_uses_the_problems_eval_batches_override():
    problem = poisson(OwnHeldOut)
    ref = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    with torch.no_grad():
        u = problem.net(OwnHeldOut.points).reshape(-1)
    expected = math.sqrt(float((u - ref).square().sum()) / float(ref.square().sum()))
    assert problem.held_out.relative_l2_error() == pytest.approx(expected, rel=1e-12)


def test_the_problem_owns_one_held_out_set():
    problem = poisson()
    assert isinstance(problem.held_out, HeldOutSet) and problem.held_out.problem is problem
    assert problem.eval_chunk_rows() == problem.held_out.chunk_rows()
