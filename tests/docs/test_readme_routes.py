"""The routes the README gives a user outside training: estimators on any function of the
points, ``problem.derivatives``, what ``stein`` and the ``biharmonic`` estimates refer to,
and the scalars of ``SDZE.probe``."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

from sdze_lightning.estimators import ESTIMATORS, build_estimator
from sdze_lightning.estimators.exact import ExactEstimator
from sdze_lightning.methods import SDZE
from sdze_lightning.model_fn import ModelFunction
from sdze_lightning.nn import MLP
from sdze_lightning.problems import Poisson2D

pytestmark = pytest.mark.usefixtures("one_thread")

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
#: Estimators with every coordinate (d = 2) or exact derivatives: the residual of the exact
#: solution is zero up to rounding (float64; fd: truncation h^2 ~ 1e-8 times u''''~1).
EXACT_HERE = {"exact": {}, "sdgd": {"num_directions": 2}, "taylor": {"num_directions": 2},
              "fd": {"num_directions": 2}}
RANDOMIZED = {"hte": {"num_directions": 4}, "stein": {"num_directions": 8}}


def _poisson() -> tuple[Poisson2D, torch.Tensor]:
    problem = Poisson2D(net=MLP(2, width=8, depth=2, seed=0).double(), n_eval=0).double()
    x = problem.sample_interior(16, torch.Generator().manual_seed(0))
    return problem, x


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_every_estimator_takes_a_plain_function_of_the_points(name):
    """The README's check of a new PDE: ``estimator.estimate(problem.exact_solution, ...)``."""
    assert set(EXACT_HERE) | set(RANDOMIZED) == set(ESTIMATORS)
    problem, x = _poisson()
    est = build_estimator(name, **{**EXACT_HERE, **RANDOMIZED}[name])
    ops = problem.operators
    got = est.estimate(problem.exact_solution, x, ops, torch.Generator().manual_seed(1), 2)
    wrapped = ModelFunction(problem.exact_solution)
    same = est.estimate(wrapped, x, ops, torch.Generator().manual_seed(1), 2)
    assert set(got) == set(ops) and all(torch.equal(got[k], same[k]) for k in ops)
    torch.testing.assert_close(got["u"], problem.exact_solution(x), rtol=0, atol=0)
    if name in EXACT_HERE:
        residual = problem.residual(x, problem.derivatives(x, torch.Generator(), est,
                                                           model=problem.exact_solution))
        assert float(residual.detach().abs().max()) < (1e-6 if name == "fd" else 1e-12)


def test_an_estimator_says_what_to_pass_instead_of_a_non_function():
    problem, x = _poisson()
    with pytest.raises(TypeError, match="exact_solution"):
        build_estimator("taylor").estimate(problem.exact_solution(x), x, ("u",),
                                           torch.Generator(), 2)


def test_problem_derivatives_is_the_accessor_of_the_network_or_of_another_function():
    problem, x = _poisson()
    gen = functools.partial(torch.Generator().manual_seed, 5)
    d = problem.derivatives(x, gen())
    torch.testing.assert_close(d.u, problem(x), rtol=0, atol=0)
    exact = problem.derivatives(x, gen(), ExactEstimator(), model=problem.exact_solution)
    # Delta (0.5 sin(x1 + x2)) = -sin(x1 + x2), to float64 rounding
    torch.testing.assert_close(exact.laplacian, -torch.sin(x[:, 0] + x[:, 1]),
                               rtol=1e-12, atol=1e-12)
    assert "problem.derivatives(x, generator, estimator=None, model=None)" in README


def _quartic(x: torch.Tensor) -> torch.Tensor:
    return (x**4).sum(dim=1)


