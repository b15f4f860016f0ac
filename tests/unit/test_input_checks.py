"""Direct unit tests of :class:`sdze_lightning.input_checks.ContractCheck`.

The contract check itself (:func:`~sdze_lightning.input_checks.check_inputs`) is tested
through its refusals in ``tests/integration/test_bad_input.py``; here: that the collaborator runs it
once per device and dtype, remembers only a passed check, and forgets on request.
"""

from __future__ import annotations

import pytest
import torch

from sdze_lightning import input_checks
from sdze_lightning.input_checks import ContractCheck
from sdze_lightning.nn import MLP
from sdze_lightning.problems import Poisson2D

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: 1 thread is faster here


def poisson(cls=Poisson2D) -> Poisson2D:
    return cls(n_interior=8, n_boundary=4, n_eval=16, net=MLP(2, width=8, depth=1, seed=0))


@pytest.fixture
def counted(monkeypatch):
    """Count the calls of the module's check_inputs (still running the real check)."""
    calls: list[object] = []
    real = input_checks.check_inputs

    def counting(problem):
        calls.append(problem)
        real(problem)

    monkeypatch.setattr(input_checks, "check_inputs", counting)
    return calls


def test_run_checks_and_remembers_the_device_and_dtype(counted):
    problem = poisson()
    check = problem.contract_check
    assert isinstance(check, ContractCheck) and check.checked_as is None
    check.run()
    assert counted == [problem]
    assert check.checked_as == (torch.device("cpu"), torch.float32)
    problem.check_inputs()  # the problem's API always checks
    assert len(counted) == 2


def test_run_unless_checked_checks_once_per_dtype_and_after_forget(counted):
    problem = poisson()
    check = problem.contract_check
    check.run_unless_checked()
    check.run_unless_checked()
    assert len(counted) == 1
    problem.double()  # another dtype: checked again
    check.run_unless_checked()
    assert len(counted) == 2 and check.checked_as == (torch.device("cpu"), torch.float64)
    check.run_unless_checked()
    assert len(counted) == 2
    check.forget()
    assert check.checked_as is None
    check.run_unless_checked()
    assert len(counted) == 3


class WrongShape(Poisson2D):
    def residual(self, x, d):
        return super().residual(x, d)[:, None]  # (N, 1) instead of (N,)


def test_a_failed_check_is_not_remembered(counted):
    check = poisson(WrongShape).contract_check
    for _ in range(2):
        with pytest.raises(ValueError, match=r"WrongShape.residual\(\) must return a tensor "
                                             r"of shape \(2,\)"):
            check.run_unless_checked()
        assert check.checked_as is None
    assert len(counted) == 2  # checked (and refused) each time
