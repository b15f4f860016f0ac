"""The fused method's input-layer rate follows the points' norm (``input_lr: null``).

The factored step moves each entry of the input weight by about the learning rate, so a
fixed rate moves the pre-activations of points on the cube ``[-1, 1]^d`` by about
``lr sqrt(d / 3)``; divided by the points' RMS norm the move is the same at every ``d``.
"""

from __future__ import annotations

import pytest
import torch

from sdze_lightning.methods import FusedAdafactor
from sdze_lightning.methods.fused_adafactor import input_rate_scale
from sdze_lightning.nn import MLP

pytestmark = pytest.mark.usefixtures("one_thread")

DIMS = (100, 1_000, 10_000)


def preactivation_move(dim: int, input_lr: float | None) -> float:
    """RMS change of ``W x`` on fresh cube points after one fused step (float64)."""
    gen = torch.Generator().manual_seed(dim)
    net = MLP(dim, width=32, depth=2, seed=1).double()
    x = 2 * torch.rand(16, dim, generator=gen, dtype=torch.float64) - 1
    fresh = 2 * torch.rand(64, dim, generator=gen, dtype=torch.float64) - 1
    before = net.layers[0].weight.detach().clone()
    opt = FusedAdafactor(net, lr=1e-3, input_lr=input_lr)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (net(x)[:, 0] - 1.0).square().mean()
        loss.backward()
        return loss

    opt.step(closure)
    move = fresh @ (net.layers[0].weight.detach() - before).T
    return float(move.square().mean().sqrt())


def test_the_input_step_on_the_preactivations_does_not_grow_with_d():
    automatic = [preactivation_move(d, None) for d in DIMS]
    fixed = [preactivation_move(d, 1e-3) for d in DIMS]
    # A fixed rate's move grows like sqrt(d): 10x from d = 100 to 1e4. The rule's stays
    # within the spread of one random draw per d (a factor 2 allows for it; measured 1.1x).
    assert max(fixed) / min(fixed) > 5
    assert max(automatic) / min(automatic) < 2
    # and at d = 100 the rule's move is the fixed rate's divided by |x| = sqrt(100 / 3)
    assert automatic[0] == pytest.approx(fixed[0] / (100 / 3) ** 0.5, rel=0.2)


def test_points_inside_the_unit_ball_keep_the_rate():
    assert input_rate_scale(None) == 1.0
    assert input_rate_scale(0.999) == 1.0
    assert input_rate_scale(4.0) == 0.25
