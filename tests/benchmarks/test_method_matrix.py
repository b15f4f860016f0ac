"""Every method x estimator pair of the configs trains (or refuses clearly), methods by name,
and pde_aware's per-point gradients cost ``N x chunk`` rows, not ``N^2``."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import load_benchmark

from sdze_lightning.methods import SDZE, PDEAware
from sdze_lightning.methods.registry import method_names
from sdze_lightning.nn import MLP
from sdze_lightning.problems import Poisson2D

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_pair_of_the_configs_runs_or_refuses_at_a_small_size():
    bench = load_benchmark("method_matrix")
    pairs = [(m, e) for m in bench.names("method") for e in bench.names("estimator")]
    assert ("sdze", "stein_he") in pairs and len(pairs) >= 4 * 6
    for method, estimator in pairs:
        row = bench.measure(method, estimator, 2, True)
        assert row["status"] in ("runs", "refuses"), row
        if row["status"] == "runs":
            assert row["s_per_step"] > 0 and row["adam_exact_s_per_step"] > 0
        else:
            assert row["why"], row


def test_shipped_stein_default_is_cheap_and_the_paper_setting_is_a_preset():
    from sdze_lightning.cli import compose_config
    from sdze_lightning.estimators.stein import SteinEstimator

    assert SteinEstimator().num_directions == 16
    assert compose_config(["estimator=stein"], "unused").estimator.num_directions == 16
    assert compose_config(["estimator=stein_he"], "unused").estimator.num_directions == 1024


def test_method_by_name_uses_the_packaged_config():
    assert {"adam", "sdze", "mezo", "pde_aware"} <= set(method_names())
    problem = Poisson2D(method="sdze", seed=7, net=MLP(2, width=8, depth=1))
    opt = problem.configure_optimizers()
    assert isinstance(opt, SDZE) and opt.seed == 7 and opt.defaults["lr"] == 1e-2
    with pytest.raises(ValueError, match="Unknown method 'nope'"):
        Poisson2D(method="nope")


def test_pde_aware_backpropagates_each_chunk_through_its_own_points():
    """The per-point VJPs run on residuals recomputed per chunk (cost N x chunk, not N^2):
    the whole-batch graph (N rows per VJP) is used once, for the loss only."""
    problem = Poisson2D(net=MLP(2, width=8, depth=2, seed=0), n_interior=40, n_boundary=4,
                        estimator="exact")
    seen: list[slice | None] = []

    def residuals(rows: slice | None = None):
        seen.append(rows)
        return problem.residual_batch(0, rows=rows)

    opt = PDEAware(problem.net.parameters(), first_moment="residual", chunk_size=16,
                   moment_points=None)
    opt.step(residuals=residuals)
    assert seen == [None, slice(0, 16), slice(16, 32), slice(32, 40)]
    seen.clear()
    PDEAware(problem.net.parameters(), first_moment="residual", chunk_size=16,
             moment_points=20).step(residuals=residuals)
    assert seen == [None, slice(0, 16), slice(16, 20)]


def test_pde_aware_chunked_moments_equal_the_whole_batch_ones():
    problem = Poisson2D(net=MLP(2, width=8, depth=2, seed=0), n_interior=24, n_boundary=4,
                        estimator="exact")
    problem.double()
    fn = functools.partial(problem.residual_batch, 0)
    states = []
    for residuals in (fn, lambda: fn()):  # with rows: chunked; without: whole batch
        net = MLP(2, width=8, depth=2, seed=0).double()
        problem.net = net
        opt = PDEAware(net.parameters(), first_moment="residual", chunk_size=5,
                       moment_points=None)
        opt.step(residuals=residuals)
        states.append([opt.state[p]["exp_avg_sq"].clone() for p in net.parameters()])
    for a, b in zip(*states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
