"""The fused method's lag bound: a row whose gradient jumps gets a step of the exact order.

The one-pass update of ``FusedAdafactor`` uses the previous step's row statistic. A row
whose gradient was small and then jumps has a lagged statistic far below the current one,
and an unbounded update thousands of times the exact-rows one. ``lag_bound`` floors the
lagged statistic by the part of the current one known when a block is applied; these
tests check the bound the module docs derive, and that it changes nothing where it does
not bind.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from conftest import fused_steps

from sdze_lightning.estimators.taylor import TaylorEstimator
from sdze_lightning.methods import FusedAdafactor
from sdze_lightning.methods.fused_adafactor import LAG_BOUND
from sdze_lightning.nn import MLP
from sdze_lightning.problems import TwoBody

pytestmark = pytest.mark.usefixtures("one_thread")

# The issue's toy: a 128 x 2000 input layer, b2 = 0.999; row 0's gradient is 1e4 times
# smaller than the others for STEPS - 1 steps, then as large as theirs.
ROWS, COLS, POINTS, STEPS, JUMP, B2 = 128, 2000, 8, 50, 1e4, 0.999


def quiet_row_then_jump(block_bytes: int | None = None):
    """Net and optimizer after ``STEPS - 1`` steps, the last step's closure factors.

    The loss is ``sum(first_layer(z) * delta)``: the input weight's gradient is
    ``delta^T z`` whatever the weights are, so every variant of the last step below sees
    the same gradient from the same optimizer state.
    """
    net = MLP(COLS, width=ROWS, depth=1, seed=0).double()
    opt = optimizer(net, block_bytes)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(POINTS, COLS, generator=gen, dtype=torch.float64)
    for t in range(1, STEPS + 1):
        delta = torch.randn(POINTS, ROWS, generator=gen, dtype=torch.float64)
        delta[:, 0] /= JUMP if t < STEPS else 1.0
        if t < STEPS:
            take_step(net, opt, z, delta)
    return net, opt, z, delta


def optimizer(net, block_bytes: int | None) -> FusedAdafactor:
    kwargs = {} if block_bytes is None else {"block_bytes": block_bytes}
    # input_lr pinned: the update in units of the rate (not scaled by the points' norm)
    return FusedAdafactor(net, lr=1.0, input_lr=1.0, betas=(0.9, B2), **kwargs)


def take_step(net, opt, z, delta) -> None:
    def closure():
        loss = (net.first_layer(z) * delta).sum()
        loss.backward()
        return loss

    opt.step(closure)


def last_update(state, **settings) -> torch.Tensor:
    """The input weight's last update ``U`` (``W <- W - lr U``, ``lr = 1``) under
    ``settings`` (attributes of the optimizer), on a copy of ``state``."""
    net, opt, z, delta = state
    saved = copy.deepcopy(opt.state_dict())  # torch would share the step counter
    net = copy.deepcopy(net)
    opt = optimizer(net, opt.block_bytes)
    opt.load_state_dict(saved)  # the statistics and step count, bit for bit
    for name, value in settings.items():
        setattr(opt, name, value)
    weight = net.layers[0].weight
    with torch.no_grad():
        weight.zero_()  # the update is then -W, with no cancellation against the weights
    take_step(net, opt, z, delta)
    return -weight.detach()


def rms(u: torch.Tensor) -> float:
    return float(u.pow(2).mean().sqrt())


#: The derived factor: |U| <= sqrt(lag_bound q (1 + b2) / b2) |U_exact|, q = 1 in one block.
ONE_BLOCK_FACTOR = math.sqrt(LAG_BOUND * (1 + B2) / B2)


def test_a_jumping_row_gets_a_step_of_the_exact_order():
    state = quiet_row_then_jump()  # 2000 x 128 float64 = 2 MB: one block of the default 4 MiB
    bounded = last_update(state)
    exact = last_update(state, exact_rows=True)
    free = last_update(state, lag_bound=None)
    # Without the bound: the step, ~1e4 against ~7 with the current statistic.
    assert rms(exact[0]) == pytest.approx(7.0, rel=0.1)
    assert rms(free[0]) > 1000 * rms(exact[0])
    # With it: within the derived factor of the exact update, entry by entry (one block:
    # q = 1; the factor ~5.7 is far from tight here, so float64 rounding cannot matter).
    assert bool((bounded[0].abs() <= ONE_BLOCK_FACTOR * exact[0].abs()).all())
    assert rms(bounded[0]) <= ONE_BLOCK_FACTOR * rms(exact[0])
    # Only the jumping row is bound: every other row's step is bit for bit the unbounded one.
    assert not torch.equal(bounded[0], free[0])
    assert torch.equal(bounded[1:], free[1:])


def test_with_many_blocks_the_bound_holds_entry_by_entry():
    """Blocks of 100 columns: block ``B`` knows the row sums up to ``B`` only, and the
    bound is ``sqrt(lag_bound q (1 + b2) / b2)`` times the exact update with ``q`` the
    row's whole mass over its mass up to ``B`` (module docs)."""
    block = 100
    state = quiet_row_then_jump(block_bytes=8 * ROWS * block)
    bounded = last_update(state)
    exact = last_update(state, exact_rows=True)
    free = last_update(state, lag_bound=None)
    _, _, z, delta = state
    g2 = (delta.T @ z) ** 2
    seen = g2.reshape(ROWS, COLS // block, block).sum(dim=2).cumsum(dim=1)  # up to block B
    q = (seen[:, -1:] / seen).repeat_interleave(block, dim=1)
    factor = (LAG_BOUND * q * (1 + B2) / B2).sqrt()
    # The derivation is exact arithmetic with slack (mean(r) grows by more than its
    # (1 - w_t) floor here); 1e-9 relative covers float64 rounding of both updates.
    assert bool((bounded.abs() <= factor * exact.abs() * (1 + 1e-9)).all())
    assert rms(free[0]) > 1000 * rms(exact[0])  # the bound is what holds the jump
    assert torch.equal(bounded[1:], free[1:])


def twobody(**method) -> TwoBody:
    dim, width = 24, 16
    return TwoBody(dim=dim, operator="allen_cahn", net=MLP(dim, width=width, depth=2, seed=1),
                   estimator=TaylorEstimator(4), n_eval=32, n_interior=8,
                   method=functools.partial(FusedAdafactor, lr=1e-2, **method)).double()


@pytest.mark.parametrize("block_bytes", [8 * 16 * 5, 2**26])  # 5-column blocks, one block
def test_an_ordinary_run_is_bit_for_bit_the_unbounded_one(block_bytes):
    """The dense-reference problem of test_fused_adafactor: no row's statistic grows
    16-fold in a step, so the bound never binds and costs no rounding either."""
    runs = []
    for lag_bound in (LAG_BOUND, None):
        problem = twobody(block_bytes=block_bytes, lag_bound=lag_bound)
        opt = fused_steps(problem, 8)
        assert opt.lag_bound == lag_bound
        runs.append((problem, opt))
    (bound, opt_bound), (free, opt_free) = runs
    for a, b in zip(bound.net.parameters(), free.net.parameters(), strict=True):
        assert torch.equal(a, b)
    weight_bound, weight_free = bound.net.layers[0].weight, free.net.layers[0].weight
    for key in ("row_sq", "col_sq"):
        assert torch.equal(opt_bound.state[weight_bound][key], opt_free.state[weight_free][key])


@pytest.mark.parametrize("lag_bound", [0.5, 0, -1.0, float("nan"), True, "16"])
def test_a_lag_bound_below_one_is_refused(lag_bound):
    with pytest.raises(ValueError, match="lag_bound"):
        FusedAdafactor(MLP(4, width=8, depth=1), lag_bound=lag_bound)


@pytest.mark.parametrize("lag_bound", [1, 1.0, float("inf"), None])
def test_a_lag_bound_of_one_or_more_or_none_is_taken(lag_bound):
    opt = FusedAdafactor(MLP(4, width=8, depth=1), lag_bound=lag_bound)
    assert opt.lag_bound == (None if lag_bound is None else float(lag_bound))


def test_method_lag_bound_reaches_the_optimizer(tmp_path):
    from sdze_lightning.builders import build_problem, compose_config

    base = ["method=fused_adafactor", "estimator=taylor", "pde=allen_cahn_twobody",
            "pde.dim=12", "model.width=8", "model.depth=1"]
    for extra, expected in (([], LAG_BOUND), (["method.lag_bound=null"], None),
                            (["method.lag_bound=4"], 4.0)):
        cfg = compose_config([*base, *extra], tmp_path / f"run{len(extra)}{expected}")
        assert build_problem(cfg).configure_optimizers().lag_bound == expected
