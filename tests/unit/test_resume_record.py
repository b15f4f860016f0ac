"""Direct unit tests of :mod:`sdze_lightning.resume` (``ResumeRecord`` and its checks).

No Trainer is run: where the record needs one (the optimizers it records, the precision
plugin that converts the module before the weights load) a stand-in object with just
those attributes is attached to the problem.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from lightning.pytorch.plugins.precision import DoublePrecision

from sdze_lightning.methods import MeZO, ZerothOrderOptimizer
from sdze_lightning.nn import MLP
from sdze_lightning.problems import Poisson2D
from sdze_lightning.resume import (
    CHECKPOINT_KEY,
    ResumeRecord,
    check_method_seeds,
    check_seed,
    method_seed,
    resume_state,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: 1 thread is faster here


def poisson(seed: int = 3) -> Poisson2D:
    return Poisson2D(n_interior=8, n_boundary=4, n_eval=16, seed=seed,
                     net=MLP(2, width=8, depth=1, seed=0))


def with_trainer(problem, optimizers=(), precision=None):
    """Attach a stand-in Trainer: its optimizers and its precision plugin."""
    plugin = precision or types.SimpleNamespace(convert_module=lambda module: module)
    problem._trainer = types.SimpleNamespace(
        optimizers=list(optimizers), strategy=types.SimpleNamespace(precision_plugin=plugin))
    return problem


def mezo(problem, seed):
    return MeZO(problem.net, lr=1e-3, seed=seed)


class Unseeded(ZerothOrderOptimizer):
    """A zeroth-order method without a seed of its own (``seed`` stays ``None``)."""

    def __init__(self, module) -> None:
        super().__init__(module, {"lr": 0.0})

    def zo_step(self, request):
        return request.loss_at(0)


def unseeded(problem):
    return Unseeded(problem.net)


def test_method_seed_is_a_zeroth_order_methods_integer_seed():
    problem = poisson()
    assert method_seed(mezo(problem, 5)) == 5
    assert method_seed(mezo(problem, np.int64(7))) == 7 and type(method_seed(
        mezo(problem, np.int64(7)))) is int
    assert method_seed(unseeded(problem)) is None
    seeded_as_float = unseeded(problem)
    seeded_as_float.seed = 5.0
    assert method_seed(seeded_as_float) is None  # not an integer: not recorded
    assert method_seed(torch.optim.Adam(problem.net.parameters())) is None  # first-order


def test_resume_state_records_the_seeds_and_skipped_steps():
    problem = poisson()
    opts = [mezo(problem, 5), torch.optim.SGD(problem.net.parameters(), lr=0.1)]
    assert resume_state(np.int64(3), opts, 4) == {
        "seed": 3, "method_seeds": [5, None], "skipped_steps": 4}


def test_check_seed_refuses_another_seed_naming_the_one_to_use():
    check_seed({"seed": 3}, 3)
    check_seed({"seed": None}, 9)  # nothing recorded: nothing to check
    check_seed({}, 9)
    with pytest.raises(ValueError) as err:
        check_seed({"seed": 3}, 4)
    assert str(err.value) == ("The checkpoint was trained with seed=3, this problem has "
                              "seed=4; resume with seed=3.")


def test_check_method_seeds_refuses_another_method_seed():
    problem = poisson()
    check_method_seeds({"method_seeds": [5]}, [mezo(problem, 5)])
    check_method_seeds({"method_seeds": [None]}, [mezo(problem, 6)])  # unseeded before
    check_method_seeds({"method_seeds": [5]}, [unseeded(problem)])  # unseeded now
    check_method_seeds({}, [mezo(problem, 6)])
    with pytest.raises(ValueError) as err:
        check_method_seeds({"method_seeds": [None, 5]}, [mezo(problem, 1), mezo(problem, 6)])
    assert str(err.value) == ("The checkpoint was trained with method.seed=5, the method now "
                              "has seed=6; resume with method.seed=5.")


def test_save_records_the_problems_seed_methods_and_skipped_steps():
    problem = poisson()
    problem.step_runner.guard.skipped_steps = 2
    checkpoint = {"state_dict": "kept"}
    problem.resume_record.save(checkpoint)
    assert checkpoint == {"state_dict": "kept", CHECKPOINT_KEY: {
        "seed": 3, "method_seeds": [], "skipped_steps": 2}}  # no Trainer: no optimizers
    with_trainer(problem, [mezo(problem, 5), torch.optim.Adam(problem.net.parameters())])
    problem.resume_record.save(checkpoint)
    assert checkpoint[CHECKPOINT_KEY]["method_seeds"] == [5, None]


def test_save_then_load_round_trips_into_a_fresh_problem():
    saved_from = with_trainer(poisson(), [])
    saved_from._trainer.optimizers.append(mezo(saved_from, 5))
    saved_from.step_runner.guard.skipped_steps = 2
    checkpoint: dict = {}
    saved_from.on_save_checkpoint(checkpoint)  # the Lightning hook delegates to the record

    fresh = poisson()
    assert isinstance(fresh.resume_record, ResumeRecord) and not fresh.output_fit.done
    fresh.resume_record.load(checkpoint)
    assert fresh.skipped_steps == 2
    assert fresh.resume_record.resumed_from == {"seed": 3, "method_seeds": [5],
                                                "skipped_steps": 2}
    assert fresh.output_fit.done  # trained weights: no offset fit
    with_trainer(fresh, [mezo(fresh, 5)])
    fresh.resume_record.check_methods()  # the same method seed: accepted
    assert fresh.resume_record.resumed_from is None  # checked once


def test_load_refuses_another_seed_before_taking_anything():
    checkpoint: dict = {}
    original = poisson(seed=3)
    original.step_runner.guard.skipped_steps = 2
    original.resume_record.save(checkpoint)
    other = poisson(seed=4)
    with pytest.raises(ValueError, match=r"trained with seed=3, this problem has seed=4; "
                                         r"resume with seed=3"):
        other.resume_record.load(checkpoint)
    assert other.skipped_steps == 0 and other.resume_record.resumed_from is None


def test_check_methods_refuses_another_method_seed_once():
    problem = poisson()
    problem.resume_record.load({CHECKPOINT_KEY: resume_state(3, [mezo(problem, 5)], 0)})
    with_trainer(problem, [mezo(problem, 6)])
    with pytest.raises(ValueError, match=r"trained with method.seed=5.*seed=6; "
                                         r"resume with method.seed=5"):
        problem.resume_record.check_methods()
    problem.resume_record.check_methods()  # the record was consumed: nothing to check


def test_a_checkpoint_without_a_record_loads_and_checks_nothing():
    problem = poisson(seed=4)
    problem.step_runner.guard.skipped_steps = 1
    problem.resume_record.load({"state_dict": {}})
    assert problem.resume_record.resumed_from is None and problem.skipped_steps == 1
    assert problem.output_fit.done
    with_trainer(problem, [mezo(problem, 6)])
    problem.resume_record.check_methods()


def test_load_converts_to_the_trainers_precision_first():
    problem = with_trainer(poisson(), precision=DoublePrecision())
    assert problem.dtype == torch.float32
    problem.resume_record.load({})
    assert problem.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in problem.net.parameters())

