"""divergence=skip without a copy of the parameters: the methods that can withhold a
non-finite step do so themselves (bit for bit the state the copy-and-restore left), any
other method keeps the copy, and the memory check counts it where it stays."""

from __future__ import annotations

import copy
import dataclasses
import functools

import lightning as L
import pytest
import torch
from conftest import DecayingSGD

from sdze_lightning import memory_budget, stepping
from sdze_lightning.estimators import build_estimator
from sdze_lightning.methods import SDZE, Adam, FusedAdafactor, MeZO, PDEAware
from sdze_lightning.methods.base import withholds_nonfinite
from sdze_lightning.nn import MLP
from sdze_lightning.problems import Poisson2D, TwoBody

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: 1 thread is faster here

BAD = (2, 3, 6)  # steps whose residual is NaN (two of them in a row)
STEPS = 9


class PDEAwareUnguarded(PDEAware):
    """PDEAware as it was: a non-finite closure loss does not stop its update."""

    def step(self, closure=None, residuals=None, points=None, *, request=None):
        if request is not None:
            closure, residuals, points = request.closure, request.residuals, request.points
        return super().step(lambda: torch.nan_to_num(closure(), nan=0.0), residuals, points)


METHODS = {
    "sdze": functools.partial(SDZE, lr=1e-2, rank=2, period=3, queries=2, update="adam"),
    "mezo": functools.partial(MeZO, lr=1e-3, normalize=True),
    "torch_adam": functools.partial(torch.optim.Adam, lr=1e-2),
    "adam": functools.partial(Adam, lr=1e-2),
    "pde_aware": functools.partial(PDEAware, lr=1e-3),
    "fused_adafactor": functools.partial(FusedAdafactor, lr=1e-3),
}
#: What the methods were before: their skipped steps were copied and put back.
BEFORE = {**METHODS, "pde_aware": functools.partial(PDEAwareUnguarded, lr=1e-3)}


class BadAt(Poisson2D):
    """Poisson 2D whose residual is NaN at the steps ``BAD`` during training."""

    def residual(self, x, d):
        r = super().residual(x, d)
        if self._trainer is not None and self.trainer.training and self.global_step in BAD:
            r = r + float("nan")
        return r


