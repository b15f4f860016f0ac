"""The method protocol: declared traits, enforced abstract methods, the step's request.

What the problem needs to know about a method's class is one :class:`MethodTraits`
declared on the class; the zeroth-order protocol's abstract methods are enforced at
construction; a zeroth-order step receives everything, the data-parallel reduction
included, as one :class:`ZerothOrderStep` (nothing is set on the method from outside); a
first-order method that declares extra needs gets them as one :class:`FirstOrderStep`.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from sdze_lightning.methods import SDZE, Adam, FusedAdafactor, MeZO, PDEAware
from sdze_lightning.methods.base import (
    FirstOrderStep,
    MethodTraits,
    traits_of,
    withholds_nonfinite,
)
from sdze_lightning.methods.zeroth_order import (
    TwoPointOptimizer,
    ZerothOrderOptimizer,
    ZerothOrderStep,
)
from sdze_lightning.nn import MLP

SHIPPED = {
    SDZE: MethodTraits(zeroth_order=True, takes_module=True, withholds_nonfinite_step=True),
    MeZO: MethodTraits(zeroth_order=True, takes_module=True, withholds_nonfinite_step=True),
    Adam: MethodTraits(takes_module=True, withholds_nonfinite_step=True),
    PDEAware: MethodTraits(needs_residuals=True, withholds_nonfinite_step=True),
    FusedAdafactor: MethodTraits(takes_module=True, needs_forward_only_estimator=True,
                                 withholds_nonfinite_step=True, reduces_input_layer=True),
}


@pytest.mark.parametrize("cls", list(SHIPPED), ids=lambda c: c.__name__)
def test_every_shipped_method_declares_its_traits(cls):
    assert traits_of(cls) == SHIPPED[cls]
    # a partial (what Hydra builds) and an instance read the same declaration
    assert traits_of(functools.partial(functools.partial(cls, lr=1e-3))) == SHIPPED[cls]


def test_undeclared_optimizers_are_plain_first_order():
    assert traits_of(torch.optim.Adam) == MethodTraits(withholds_nonfinite_step=True)
    assert traits_of(torch.optim.RMSprop) == MethodTraits()

    class OwnAdam(torch.optim.Adam):  # may override step: not known to withhold
        pass

    assert not withholds_nonfinite(OwnAdam)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    assert traits_of(opt).withholds_nonfinite_step and not traits_of(opt).zeroth_order


class NoUpdate(TwoPointOptimizer):
    def __init__(self, module):
        super().__init__(module, {"lr": 1e-3}, eps=1e-3, queries=1, seed=0, crns=True)

    def _prepare(self, step):
        pass

    def _perturb(self, query, sign):
        pass


def test_abstract_methods_are_enforced():
    with pytest.raises(TypeError, match="abstract.*_update"):
        NoUpdate(nn.Linear(2, 1))

    class Neither(ZerothOrderOptimizer):
        pass

    with pytest.raises(TypeError, match="abstract.*zo_step"):
        Neither(nn.Linear(2, 1), {"lr": 0.0})

    class OwnStep(ZerothOrderOptimizer):  # the protocol allows overriding step instead
        def step(self, closure=None, **kwargs):
            return torch.zeros(())

    OwnStep(nn.Linear(2, 1), {"lr": 0.0}).step()


def test_the_reduction_comes_with_the_step():
    """``reduce`` combines the 2 q loss values before the update; without it (one
    process) they are used as evaluated. Nothing is stored on the method for it."""
    net = MLP(3, width=4, depth=1, seed=0).double()
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def loss_at(key):
        return net(x).square().mean()

    seen = []

    def reduce(values):
        seen.append(values.clone())
        return values * 2

    plain = SDZE(net, lr=1e-2, rank=2, queries=2, seed=0)
    plain.zo_step(ZerothOrderStep(loss_at, step_index=0))
    first = plain.last_values.clone()
    plain.fold()
    net2 = MLP(3, width=4, depth=1, seed=0).double()

    def loss_at2(key):
        return net2(x).square().mean()

    reduced = SDZE(net2, lr=1e-2, rank=2, queries=2, seed=0)
    reduced.step(loss_at=loss_at2, step_index=0, reduce=reduce)
    assert len(seen) == 1 and torch.equal(seen[0], first)
    assert torch.equal(reduced.last_values, 2 * first)
    assert not hasattr(reduced, "reducer")


def _pde_aware_step(use_request: bool) -> list[torch.Tensor]:
    net = MLP(2, width=4, depth=1, seed=0).double()
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    opt = PDEAware(net.parameters(), lr=1e-2)

    def residuals(rows=None):
        r = net(x if rows is None else x[rows]).squeeze(-1) - 1.0
        return r, None

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = residuals()[0].square().mean()
        loss.backward()
        return loss

    if use_request:
        opt.step(closure, request=FirstOrderStep(closure, 0, residuals=residuals, points=6))
    else:
        opt.step(closure, residuals=residuals, points=6)
    return [p.detach().clone() for p in net.parameters()]


def test_a_first_order_request_is_the_same_step_as_its_arguments():
    """``pde_aware`` (and ``fused_adafactor``) read a :class:`FirstOrderStep` as the
    arguments it carries: the same update bit for bit."""
    before = [p.detach().clone() for p in MLP(2, width=4, depth=1, seed=0).double().parameters()]
    by_request, by_arguments = _pde_aware_step(True), _pde_aware_step(False)
    assert any(not torch.equal(a, b) for a, b in zip(by_request, before, strict=True))
    for a, b in zip(by_request, by_arguments, strict=True):
        assert torch.equal(a, b)
    fused_by = []
    for use_request in (True, False):
        net = MLP(3, width=4, depth=1, seed=0).double()
        x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        opt = FusedAdafactor(net, lr=1e-2)

        def closure(net=net, x=x, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss = net(x).square().mean()
            loss.backward()
            return loss

        with net.first_layer_cache():
            if use_request:
                opt.step(closure, request=FirstOrderStep(closure, 0))
            else:
                opt.step(closure)
        fused_by.append([p.detach().clone() for p in net.parameters()])
    start = [p.detach() for p in MLP(3, width=4, depth=1, seed=0).double().parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(fused_by[0], start, strict=True))
    for a, b in zip(*fused_by, strict=True):
        assert torch.equal(a, b)
