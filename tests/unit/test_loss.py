"""Direct unit tests of :mod:`sdze_lightning.loss` (``PhysicsLoss``).

Every expected value is computed here from the problem's user contract (its network, the
PDE's source term and exact boundary values) with autograd, not through the estimator or
the loss module: ``loss = mean(r^2) + boundary_weight * mean(r_b^2)``, the unbiased form
``mean(r_1 r_2)``, and under data parallelism a rank's estimate
``world_size * sum(share) / n_total``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from sdze_lightning.distributed import Shard
from sdze_lightning.estimators import build_estimator
from sdze_lightning.loss import PhysicsLoss
from sdze_lightning.nn import MLP
from sdze_lightning.problems import Poisson2D
from sdze_lightning.seeding import Stream, mix

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: 1 thread is faster here

F64 = torch.float64
# float64 sums of a few dozen O(1) terms: agreement to ~1e-15 relative; 1e-12 leaves room
# for a different (but exact) order of operations in the library's Laplacian.
TOL = dict(rtol=1e-12, atol=1e-12)


def poisson(**kwargs) -> Poisson2D:
    kwargs.setdefault("n_interior", 8)
    kwargs.setdefault("n_boundary", 4)
    kwargs.setdefault("boundary_weight", 2.5)  # not 1: a dropped weight shows
    return Poisson2D(n_eval=16, net=MLP(2, width=8, depth=1, seed=0), seed=3, **kwargs).double()


def residual_by_hand(problem: Poisson2D, x: Tensor) -> Tensor:
    """``Delta u + sin(x1 + x2)`` with the Laplacian by nested autograd (exact)."""
    x = x.detach().clone().requires_grad_(True)
    u = problem(x)
    (grad,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    lap = sum(torch.autograd.grad(grad[:, i].sum(), x, create_graph=True)[0][:, i]
              for i in range(x.shape[1]))
    return (lap + torch.sin(x[:, 0] + x[:, 1])).detach()


def boundary_residual_by_hand(problem: Poisson2D, xb: Tensor) -> Tensor:
    with torch.no_grad():
        return problem(xb) - 0.5 * torch.sin(xb[:, 0] + xb[:, 1])


def test_the_collaborator_is_the_problems_and_shares_its_collocation():
    problem = poisson()
    assert isinstance(problem.physics_loss, PhysicsLoss)
    assert problem.physics_loss.collocation is problem.collocation
    assert problem.physics_loss.problem is problem


@pytest.mark.parametrize("step, key", [(0, 0), (5, 3)])
def test_terms_are_the_mean_squares_of_the_hand_computed_residuals(step, key):
    problem = poisson()
    terms = problem.physics_loss.terms(step, key)
    x = problem.collocation.points(step, key)
    xb = problem.collocation.boundary_points(step, key)
    interior = residual_by_hand(problem, x).square().mean()
    boundary = boundary_residual_by_hand(problem, xb).square().mean()
    assert set(terms) == {"interior", "boundary", "loss"}
    torch.testing.assert_close(terms["interior"].detach(), interior, **TOL)
    torch.testing.assert_close(terms["boundary"].detach(), boundary, **TOL)
    torch.testing.assert_close(terms["loss"].detach(), interior + 2.5 * boundary, **TOL)
    assert terms["loss"].requires_grad  # what a first-order method back-propagates


def test_without_boundary_points_the_loss_is_the_interior_term():
    problem = poisson(n_boundary=0)
    terms = problem.physics_loss.terms(1)
    assert set(terms) == {"interior", "loss"}
    expected = residual_by_hand(problem, problem.collocation.points(1, 0)).square().mean()
    torch.testing.assert_close(terms["loss"].detach(), expected, **TOL)


def test_interior_residuals_with_rows_are_those_points_residuals():
    problem = poisson()
    (full,) = problem.physics_loss.interior_residuals(2)
    (part,) = problem.physics_loss.interior_residuals(2, rows=slice(2, 6))
    by_hand = residual_by_hand(problem, problem.collocation.points(2, 0))
    torch.testing.assert_close(full.detach(), by_hand, **TOL)
    torch.testing.assert_close(part.detach(), by_hand[2:6], **TOL)


def unbiased_problem() -> Poisson2D:
    # Rademacher directions in 2D: v^T H v = H11 + H22 + 2 v1 v2 H12 is random, so the two
    # halves' residuals differ (a mean of squares would not equal a mean of products)
    est = build_estimator("taylor", num_directions=4, distribution="rademacher")
    return poisson(estimator=est, squared_residual="unbiased")


def halves_by_hand(problem: Poisson2D, step: int, key: int) -> tuple[Tensor, Tensor]:
    """The two halves' residuals: one generator of the ESTIMATOR stream, drawn in order."""
    x = problem.collocation.points(step, key)
    gen = torch.Generator().manual_seed(mix(Stream.ESTIMATOR, problem.seed, step, key))
    h1, h2 = problem.estimator_halves
    r1 = problem.residual(x, problem.derivatives(x, gen, h1))
    r2 = problem.residual(x, problem.derivatives(x, gen, h2))
    return r1.detach(), r2.detach()