class States(L.Callback):
    """Network and whole optimizer state (step counters included) before and after each step."""

    def __init__(self):
        self.before, self.after = {}, {}

    @staticmethod
    def state(trainer, pl_module):
        opt = trainer.optimizers[0]
        return copy.deepcopy((pl_module.state_dict(), opt.state_dict()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = self.state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = self.state(trainer, pl_module)


def same(a, b) -> bool:
    """Equal bit for bit: tensors (dtype, shape, values), dicts, sequences, numbers."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def problem(method, **kwargs) -> BadAt:
    est = build_estimator("taylor", num_directions=2, distribution="rademacher")
    return BadAt(net=MLP(2, width=12, depth=2, seed=0), n_interior=16, n_boundary=8,
                 n_eval=32, estimator=est, method=method, divergence="skip", **kwargs)


def fit(method) -> tuple[BadAt, States]:
    states = States()
    pinn = problem(method)
    L.Trainer(
        max_steps=STEPS, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, accelerator="cpu", devices=1,
        precision="64-true", callbacks=[states],
    ).fit(pinn)
    return pinn, states


def copying(monkeypatch) -> list[int]:
    """Make every skipped first-order step copy and restore (the old path); count the copies."""
    copies = []
    snapshot = stepping.snapshot

    def counted(optimizer):
        copies.append(1)
        return snapshot(optimizer)

    monkeypatch.setattr(stepping, "withholds_nonfinite", lambda optimizer: False, raising=False)
    monkeypatch.setattr(stepping, "snapshot", counted)
    return copies


def no_copy_allowed(monkeypatch) -> None:
    def refuse(optimizer):
        raise AssertionError(f"{type(optimizer).__name__}: a skipped step copied the parameters")

    monkeypatch.setattr(stepping, "snapshot", refuse)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_skipped_steps_copy_nothing_and_leave_the_restored_state(name, monkeypatch):
    """Every shipped method trains through NaN steps under divergence=skip without a
    snapshot, to the same network, optimizer state and step counters, bit for bit, at every
    step, as when each skipped step was copied and put back (the fused method with the
    declaration it needs, ``withholds_nonfinite_step = True``)."""
    with monkeypatch.context() as old:
        copies = copying(old)
        reference, before = fit(BEFORE[name])
    first_order = not name.startswith(("sdze", "mezo"))
    assert len(copies) == (len(BAD) if first_order else 0)  # the old path did copy
    if name == "fused_adafactor":
        monkeypatch.setattr(FusedAdafactor, "traits", dataclasses.replace(
            FusedAdafactor.traits, withholds_nonfinite_step=True))
    no_copy_allowed(monkeypatch)
    pinn, now = fit(METHODS[name])
    assert pinn.trainer.global_step == reference.trainer.global_step == STEPS
    assert pinn.skipped_steps == reference.skipped_steps == len(BAD)
    assert now.after.keys() == before.after.keys() == set(range(STEPS))
    for step in range(STEPS):
        assert same(now.after[step], before.after[step]), f"state after step {step}"
    if first_order:  # a skipped step changed nothing at all, step counts included
        for step in BAD:
            assert same(now.after[step], now.before[step])
    inner = pinn.trainer.optimizers[0]
    if hasattr(inner, "zo_state"):  # the method's counter counted the skipped steps
        assert inner.zo_state["step"] == STEPS


@pytest.mark.parametrize("name", ["torch_adam", "adam", "pde_aware", "sdze", "mezo"])
def test_a_skipped_step_copies_no_parameter_and_no_state(name, monkeypatch):
    """No tensor of a parameter's or of the optimizer state's memory is cloned or deep-copied
    during a skipped step (the old path cloned every parameter and the whole state)."""
    pinn = problem(METHODS[name]).double()
    opt = pinn.configure_optimizers()
    for k in range(2):
        pinn.run_step(opt, k)
    storages = {p.untyped_storage().data_ptr() for p in pinn.net.parameters()}
    storages |= {v.untyped_storage().data_ptr() for st in opt.state.values()
                 for v in st.values() if isinstance(v, torch.Tensor) and v.numel() > 1}
    copied = []
    clone, deepcopy = torch.Tensor.clone, torch.Tensor.__deepcopy__

    def watched_clone(self, *args, **kwargs):
        if self.untyped_storage().data_ptr() in storages:
            copied.append(tuple(self.shape))
        return clone(self, *args, **kwargs)

    def watched_deepcopy(self, memo):
        if self.untyped_storage().data_ptr() in storages:
            copied.append(tuple(self.shape))
        return deepcopy(self, memo)

    before = copy.deepcopy((pinn.state_dict(), opt.state_dict()))
    pinn.boundary_weight = float("nan")
    monkeypatch.setattr(torch.Tensor, "clone", watched_clone)
    monkeypatch.setattr(torch.Tensor, "__deepcopy__", watched_deepcopy)
    outcome = pinn.run_step(opt, 2, skip_nonfinite=True)
    monkeypatch.undo()
    assert outcome.skipped is not None and torch.isnan(outcome.loss)
    assert copied == []
    if name not in ("sdze", "mezo"):  # (zeroth-order: test_divergence.py)
        assert same((pinn.state_dict(), opt.state_dict()), before)


def test_pde_aware_applies_nothing_after_a_non_finite_closure():
    """The step returns the closure's loss without evaluating the residuals or touching the
    parameters and the moments."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1).double()
    opt = PDEAware(net.parameters(), lr=1e-2)
    x = torch.randn(6, 3, dtype=torch.float64)

    def residuals(rows=slice(None)):
        return net(x[rows]).squeeze(-1), None

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = residuals()[0].square().mean()
        loss.backward()
        return loss

    opt.step(closure, residuals=residuals, points=6)
    before = copy.deepcopy((net.state_dict(), opt.state_dict()))
    called = []

    def nan_closure():
        opt.zero_grad(set_to_none=True)
        return torch.tensor(float("nan"), dtype=torch.float64)

    def watched(rows=slice(None)):
        called.append(rows)
        return residuals(rows)

    loss = opt.step(nan_closure, residuals=watched, points=6)
    assert torch.isnan(loss) and called == []
    assert same((net.state_dict(), opt.state_dict()), before)


def test_any_other_method_keeps_the_copy_and_applies_nothing(monkeypatch):
    """A method that changes its parameters without gradients is copied and put back."""
    copies = []
    snapshot = stepping.snapshot
    monkeypatch.setattr(stepping, "snapshot", lambda opt: copies.append(1) or snapshot(opt))
    pinn = problem(functools.partial(DecayingSGD, lr=1e-2)).double()
    opt = pinn.configure_optimizers()
    pinn.run_step(opt, 0)
    before = copy.deepcopy((pinn.state_dict(), opt.state_dict()))
    pinn.boundary_weight = float("nan")
    import math

    # the report is this step's: finite interior and boundary terms, the NaN weight makes
    # the total NaN
    skipped = pinn.run_step(opt, 1, skip_nonfinite=True).skipped
    assert skipped.step == 1 and math.isnan(skipped.terms["loss"])
    assert math.isfinite(skipped.terms["interior"]) and math.isfinite(skipped.terms["boundary"])
    assert copies == [1]
    assert same((pinn.state_dict(), opt.state_dict()), before)


def test_which_methods_withhold_a_non_finite_step():
    net = MLP(2, width=4, depth=1, seed=0)

    class OwnStep(torch.optim.Adam):
        def step(self, closure=None):
            return super().step(closure)

    for factory in (SDZE, functools.partial(MeZO, lr=1.0), torch.optim.Adam, torch.optim.AdamW,
                    torch.optim.SGD, Adam, functools.partial(PDEAware, lr=1e-3),
                    MeZO(net), torch.optim.Adam(net.parameters())):
        assert withholds_nonfinite(factory), factory
    for factory in (torch.optim.RMSprop, torch.optim.LBFGS, OwnStep, DecayingSGD,
                    functools.partial(torch.optim.RMSprop, lr=1e-3),
                    lambda params: torch.optim.Adam(params)):
        assert not withholds_nonfinite(factory), factory


def refusal(method, divergence: str, monkeypatch) -> str:
    """The memory check's message on a two-body problem (d = 100) that nothing fits."""
    monkeypatch.setattr(memory_budget, "available_bytes", lambda device="cpu": 1)
    pinn = TwoBody(dim=100, operator="allen_cahn", net=MLP(100, width=8, depth=1),
                   estimator="taylor", method=method, divergence=divergence)
    with pytest.raises(ValueError) as err:
        pinn.check_inputs()
    return str(err.value)


def test_the_memory_check_counts_the_copy_where_it_stays(monkeypatch):
    params = sum(p.numel() for p in MLP(100, width=8, depth=1).parameters())
    copy_part = f"divergence=skip copy of the parameters ({params:,}): {params * 4 / 1e6:.1f} MB"
    rmsprop = functools.partial(torch.optim.RMSprop, lr=1e-3)
    assert copy_part in refusal(rmsprop, "skip", monkeypatch)
    assert "divergence=skip copy" not in refusal(rmsprop, "stop", monkeypatch)
    for method in (torch.optim.Adam, Adam, PDEAware, SDZE, MeZO):
        assert "divergence=skip copy" not in refusal(method, "skip", monkeypatch), method
    fused = refusal(FusedAdafactor, "skip", monkeypatch)
    assert (copy_part in fused) == (not withholds_nonfinite(FusedAdafactor))
    monkeypatch.setattr(FusedAdafactor, "traits", dataclasses.replace(
            FusedAdafactor.traits, withholds_nonfinite_step=True))
    assert "divergence=skip copy" not in refusal(FusedAdafactor, "skip", monkeypatch)
