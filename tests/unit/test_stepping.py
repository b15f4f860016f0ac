"""Direct unit tests of :mod:`sdze_lightning.stepping` (``StepRunner``, snapshots).

A first-order step is compared with the closure step written here by hand on a deep copy
of the problem (bit for bit in float64: the same operations in the same order); a
zeroth-order step with a minimal method that records what the runner hands it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import DecayingSGD
from torch import Tensor

from sdze_lightning.divergence import NonFiniteLossError
from sdze_lightning.methods.base import FirstOrderStep, MethodTraits
from sdze_lightning.methods.zeroth_order import ZerothOrderOptimizer, ZerothOrderStep
from sdze_lightning.nn import MLP
from sdze_lightning.problems import Poisson2D
from sdze_lightning.stepping import (
    StepOutcome,
    StepRunner,
    describe,
    inner_optimizers,
    restore,
    snapshot,
    zeroth_order_optimizers,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: 1 thread is faster here


def poisson(cls=Poisson2D, **kwargs) -> Poisson2D:
    return cls(n_interior=8, n_boundary=4, n_eval=16, net=MLP(2, width=8, depth=1, seed=0),
               seed=1, **kwargs).double()


def params(problem) -> list[Tensor]:
    return [p.detach().clone() for p in problem.net.parameters()]


def assert_same(a: list[Tensor], b: list[Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def hand_step(problem, optimizer, step: int) -> Tensor:
    """The closure step of a first-order method, written out."""
    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = problem.loss_terms(step, 0)["loss"]
        loss.backward()
        return loss

    return optimizer.step(closure).detach()  # no first-layer cache: same numbers


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
    lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
], ids=["adam", "sgd"])
def test_a_first_order_step_is_the_hand_written_closure_step_bit_for_bit(make):
    problem = poisson()
    other = copy.deepcopy(problem)
    opt, hand_opt = make(problem.net.parameters()), make(other.net.parameters())
    for step in range(3):
        outcome = problem.step_runner.run(opt, step)
        loss = hand_step(other, hand_opt, step)
        assert isinstance(outcome, StepOutcome) and outcome.skipped is None
        assert torch.equal(outcome.loss, loss)
        assert torch.equal(outcome.terms["loss"].detach(), loss)
        assert set(outcome.terms) == {"interior", "boundary", "loss"}
        assert_same(params(problem), params(other))
        assert problem.collocation.cache == {} and problem.collocation.boundary_cache == {}
    assert not torch.equal(params(problem)[0], params(poisson())[0])  # the steps moved it


def test_the_backward_argument_back_propagates_the_loss():
    problem = poisson()
    opt = torch.optim.SGD(problem.net.parameters(), lr=1e-2)
    seen: list[Tensor] = []

    def backward(loss: Tensor) -> None:
        seen.append(loss.detach())
        loss.backward()

    outcome = problem.step_runner.run(opt, 0, backward=backward)
    assert len(seen) == 1 and torch.equal(seen[0], outcome.loss)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
    lambda ps: DecayingSGD(ps, lr=1e-2, momentum=0.9),
], ids=["adam-withholds", "decaying-sgd-restored"])
def test_a_non_finite_step_raises_or_is_reported_and_applies_nothing(make):
    problem = poisson()
    opt = make(problem.net.parameters())
    problem.step_runner.run(opt, 0)  # some optimizer state to keep
    before, state = params(problem), copy.deepcopy(opt.state_dict())
    problem.boundary_weight = float("nan")
    with pytest.raises(NonFiniteLossError, match="Non-finite loss at step 1") as err:
        problem.step_runner.run(opt, 1)
    assert err.value.step == 1 and set(err.value.terms) == {"interior", "boundary", "loss"}
    assert err.value.method_state == describe(opt)
    assert problem.collocation.cache == {}  # dropped on the error too
    assert_same(params(problem), before)
    outcome = problem.step_runner.run(opt, 1, skip_nonfinite=True)
    assert isinstance(outcome.skipped, NonFiniteLossError) and outcome.skipped.step == 1
    assert torch.isnan(outcome.loss) and outcome.loss.dtype == torch.float64
    assert torch.isnan(torch.tensor(outcome.skipped.terms["loss"]))
    assert_same(params(problem), before)
    after = opt.state_dict()
    for k, v in state["state"][0].items():
        assert torch.equal(torch.as_tensor(after["state"][0][k]), torch.as_tensor(v))


def test_snapshot_and_restore_round_trip_parameters_and_state():
    problem = poisson()
    opt = torch.optim.Adam(problem.net.parameters(), lr=1e-2)
    problem.step_runner.run(opt, 0)
    before, state = params(problem), copy.deepcopy(opt.state_dict())
    saved = snapshot(opt)
    problem.step_runner.run(opt, 1)  # moves the parameters and the moments
    assert not torch.equal(params(problem)[0], before[0])
    assert_same(saved[1], before)  # copies: the step did not reach them
    restore(opt, saved)
    assert_same(params(problem), before)
    now = opt.state_dict()["state"]
    for i, entry in state["state"].items():
        for k, v in entry.items():
            assert torch.equal(now[i][k], v)
    # restored to a state that steps as the original did: the same step 1 again
    other = copy.deepcopy(problem)
    other_opt = torch.optim.Adam(other.net.parameters(), lr=1e-2)
    # a copy: torch's load_state_dict keeps Adam's step tensors, which are then shared
    other_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    problem.step_runner.run(opt, 1)
    other.step_runner.run(other_opt, 1)
    assert_same(params(problem), params(other))


def test_describe_names_the_class_and_learning_rate():
    net = MLP(2, width=8, depth=1, seed=0)
    assert describe(torch.optim.SGD(net.parameters(), lr=0.1)) == "SGD(lr=0.1)"
    groups = [{"params": [p], "lr": 0.1 * (i + 1)} for i, p in enumerate(net.parameters())]
    lrs = [g["lr"] for g in groups]
    assert describe(torch.optim.SGD(groups)) == f"SGD(lr={lrs})"
    zo = Recorder(net)
    assert describe(zo) == "Recorder(state of a recorder)"


class Recorder(ZerothOrderOptimizer):
    """Evaluates noise keys 1 and 2, records the values and returns their mean; no update.

    Checks the values itself, as the protocol asks."""

    def __init__(self, module, lr: float = 0.0) -> None:
        super().__init__(module, {"lr": lr})
        self.seen: list[tuple[int | None, list[Tensor]]] = []

    def zo_step(self, request: ZerothOrderStep) -> Tensor:
        values = [request.loss_at(key).detach() for key in (1, 2)]
        self.seen.append((request.step_index, values))
        mean = torch.stack(values).mean()
        if not bool(torch.isfinite(mean)):
            if request.skip_nonfinite:
                return mean
            raise NonFiniteLossError(request.step_index, {"q1": float(values[0])},
                                     self.describe_state())
        return mean

    def describe_state(self) -> str:
        return "Recorder(state of a recorder)"


def test_a_zeroth_order_step_gets_the_loss_of_each_noise_key():
    problem = poisson()
    reference = copy.deepcopy(problem)
    opt = Recorder(problem.net)
    outcome = problem.step_runner.run(opt, 5)
    (step_index, values), = opt.seen
    assert step_index == 5
    expected = [reference.loss_terms(5, key)["loss"].detach() for key in (1, 2)]
    assert_same(values, expected)
    assert torch.equal(outcome.loss, torch.stack(expected).mean())
    assert torch.equal(outcome.terms["loss"].detach(), expected[-1])  # the last evaluation's
    assert outcome.skipped is None
    assert problem.collocation.cache == {}


def test_a_zeroth_order_non_finite_step_names_the_step_terms_and_state():
    problem = poisson()
    problem.boundary_weight = float("nan")
    opt = Recorder(problem.net)
    with pytest.raises(NonFiniteLossError) as err:
        problem.step_runner.run(opt, 3)
    assert err.value.step == 3
    assert {"interior", "boundary", "loss", "q1"} <= set(err.value.terms)  # both reports
    assert err.value.method_state == "Recorder(state of a recorder)"
    outcome = problem.step_runner.run(opt, 3, skip_nonfinite=True)
    assert outcome.skipped is not None and outcome.skipped.step == 3
    assert outcome.skipped.method_state == "Recorder(state of a recorder)"
    assert set(outcome.skipped.terms) == {"interior", "boundary", "loss"}


class Scheduler:
    def __init__(self) -> None:
        self.steps = 0

    def step(self) -> None:
        self.steps += 1


class Driven(Poisson2D):
    """Poisson 2D driven by hand as a Trainer would: its optimizer, scheduler, global step;
    NaN residual at the steps in ``bad``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.at, self.bad = 0, set()
        self.scheduler_stub = Scheduler()

    @property
    def global_step(self) -> int:
        return self.at

    def optimizers(self, use_pl_optimizer=True):
        return self.opt

    def lr_schedulers(self):
        return self.scheduler_stub

    def manual_backward(self, loss, *args, **kwargs):
        loss.backward()

    def residual(self, x, d):
        r = super().residual(x, d)
        return r + float("nan") if self.at in self.bad else r