def test_unbiased_interior_term_is_the_mean_product_of_the_two_halves():
    problem = unbiased_problem()
    r1, r2 = halves_by_hand(problem, 4, 1)
    assert not torch.allclose(r1, r2)  # the halves differ: the test tells r1 r2 from r1^2
    terms = problem.physics_loss.terms(4, 1)
    torch.testing.assert_close(terms["interior"].detach(), (r1 * r2).mean(), **TOL)
    got = problem.physics_loss.interior_residuals(4, 1)
    assert len(got) == 2
    torch.testing.assert_close(got[0].detach(), r1, **TOL)
    torch.testing.assert_close(got[1].detach(), r2, **TOL)


def test_residual_batch_averages_the_halves_and_weights_the_boundary():
    problem = unbiased_problem()
    r1, r2 = halves_by_hand(problem, 4, 1)
    assert not torch.allclose(r1, r2)  # (at key 0 the halves' directions happen to agree)
    r, boundary = problem.physics_loss.residual_batch(4, 1)
    torch.testing.assert_close(r.detach(), 0.5 * (r1 + r2), **TOL)
    xb = problem.collocation.boundary_points(4, 1)
    expected = 2.5 * boundary_residual_by_hand(problem, xb).square().mean()
    torch.testing.assert_close(boundary.detach(), expected, **TOL)


def test_residual_batch_with_rows_has_no_boundary_term():
    problem = poisson()
    r, boundary = problem.physics_loss.residual_batch(1, rows=slice(0, 3))
    assert boundary is None
    by_hand = residual_by_hand(problem, problem.collocation.points(1, 0))[0:3]
    torch.testing.assert_close(r.detach(), by_hand, **TOL)


def test_a_ranks_terms_estimate_the_global_means_from_its_share():
    """n_interior = 7, n_boundary = 5 on two ranks: shares of 4 + 3 and 3 + 2 rows. Each
    rank's term is 2 * sum(share^2) / n_total; their mean is the single-process term."""
    whole = poisson(n_interior=7, n_boundary=5)
    single = {k: v.detach() for k, v in whole.physics_loss.terms(3).items()}
    r = residual_by_hand(whole, whole.collocation.points(3, 0))
    rb = boundary_residual_by_hand(whole, whole.collocation.boundary_points(3, 0))
    ranks = []
    for rank, (rows, brows) in enumerate([(slice(0, 4), slice(0, 3)),
                                          (slice(4, 7), slice(3, 5))]):
        problem = poisson(n_interior=7, n_boundary=5)
        problem.collocation.shard = Shard(rank, 2)
        terms = {k: v.detach() for k, v in problem.physics_loss.terms(3).items()}
        torch.testing.assert_close(terms["interior"], 2 * r[rows].square().sum() / 7, **TOL)
        torch.testing.assert_close(terms["boundary"], 2 * rb[brows].square().sum() / 5, **TOL)
        ranks.append(terms)
    for name in ("interior", "boundary", "loss"):
        mean = 0.5 * (ranks[0][name] + ranks[1][name])
        torch.testing.assert_close(mean, single[name], **TOL)
