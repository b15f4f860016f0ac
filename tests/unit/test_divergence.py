"""Divergence: a NaN/Inf loss is caught at its step, reported with the step and the
method's state, not applied, and training stops (default) or skips the step (config),
without overwriting the last good checkpoint."""

from __future__ import annotations

import copy
import functools

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sdze_lightning import NonFiniteLossError
from sdze_lightning.divergence import MAX_CONSECUTIVE_SKIPS
from sdze_lightning.estimators.taylor import TaylorEstimator
from sdze_lightning.methods import SDZE, MeZO, PDEAware
from sdze_lightning.nn import MLP
from sdze_lightning.problems import Poisson2D

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: 1 thread is faster here

BAD = 5  # the step whose residual is non-finite
METHODS = {
    "sdze": (functools.partial(SDZE, lr=1e-2, rank=2, period=3, queries=2), "SDZE(step=5"),
    "mezo": (functools.partial(MeZO, lr=1e-3, normalize=False), "MeZO(step=5"),
    "adam": (functools.partial(torch.optim.Adam, lr=1e-2), "Adam(lr="),
    "pde_aware": (functools.partial(PDEAware, lr=1e-3), "PDEAware(lr="),
}


class BadAt(Poisson2D):
    """Poisson 2D whose residual is ``value`` (NaN, Inf) at the steps ``bad`` during training."""

    def __init__(self, bad=(BAD,), value=float("nan"), **kwargs):
        super().__init__(**kwargs)
        self.bad, self.value = set(bad), value

    def residual(self, x, d):
        r = super().residual(x, d)
        if self._trainer is not None and self.trainer.training and self.global_step in self.bad:
            r = r + self.value
        return r


def make(method: str, **kwargs) -> BadAt:
    est = TaylorEstimator(num_directions=2, distribution="rademacher")
    return BadAt(net=MLP(2, width=12, depth=2, seed=0), n_interior=16, n_boundary=8, n_eval=32,
                 estimator=est, method=METHODS[method][0], **kwargs)


class Snapshots(L.Callback):
    """Network and optimizer state before and after every step."""

    def __init__(self):
        self.before, self.after = {}, {}

    @staticmethod
    def _state(trainer, pl_module):
        opt = trainer.optimizers[0]
        return copy.deepcopy((pl_module.state_dict(), opt.state_dict()["state"]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = self._state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = self._state(trainer, pl_module)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def trained(state):
    """Weights and optimizer tensors, without the step counters."""
    weights, opt = state
    return weights, {k: v for k, v in opt.items() if k != "zo"}


def unchanged(now, before, method: str) -> None:
    """Bit for bit, except MeZO's weights: its in-place +eps/-2eps/+eps perturbation is
    undone up to round-off (documented in methods/mezo.py), |drift| <~ 4 ulp of the weights."""
    if method != "mezo":
        assert same(now, before)
        return
    assert same(now[1], before[1])
    for k, v in now[0].items():
        torch.testing.assert_close(v, before[0][k], rtol=0, atol=1e-15)


def fit(problem, tmp_path, max_steps=8, snaps=None) -> tuple[L.Trainer, Snapshots]:
    snaps = snaps or Snapshots()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True, save_top_k=0)
    trainer = L.Trainer(
        max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, accelerator="cpu", devices=1, precision="64-true",
        callbacks=[snaps, ckpt],
    )
    trainer.fit(problem)
    return trainer, snaps


@pytest.mark.parametrize("method", sorted(METHODS))
def test_stop_keeps_last_good_checkpoint(method, tmp_path):
    problem = make(method)
    snaps = Snapshots()
    with pytest.raises(NonFiniteLossError) as info:
        fit(problem, tmp_path, snaps=snaps)
    err = info.value
    message = str(err)
    assert err.step == BAD and f"Non-finite loss at step {BAD}" in message
    assert METHODS[method][1] in message and "was not applied" in message
    assert "interior" in err.terms  # the problem's loss terms are in the report
    # checkpoints every 2 steps: the bad step would have written the one of global_step 6;
    # last.ckpt is still the good one of global_step 4
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == BAD - 1
    assert same((ckpt["state_dict"], ckpt["optimizer_states"][0]["state"]), snaps.after[BAD - 2])
    # nothing of the bad step was applied: network and method state as before it
    trainer = problem.trainer
    assert trainer.global_step == BAD
    now = Snapshots._state(trainer, problem)
    unchanged(now, snaps.before[BAD], method)
    assert not same(trained(now), trained(snaps.before[BAD - 1]))  # (the step before trained)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_skip_leaves_parameters_unchanged_and_continues(method, tmp_path):
    problem = make(method, divergence="skip")
    trainer, snaps = fit(problem, tmp_path)
    assert trainer.global_step == 8 and problem.skipped_steps == 1
    # the bad step changed nothing (network, optimizer state) but the step counter ...
    after, before = copy.deepcopy(snaps.after[BAD]), copy.deepcopy(snaps.before[BAD])
    if "zo" in after[1]:
        assert after[1]["zo"].pop("step") == before[1]["zo"].pop("step") + 1
    unchanged(after, before, method)
    # ... while the steps around it did train (weights, or SDZE's subspace coordinates)
    for k in (BAD - 1, BAD + 1):
        assert not same(trained(snaps.before[k]), trained(snaps.after[k]))
    inner = trainer.optimizers[0]
    if hasattr(inner, "zo_state"):  # the method's step counter stays aligned with global_step
        assert inner.zo_state["step"] == trainer.global_step
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 8


def test_inf_is_caught_like_nan(tmp_path):
    with pytest.raises(NonFiniteLossError, match=f"step {BAD}"):
        fit(make("sdze", value=float("inf")), tmp_path)


def test_skip_gives_up_after_consecutive_non_finite_steps(tmp_path):
    problem = make("sdze", divergence="skip", bad=range(2, 100))
    with pytest.raises(NonFiniteLossError, match="non-finite steps in a row"):
        fit(problem, tmp_path, max_steps=50)
    assert problem.skipped_steps == MAX_CONSECUTIVE_SKIPS - 1
    assert problem.trainer.global_step == 2 + MAX_CONSECUTIVE_SKIPS - 1


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match=r"divergence must be one of \['stop', 'skip'\]"):
        make("sdze", divergence="ignore")
