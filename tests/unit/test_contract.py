"""``sdze_lightning.contract``: every shipped problem satisfies :class:`ProblemContract`.

The collaborators (collocation, loss, step runner, held-out set, resume record, output
fit) are typed against the protocol, not against ``PINNProblem``. The protocol is not
``runtime_checkable``; these tests check it structurally instead:

* a ``runtime_checkable`` sub-protocol of it (declared here, so the library's class is
  left as it is) accepts every shipped problem and a user subclass, and rejects objects
  that lack a member;
* every method of the protocol can be called on the problem the way the protocol
  declares it (required arguments by position, defaulted ones by keyword), properties
  are properties and ``overrides`` is a classmethod;
* the modules typed against the protocol do not import ``sdze_lightning.problem`` (the
  import circle the protocol exists to avoid).
"""

from __future__ import annotations

import ast
import inspect
import typing
from pathlib import Path

import pytest
from conftest import Sine1D
from torch import nn

import sdze_lightning
from sdze_lightning import PINNProblem
from sdze_lightning.contract import ProblemContract
from sdze_lightning.nn import MLP
from sdze_lightning.problems import (
    HJBLQG,
    AllenCahn1D,
    BiharmonicAnnulus,
    Burgers1D,
    HardCube,
    KdV1D,
    Poisson2D,
    ThreeBody,
    TwoBody,
)

PACKAGE = Path(sdze_lightning.__file__).parent


@typing.runtime_checkable
class CheckableContract(ProblemContract, typing.Protocol):
    """The same members as :class:`ProblemContract`, usable with ``isinstance``."""


#: What the protocol declares in its body: methods, properties and a classmethod.
DECLARED = {
    name: value for name, value in vars(ProblemContract).items()
    if (not name.startswith("__") or name == "__call__")
    and (inspect.isfunction(value) or isinstance(value, (property, classmethod)))
}
#: Members of the protocol: its annotated attributes and what its body declares.
MEMBERS = sorted(set(ProblemContract.__annotations__) | set(DECLARED))
PROPERTIES = sorted(name for name, value in DECLARED.items() if isinstance(value, property))
METHODS = sorted(name for name in DECLARED if name not in PROPERTIES and name != "__call__")


CASES = [
    (AllenCahn1D, {}),
    (BiharmonicAnnulus, {"dim": 3}),
    (Burgers1D, {}),
    (HardCube, {"dim": 3}),
    (HJBLQG, {"dim": 2, "reference_samples": 64, "lateral_samples": 64}),
    (KdV1D, {}),
    (Poisson2D, {}),
    (ThreeBody, {"dim": 3}),
    (TwoBody, {"dim": 3}),
    (Sine1D, {"dim": 1}),  # a user's subclass (tests/conftest.py)
]


def build(cls: type[PINNProblem], kwargs: dict) -> PINNProblem:
    dim = kwargs.get("dim", 1 if cls is not Poisson2D else 2)
    time = int(cls.time_dependent)
    return cls(**kwargs, net=MLP(dim + time, width=4, depth=1, seed=0), n_eval=0)


def test_the_member_list_is_the_documented_one():
    """Guards the introspection above (and agrees with ``typing``'s own list)."""
    assert {"dim", "net", "collocation", "_trainer", "device", "model", "__call__",
            "prepare_batch", "derivatives", "overrides", "compute_loss"} <= set(MEMBERS)
    assert {"device", "dtype", "model"} == set(PROPERTIES)
    assert {"sample_interior", "residual", "prepare_batch", "overrides"} <= set(METHODS)
    if hasattr(typing, "_get_protocol_attrs"):  # private: only where it exists
        assert set(MEMBERS) == set(typing._get_protocol_attrs(ProblemContract))


@pytest.mark.parametrize("cls,kwargs", CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_every_problem_is_an_instance_of_the_contract(cls, kwargs):
    problem = build(cls, kwargs)
    missing = [name for name in MEMBERS if not hasattr(problem, name)]
    assert missing == []
    assert isinstance(problem, CheckableContract)


@pytest.mark.parametrize("cls,kwargs", CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_every_method_is_callable_as_the_contract_declares(cls, kwargs):
    problem = build(cls, kwargs)
    for name in METHODS:
        declared = inspect.signature(getattr(ProblemContract, name))
        params = [p for p in declared.parameters.values() if p.name not in ("self", "cls")]
        args = [p.name for p in params if p.default is inspect.Parameter.empty]
        keywords = {p.name: None for p in params if p.default is not inspect.Parameter.empty}
        actual = inspect.signature(getattr(problem, name))
        try:
            actual.bind(*args, **keywords)
        except TypeError as err:
            pytest.fail(f"{cls.__name__}.{name}{actual} does not take {declared}: {err}")
    for name in PROPERTIES:
        assert isinstance(inspect.getattr_static(type(problem), name), property), name
    assert isinstance(inspect.getattr_static(type(problem), "overrides"), classmethod)
    assert callable(problem)


def test_objects_lacking_a_member_are_not_instances():
    """The check above can fail: a module, or a problem without one member, is rejected."""
    assert not isinstance(nn.Linear(2, 2), CheckableContract)
    problem = build(Poisson2D, {})
    assert isinstance(problem, CheckableContract)
    del problem.held_out  # an instance attribute the collaborators read
    assert not isinstance(problem, CheckableContract)


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports (absolute ``import``/``from`` statements)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_modules_typed_against_the_contract_do_not_import_the_problem():
    users = [path for path in PACKAGE.rglob("*.py")
             if "sdze_lightning.contract" in imported_modules(path)]
    names = {path.stem for path in users}
    # The collaborators the contract module's docstring names.
    assert {"collocation", "loss", "stepping", "evaluation", "resume", "output_fit",
            "input_checks"} <= names, names
    for path in users:
        if path.stem == "problem":
            continue
        bad = {m for m in imported_modules(path) if m in ("sdze_lightning.problem",
                                                           "sdze_lightning.PINNProblem")}
        assert bad == set(), path
