"""Given the batch size, pde_aware's default rule never builds the whole batch's residuals."""

from __future__ import annotations

import pytest
import torch

from sdze_lightning.methods import PDEAware
from sdze_lightning.nn import MLP
from sdze_lightning.problems import Poisson2D

pytestmark = pytest.mark.usefixtures("one_thread")


def _state(points: int | None) -> tuple[list[slice | None], list[torch.Tensor]]:
    problem = Poisson2D(net=MLP(2, width=8, depth=2, seed=0), n_interior=40, n_boundary=4,
                        estimator="stein")
    problem.double()
    seen: list[slice | None] = []

    def residuals(rows: slice | None = None):
        seen.append(rows)
        return problem.residual_batch(0, rows=rows)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = problem.compute_loss(0)
        loss.backward()
        return loss

    opt = PDEAware(problem.net.parameters(), chunk_size=8, moment_points=20)
    opt.step(closure, residuals=residuals, points=points)
    return seen, [p.detach().clone() for p in problem.net.parameters()]


def test_points_spare_the_whole_batch_residual_and_change_nothing():
    seen, with_points = _state(40)
    assert seen == [slice(0, 8), slice(8, 16), slice(16, 20)]
    seen, without = _state(None)
    assert seen[0] is None and seen[1:] == [slice(0, 8), slice(8, 16), slice(16, 20)]
    for a, b in zip(with_points, without, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_problem_step_hands_pde_aware_the_batch_size():
    """Through run_step, the default rule builds residual graphs on the chunks only."""
    problem = Poisson2D(net=MLP(2, width=8, depth=2, seed=0), n_interior=24, n_boundary=4,
                        estimator="stein", method="pde_aware")
    seen: list[slice | None] = []
    batch = problem.physics_loss.residual_batch

    def recording(step: int, key: int = 0, rows: slice | None = None):
        seen.append(rows)
        return batch(step, key, rows)

    problem.physics_loss.residual_batch = recording
    opt = problem.configure_optimizers()
    problem.run_step(opt, 0)
    assert seen and None not in seen
    assert sum(r.stop - r.start for r in seen) == 24  # every point (moment_points 128 > 24)