def test_training_step_skips_and_counts_under_skip_and_steps_the_scheduler():
    problem = poisson(Driven, divergence="skip")
    problem.opt = torch.optim.Adam(problem.net.parameters(), lr=1e-2)
    problem.bad = {1}
    runner = problem.step_runner
    assert math.isnan(runner.last_loss)  # before a step
    for step in range(3):
        problem.at = step
        before = params(problem)
        outcome = runner.training_step()
        assert runner.last_loss == float(outcome.loss) or step == 1  # NaN != NaN at step 1
        assert math.isnan(runner.last_loss) == (step == 1)
        assert (outcome.skipped is not None) == (step == 1)
        if step == 1:
            assert_same(params(problem), before)
    assert runner.guard.skipped_steps == 1 == problem.skipped_steps
    assert problem.scheduler_stub.steps == 3  # every step, the skipped one too


def test_training_step_stops_under_stop():
    problem = poisson(Driven)
    problem.opt = torch.optim.Adam(problem.net.parameters(), lr=1e-2)
    problem.bad = {0}
    with pytest.raises(NonFiniteLossError, match="step 0"):
        problem.step_runner.training_step()
    assert problem.step_runner.guard.skipped_steps == 0


def test_no_trainer_no_optimizers():
    problem = poisson()
    assert inner_optimizers(problem) == [] and zeroth_order_optimizers(problem) == []
    assert isinstance(problem.step_runner, StepRunner)
    assert problem.step_runner.physics_loss is problem.physics_loss


