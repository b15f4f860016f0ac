"""The estimator base class: the template method's opening, declared parameters, repr, halves."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch

from sdze_lightning.estimators import ESTIMATORS, OPERATORS, Estimator, build_estimator
from sdze_lightning.estimators.base import Parameter
from sdze_lightning.estimators.exact import ExactEstimator
from sdze_lightning.estimators.fd import FiniteDifferenceEstimator
from sdze_lightning.estimators.hte import HutchinsonEstimator
from sdze_lightning.estimators.registry import estimator_class
from sdze_lightning.estimators.sdgd import SDGDEstimator
from sdze_lightning.estimators.stein import SteinEstimator
from sdze_lightning.estimators.taylor import TaylorEstimator
from sdze_lightning.model_fn import ModelFunction
from sdze_lightning.nn import MLP

NAMES = sorted(ESTIMATORS)
D = 3
UNKNOWN = f"Unknown operator(s) ['curl']; available: {sorted(OPERATORS)}."


def _model() -> ModelFunction:
    return ModelFunction(MLP(D, width=8, depth=2, seed=0).double())


def _points() -> torch.Tensor:
    return torch.rand(5, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _takes_directions(name: str) -> bool:
    return "num_directions" in inspect.signature(estimator_class(name)).parameters


RANDOMIZED = [name for name in NAMES if _takes_directions(name)]


def test_registry_has_deterministic_and_randomized_estimators():
    # the parametrisations below cover both kinds
    assert "exact" in NAMES and "exact" not in RANDOMIZED
    assert {"fd", "hte", "sdgd", "stein", "taylor"} <= set(RANDOMIZED)


# ------------------------------------------------------------------ the template method
@pytest.mark.parametrize("name", NAMES)
def test_unknown_operator_is_refused_before_any_work_with_the_same_message(name):
    calls = []

    def fn(z):
        calls.append(z)
        return z.sum(dim=1)

    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    with pytest.raises(ValueError) as info:
        build_estimator(name).estimate(fn, _points(), ("u", "curl"), gen, D)
    assert str(info.value) == UNKNOWN
    assert "\n" not in str(info.value)
    assert calls == []  # the solution was never evaluated
    assert torch.equal(gen.get_state(), state)  # nor a direction drawn


@pytest.mark.parametrize("name", NAMES)
def test_a_solution_that_is_not_callable_is_refused_by_every_estimator(name):
    with pytest.raises(TypeError, match="needs the solution as a function of the points"):
        build_estimator(name).estimate(_points(), _points(), ("u",), torch.Generator(), D)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("grad", [False, True])
def test_the_hook_gets_a_model_function_a_set_and_the_shared_first_layer(name, grad):
    cls = estimator_class(name)
    seen = {}

    def spy(self, model, x, ops, generator, spatial_dim):
        seen.update(model=model, ops=ops, cached=model.net._cache is not None)
        return cls._estimate(self, model, x, ops, generator, spatial_dim)

    est = build_estimator(name)
    est.__class__ = type(f"Spy{cls.__name__}", (cls,), {"_estimate": spy})
    net = MLP(D, width=8, depth=2, seed=0).double()
    with torch.set_grad_enabled(grad):
        out = est.estimate(net, _points(), ["u", "laplacian", "u"], torch.Generator(), D)
    assert isinstance(seen["model"], ModelFunction) and seen["model"].net is net
    assert seen["ops"] == {"u", "laplacian"} and isinstance(seen["ops"], set)
    assert seen["cached"] is cls.shares_first_layer
    assert net._cache is None  # left as found
    assert set(out) == {"u", "laplacian"}


def test_a_new_estimator_implements_only_the_hook():
    class ValueOnly(Estimator):
        name = "value_only"
        operators = frozenset({"u"})

        def _estimate(self, model, x, ops, generator, spatial_dim):
            return {"u": model(x)}

    x = _points()
    out = ValueOnly().estimate(lambda z: z.sum(dim=1), x, ("u",), torch.Generator(), D)
    assert torch.equal(out["u"], x.sum(dim=1))
    with pytest.raises(ValueError, match=r"^estimator=value_only cannot provide \['laplacian'\]"):
        ValueOnly().estimate(lambda z: z.sum(dim=1), x, ("laplacian",), torch.Generator(), D)


@pytest.mark.parametrize("name", NAMES)
def test_a_subclass_of_an_estimator_keeps_the_opening(name):
    sub = type("Sub", (estimator_class(name),), {})()
    with pytest.raises(ValueError) as info:
        sub.estimate(_model(), _points(), ("curl",), torch.Generator(), D)
    assert str(info.value) == UNKNOWN


def test_the_hook_is_abstract_unless_estimate_is_overridden():
    class Nothing(Estimator):
        name = "nothing"

    with pytest.raises(TypeError, match="_estimate"):
        Nothing()
    with pytest.raises(TypeError):
        Estimator()

    class OwnOpening(Estimator):
        name = "own"
        operators = frozenset({"u"})

        def estimate(self, model, x, ops, generator, spatial_dim):
            return {"u": model(x)}

    x = _points()
    assert torch.equal(OwnOpening().estimate(lambda z: 2 * z[:, 0], x, ("u",), None, D)["u"],
                       2 * x[:, 0])


# ------------------------------------------------------------------ parameters and repr
@pytest.mark.parametrize("name", NAMES)
def test_repr_lists_the_constructor_arguments_in_order(name):
    est = build_estimator(name)
    args = list(inspect.signature(type(est)).parameters)
    assert list(est.parameter_values()) == args
    shown = ", ".join(f"{arg}={getattr(est, arg)!r}" for arg in args)
    assert repr(est) == f"{type(est).__name__}({shown})"
    # the repr rebuilds the estimator
    namespace = {type(est).__name__: type(est)}
    again = eval(repr(est), namespace)  # noqa: S307
    assert type(again) is type(est) and again.parameter_values() == est.parameter_values()


def test_repr_text():
    assert repr(TaylorEstimator(4, "rademacher")) == (
        "TaylorEstimator(num_directions=4, distribution='rademacher')"
    )
    assert repr(HutchinsonEstimator()) == (
        "HutchinsonEstimator(num_directions=16, distribution='rademacher')"
    )
    assert repr(FiniteDifferenceEstimator(3, step={2: 1e-3})) == (
        "FiniteDifferenceEstimator(num_directions=3, distribution='coordinate', "
        "step={2: 0.001})"
    )
    assert repr(SteinEstimator(8, sigma=1, variant="cv")) == (
        "SteinEstimator(num_directions=8, sigma=1.0, variant='cv', value='plain')"
    )
    assert repr(SDGDEstimator(2, max_reverse_passes=None)) == (
        "SDGDEstimator(num_directions=2, max_reverse_passes=None)"
    )
    assert repr(ExactEstimator()) == "ExactEstimator(max_reverse_passes=20000)"


@pytest.mark.parametrize("name", RANDOMIZED)
@pytest.mark.parametrize("bad", [0, -3, 1.5, "abc", True, None])
def test_invalid_num_directions_is_refused_with_one_message(name, bad):
    cls = estimator_class(name)
    message = f"estimator.num_directions must be an integer >= {cls.min_directions}, got {bad!r}."
    with pytest.raises(ValueError) as info:
        build_estimator(name, num_directions=bad)
    assert str(info.value) == message
    est = build_estimator(name, num_directions=4)
    with pytest.raises(ValueError) as info:  # later assignments go through the same check
        est.num_directions = bad
    assert str(info.value) == message
    assert est.num_directions == 4


@pytest.mark.parametrize("name", RANDOMIZED)
def test_the_smallest_num_directions_is_accepted(name):
    cls = estimator_class(name)
    assert build_estimator(name, num_directions=cls.min_directions).num_directions == (
        cls.min_directions
    )
    with pytest.raises(ValueError, match="estimator.num_directions must be an integer"):
        build_estimator(name, num_directions=cls.min_directions - 1)


def test_stein_needs_two_directions_the_others_one():
    assert SteinEstimator.min_directions == 2
    assert {estimator_class(n).min_directions for n in RANDOMIZED if n != "stein"} == {1}


@pytest.mark.parametrize("name", ["exact", "sdgd"])
def test_max_reverse_passes_is_checked_in_one_place(name):
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError) as info:
            build_estimator(name, max_reverse_passes=bad)
        assert str(info.value) == (
            f"estimator.max_reverse_passes must be an integer >= 1, got {bad!r}."
        )
    assert build_estimator(name, max_reverse_passes=None).max_reverse_passes is None


def test_undeclared_parameters_read_as_their_default():
    assert ExactEstimator().num_directions is None
    assert TaylorEstimator().max_reverse_passes is None
    assert "num_directions" not in repr(ExactEstimator())


def test_parameters_survive_copies_and_pickles():
    est = SteinEstimator(6, sigma=0.3, variant="vanilla", value="smoothed")
    for other in (copy.copy(est), copy.deepcopy(est), pickle.loads(pickle.dumps(est))):
        assert other.parameter_values() == est.parameter_values()
        assert repr(other) == repr(est)


def test_a_declared_parameter_validates_every_assignment():
    def even(estimator, key, value):
        if value % 2:
            raise ValueError(f"{key} must be even, got {value!r}.")
        return int(value)

    class Custom(ExactEstimator):
        width = Parameter(even, default=0)

        def __init__(self, width: int = 2, max_reverse_passes: int | None = 5) -> None:
            super().__init__(max_reverse_passes)
            self.width = width

    assert Custom.parameter_names() == ("num_directions", "max_reverse_passes", "width")
    assert repr(Custom(4)) == "Custom(max_reverse_passes=5, width=4)"
    with pytest.raises(ValueError, match=r"^estimator.width must be even, got 3\.$"):
        Custom(3)
    assert isinstance(Custom.width, Parameter) and Custom.width.name == "width"


# ------------------------------------------------------------------ halves
@pytest.mark.parametrize("name", RANDOMIZED)
def test_halves_split_the_directions_of_every_randomized_estimator(name):
    cls = estimator_class(name)
    est = build_estimator(name, num_directions=9)
    h1, h2 = est.halves()
    assert h1 is not h2 and h1 is not est
    assert h1.num_directions == h2.num_directions == 4 and est.num_directions == 9
    assert h1.parameter_values() == {**est.parameter_values(), "num_directions": 4}
    smallest = 2 * cls.min_directions
    assert build_estimator(name, num_directions=smallest).halves()[0].num_directions == (
        cls.min_directions
    )
    with pytest.raises(ValueError, match=f"needs num_directions >= {smallest} for"):
        build_estimator(name, num_directions=smallest - 1).halves()


def test_deterministic_estimators_have_no_halves():
    with pytest.raises(ValueError, match="estimator=exact is deterministic"):
        ExactEstimator().halves()
