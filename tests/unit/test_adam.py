"""``method=adam``: torch.optim.Adam built from the network, with an optional input-layer rate."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import quiet_trainer

from sdze_lightning.estimators.taylor import TaylorEstimator
from sdze_lightning.methods import Adam
from sdze_lightning.nn import MLP
from sdze_lightning.problems import TwoBody

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, WIDTH, STEPS = 24, 16, 5


def trained(method) -> TwoBody:
    """A small two-body problem after ``STEPS`` steps of ``Trainer.fit`` with ``method``."""
    problem = TwoBody(dim=DIM, operator="allen_cahn", net=MLP(DIM, width=WIDTH, depth=2, seed=1),
                      estimator=TaylorEstimator(4), n_interior=8, n_eval=32, seed=2,
                      method=method).double()
    quiet_trainer(max_steps=STEPS, limit_val_batches=0).fit(problem)
    return problem


def grouped_reference(params, lr: float, input_lr: float) -> torch.optim.Adam:
    """torch.optim.Adam with the first parameter (the input weight) in its own group."""
    params = list(params)
    return torch.optim.Adam([{"params": params[:1], "lr": input_lr}, {"params": params[1:]}],
                            lr=lr)


def assert_same_parameters(a: TwoBody, b: TwoBody) -> None:
    for p, q in zip(a.net.parameters(), b.net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_without_input_lr_it_is_torch_adam():
    """Same trajectory, bit for bit, and one parameter group (earlier checkpoints load)."""
    ours = trained(functools.partial(Adam, lr=1e-2))
    torch_adam = trained(functools.partial(torch.optim.Adam, lr=1e-2))
    assert_same_parameters(ours, torch_adam)
    assert len(ours.optimizers().optimizer.param_groups) == 1


def test_input_lr_sets_the_input_layer_rate_only():
    ours = trained(functools.partial(Adam, lr=1e-2, input_lr=1e-3))
    reference = trained(functools.partial(grouped_reference, lr=1e-2, input_lr=1e-3))
    assert_same_parameters(ours, reference)
    assert [g["lr"] for g in ours.optimizers().optimizer.param_groups] == [1e-3, 1e-2]
    # Not vacuous: with lr on every layer the input weight ends elsewhere.
    same = trained(functools.partial(Adam, lr=1e-2))
    assert not torch.allclose(same.net.layers[0].weight, ours.net.layers[0].weight,
                              rtol=1e-6, atol=0)


@pytest.mark.parametrize("input_lr", [0.0, -1e-3, float("nan"), True])
def test_a_non_positive_input_lr_is_refused(input_lr):
    with pytest.raises(ValueError, match="method.input_lr must be > 0 or null"):
        Adam(MLP(DIM, width=WIDTH, depth=2), input_lr=input_lr)


def test_input_lr_needs_the_library_mlp():
    net = torch.nn.Sequential(torch.nn.Linear(DIM, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    Adam(net)  # without input_lr any module works
    with pytest.raises(TypeError, match="model=mlp or method.input_lr=null"):
        Adam(net, input_lr=1e-4)


def test_config_reaches_the_param_groups(tmp_path):
    from sdze_lightning.builders import build_problem, compose_config

    overrides = ["method=adam", "estimator=taylor", "pde=allen_cahn_twobody", "pde.dim=12",
                 "model.width=8", "model.depth=1"]
    default = build_problem(compose_config(overrides, tmp_path / "a")).configure_optimizers()
    assert [g["lr"] for g in default.param_groups] == [1e-3]
    cfg = compose_config([*overrides, "method.input_lr=1e-4"], tmp_path / "b")
    opt = build_problem(cfg).configure_optimizers()
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-3]


def test_cli_refuses_a_negative_input_lr_before_training(tmp_path):
    from sdze_lightning.cli import run

    with pytest.raises(ValueError, match="method.input_lr"):
        run(["method=adam", "method.input_lr=-1", "estimator=taylor", "pde=allen_cahn_twobody",
             "pde.dim=12", "model.width=8", "model.depth=1", "trainer.max_steps=2",
             "logger=none"], tmp_path / "run")
    assert not list((tmp_path / "run").rglob("*.ckpt"))