class RecordingSGD(torch.optim.SGD):
    """SGD that records the keyword arguments of each step."""

    def __init__(self, params):
        super().__init__(params, lr=1e-3)
        self.seen: list[dict] = []

    def step(self, closure=None, **kwargs):  # noqa: D102
        self.seen.append({"closure": closure, **kwargs})
        return super().step(closure)


@pytest.mark.parametrize("traits, residuals", [
    (None, False),  # an undeclared optimizer: torch's step(closure), nothing else
    (MethodTraits(needs_residuals=True), True),
    (MethodTraits(reduces_input_layer=True), False),
])
def test_a_first_order_method_gets_one_request_as_its_traits_declare(traits, residuals):
    problem = poisson()
    cls = RecordingSGD if traits is None else type("Declared", (RecordingSGD,), {"traits": traits})
    opt = cls(problem.net.parameters())
    outcome = problem.run_step(opt, 3)
    (kwargs,) = opt.seen
    closure = kwargs.pop("closure")
    if traits is None:
        assert kwargs == {}
        return
    assert list(kwargs) == ["request"]
    request = kwargs["request"]
    assert isinstance(request, FirstOrderStep) and request.closure is closure
    assert request.step_index == 3 and request.skip_nonfinite is False
    assert request.shard is None  # one process
    assert torch.isfinite(outcome.loss)
    if residuals:
        r, boundary = request.residuals()
        assert request.points == problem.n_interior == r.shape[0]
        assert torch.equal(r, problem.physics_loss.residual_batch(3)[0])
    else:
        assert request.residuals is None and request.points is None