def test_stein_laplacian_is_that_of_the_smoothed_function_and_u_the_plain_value():
    """For f = sum_i x_i^4, E f(x + sigma xi) = f + 6 sigma^2 |x|^2 + 3 d sigma^4, whose
    Laplacian is 12 |x|^2 + 12 d sigma^2; f's own is 12 |x|^2 (12 d sigma^2 = 6 less here).
    The mean of 32 independent estimates is within 5 of its standard errors (estimated from
    the same 32) of the smoothed value; the plain value is many standard errors away."""
    sigma, d = 0.5, 2
    x = torch.tensor([[0.3, -0.2], [0.1, 0.4]], dtype=torch.float64)
    est = build_estimator("stein", num_directions=256, sigma=sigma, variant="antithetic")
    runs = [est.estimate(_quartic, x, ("u", "laplacian"), torch.Generator().manual_seed(s), d)
            for s in range(32)]
    laps = torch.stack([r["laplacian"] for r in runs])
    mean, se = laps.mean(0), laps.std(0) / math.sqrt(len(runs))
    smoothed = 12 * (x**2).sum(1) + 12 * d * sigma**2
    plain = 12 * (x**2).sum(1)
    assert bool(((mean - smoothed).abs() < 5 * se).all()), (mean, smoothed, se)
    assert bool(((mean - plain).abs() > 10 * se).all()), (mean, plain, se)
    assert all(torch.equal(r["u"], _quartic(x)) for r in runs)  # value="plain": f(x) itself
    row = next(line for line in README.splitlines() if line.startswith("| `stein` |"))
    assert "smoothed" in row and "`d.u`" in row and "`d.laplacian`" in row


@pytest.mark.parametrize("name", ["taylor", "fd"])
def test_biharmonic_uses_gaussian_directions_whatever_the_distribution(name):
    """The biharmonic estimate is the same draw and value for every ``distribution`` (the
    README says so), and it is unbiased: the mean of 64 independent estimates is within 5
    of its standard errors (estimated from the same 64) of the exact autodiff value."""
    x = torch.tensor([[0.2, -0.1, 0.3]], dtype=torch.float64)
    model = ModelFunction(MLP(3, width=8, depth=2, seed=1).double())
    exact = ExactEstimator().estimate(model, x, ("biharmonic",), torch.Generator(), 3)
    values = []
    for seed in range(64):
        by_dist = [
            build_estimator(name, num_directions=4, distribution=dist).estimate(
                model, x, ("u", "biharmonic"), torch.Generator().manual_seed(seed), 3
            )["biharmonic"]
            for dist in ("coordinate", "rademacher", "gaussian")
        ]
        assert all(torch.equal(b, by_dist[0]) for b in by_dist), seed
        values.append(by_dist[0])
    values = torch.cat(values).detach()
    se = float(values.std()) / math.sqrt(len(values))
    assert abs(float(values.mean()) - float(exact["biharmonic"].detach())) < 5 * se
    assert "`biharmonic` always uses Gaussian" in " ".join(README.split())


def test_sdze_probe_keeps_its_two_point_scalars():
    """``last_probe_scalars`` holds c_j = (L(c + eps u_j) - L(c - eps u_j)) / (2 eps) of the
    last probe, from the loss values the closure returned, and each row of the probe's
    result is c_j times a direction (so c_j = 0 would make it zero)."""
    problem, _ = _poisson()
    opt = SDZE(problem.net, lr=1e-2, rank=2, eps=1e-5, seed=3)
    values: list[float] = []

    def loss_at(key):
        loss = problem.compute_loss(0, key)
        values.append(float(loss))
        return loss

    assert opt.last_probe_scalars is None
    est = opt.probe(loss_at, 3)
    scalars = opt.last_probe_scalars
    assert scalars.shape == (3,) and scalars.dtype == torch.float64
    expected = [(values[2 * j] - values[2 * j + 1]) / (2 * opt.eps) for j in range(3)]
    torch.testing.assert_close(scalars, torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=0)
    directions = est / scalars[:, None]
    # the directions are standard Gaussian in m coordinates: |u|^2 / m is about 1
    m = est.shape[1]
    assert all(0.2 < float(u.square().mean()) < 5 for u in directions), m
    assert "opt.last_probe_scalars" in README
