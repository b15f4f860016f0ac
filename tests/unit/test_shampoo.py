"""Shampoo's direction with Adam's step length on the small layers of ``fused_adafactor``
(``method.small_layers=shampoo``), and a scheduler that follows the training loss."""

from __future__ import annotations

import copy
import functools
import math

import lightning as L
import pytest
import torch

from sdze_lightning.estimators.taylor import TaylorEstimator
from sdze_lightning.methods import FusedAdafactor
from sdze_lightning.methods.shampoo import GraftedShampoo
from sdze_lightning.nn import MLP
from sdze_lightning.problems import TwoBody

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, WIDTH = 12, 8


def twobody(**method) -> TwoBody:
    return TwoBody(dim=DIM, operator="allen_cahn", net=MLP(DIM, width=WIDTH, depth=2, seed=1),
                   estimator=TaylorEstimator(4), n_interior=8, n_eval=32,
                   method=functools.partial(FusedAdafactor, lr=1e-2, **method)).double()


def one_step(problem: TwoBody) -> tuple[FusedAdafactor, list[torch.Tensor]]:
    opt = FusedAdafactor(problem.net, **problem.method.keywords)
    grads: list[torch.Tensor] = []

    def closure():
        opt.zero_grad()
        loss = problem.loss_terms(0, 0)["loss"]
        loss.backward()
        grads[:] = [None if p.grad is None else p.grad.clone() for p in problem.net.parameters()]
        return loss

    opt.step(closure)
    return opt, grads


def test_inverse_fourth_root_of_a_positive_definite_matrix():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    spd = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64)
    root = GraftedShampoo.inverse_fourth_root(spd, eps=0.0)
    # root^4 (A) = I up to float64 rounding of an eigendecomposition (cond(A) ~ 1e3)
    torch.testing.assert_close(torch.linalg.matrix_power(root, 4) @ spd,
                               torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-10)


def test_shampoo_takes_adams_step_length_along_shampoos_direction():
    before = twobody()
    adam_problem, shampoo_problem = copy.deepcopy(before), copy.deepcopy(before)
    one_step(adam_problem)
    opt, grads = one_step(_with(shampoo_problem, small_layers="shampoo"))
    b2 = opt.param_groups[1]["betas"][1]
    names = [n for n, _ in before.net.named_parameters()]
    triples = zip(before.net.parameters(), adam_problem.net.parameters(),
                  shampoo_problem.net.parameters(), strict=True)
    matrices = 0
    for name, grad, (p0, pa, ps) in zip(names, grads, triples, strict=True):
        if p0 is before.net.layers[0].weight or p0.ndim != 2:
            assert torch.equal(ps, pa), name  # the input layer and the biases: unchanged rule
            continue
        matrices += 1
        step_adam, step_shampoo = pa - p0, ps - p0
        # Adam's step length: equal up to the rounding of the rescaling (float64)
        torch.testing.assert_close(step_shampoo.norm(), step_adam.norm(), rtol=1e-12, atol=0)
        # Shampoo's direction: at the first step L = (1 - b2) G G^T, R = (1 - b2) G^T G
        left = GraftedShampoo.inverse_fourth_root((1 - b2) * grad @ grad.T, 1e-6)
        right = GraftedShampoo.inverse_fourth_root((1 - b2) * grad.T @ grad, 1e-6)
        direction = -(left @ grad @ right)
        cosine = torch.dot(step_shampoo.flatten(), direction.flatten()) / (
            step_shampoo.norm() * direction.norm())
        assert cosine > 1 - 1e-10, name
        # and not Adam's direction (the preconditioner changes it)
        assert torch.dot(step_shampoo.flatten(), step_adam.flatten()) / (
            step_shampoo.norm() * step_adam.norm()) < 1 - 1e-3, name
    assert matrices == 2  # the hidden and the output layer's weights


def _with(problem: TwoBody, **method) -> TwoBody:
    problem.method = functools.partial(FusedAdafactor, lr=1e-2, **method)
    return problem


def test_shampoo_factors_are_saved_and_restored_with_the_optimizer():
    problem = _with(twobody(), small_layers="shampoo", precondition_every=2)
    opt, _ = one_step(problem)
    hidden = problem.net.layers[1].weight
    saved = copy.deepcopy(opt.state_dict())
    fresh = FusedAdafactor(problem.net, **problem.method.keywords)
    fresh.load_state_dict(saved)
    for key in ("shampoo_left", "shampoo_right", "shampoo_left_root", "shampoo_right_root"):
        assert torch.equal(fresh.state[hidden][key], opt.state[hidden][key]), key
    assert fresh.state[hidden]["shampoo_count"] == 1


@pytest.mark.parametrize(("key", "value"), [("small_layers", "soap"),
                                            ("precondition_every", 0)])
def test_bad_small_layer_settings_are_refused(key, value):
    with pytest.raises(ValueError, match=f"method.{key}"):
        FusedAdafactor(MLP(DIM, width=WIDTH, depth=2), **{key: value})


def test_a_plateau_scheduler_follows_the_training_loss():
    """``ReduceLROnPlateau`` is stepped with each step's loss: with ``patience=0`` and a
    threshold no loss can meet, the rate halves after every step but the first."""
    scheduler = functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, factor=0.5,
                                  patience=0, threshold=1e9, threshold_mode="abs")
    problem = TwoBody(dim=DIM, operator="allen_cahn", net=MLP(DIM, width=WIDTH, depth=2),
                      estimator=TaylorEstimator(4), n_interior=8, n_eval=32,
                      method=functools.partial(FusedAdafactor, lr=1e-2), scheduler=scheduler)
    trainer = L.Trainer(max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        accelerator="cpu", devices=1, limit_val_batches=0)
    trainer.fit(problem)
    sched = trainer.lr_scheduler_configs[0].scheduler
    # the first step sets the best loss; each later one fails the threshold: 3 halvings
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == [1e-2 * 0.5**3] * 2
    assert sched.last_epoch == 4 and math.isfinite(sched.best)
