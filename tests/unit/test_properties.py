"""Property tests (hypothesis): the estimators' shape/dtype contract, and implicit
low-rank perturbation = explicit perturbation across random layer shapes.

``derandomize=True``: the examples come from a fixed seed, so a run is reproducible;
``max_examples`` stays small so the module runs in well under 30 s.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sdze_lightning.directions import Directions
from sdze_lightning.estimators import ESTIMATORS, build_estimator
from sdze_lightning.methods import SDZE
from sdze_lightning.model_fn import ModelFunction
from sdze_lightning.nn import MLP
from sdze_lightning.nn.perturb import (
    LowRankDelta,
    attach_hooks,
    delta_of,
    linear_forward,
    linear_layers,
    set_offset,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: 1 thread is faster here

DTYPES = st.sampled_from([torch.float32, torch.float64])
#: Few directions per estimator: the contract does not depend on the count.
SMALL = {"exact": {}, "sdgd": {"num_directions": 2}, "hte": {"num_directions": 2},
         "stein": {"num_directions": 4}, "fd": {"num_directions": 2},
         "taylor": {"num_directions": 2}}
FAST = settings(max_examples=30, deadline=None, derandomize=True, database=None)


def tol(dtype: torch.dtype) -> dict:
    # O(1) values from sums of at most ~20 products: float64 rounding stays < 1e-13, float32
    # (unit roundoff 6e-8) < 1e-5
    return {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else \
        {"rtol": 1e-5, "atol": 1e-5}


def test_every_registered_estimator_is_covered():
    assert set(SMALL) == set(ESTIMATORS)


# ------------------------------------------------------------------ estimators
@FAST
@given(name=st.sampled_from(sorted(ESTIMATORS)), n=st.integers(1, 5), d=st.integers(1, 4),
       time=st.booleans(), dtype=DTYPES, seed=st.integers(0, 2**31 - 1))
def test_estimator_shape_dtype_contract(name, n, d, time, dtype, seed):
    est = build_estimator(name, **SMALL[name])
    ops = set(est.operators) - (set() if time else {"dt"})
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d + int(time), generator=gen, dtype=dtype)
    model = ModelFunction(MLP(d + int(time), width=6, depth=2, seed=seed % 1000).to(dtype))
    rng = torch.random.get_rng_state()
    out = est.estimate(model, x, ops, torch.Generator().manual_seed(seed), d)
    assert set(out) == ops
    for op, value in out.items():
        assert value.shape == ((n, d) if op == "grad" else (n,)), op
        assert value.dtype == dtype, op
        assert bool(torch.isfinite(value).all()), op
    # the generator is the only source of randomness (CRNS): same seed, same bits
    again = est.estimate(model, x, ops, torch.Generator().manual_seed(seed), d)
    assert all(torch.equal(out[op], again[op]) for op in ops)
    assert torch.equal(rng, torch.random.get_rng_state())


# -------------------------------------------------------- implicit vs explicit offsets
def random_delta(m: int, n: int, rank: int, bias: bool, dtype, gen) -> LowRankDelta:
    ra, rb = min(rank, m), min(rank, n)
    a = torch.linalg.qr(torch.randn(m, ra, generator=gen, dtype=dtype))[0]
    b = torch.linalg.qr(torch.randn(n, rb, generator=gen, dtype=dtype))[0]
    c = torch.randn(ra, rb, generator=gen, dtype=dtype)
    cb = torch.randn(ra, generator=gen, dtype=dtype) if bias else None
    return LowRankDelta(a, b, c, cb)


def explicit(net: nn.Module) -> nn.Module:
    """Copy with every offset written into the weights."""
    out = copy.deepcopy(net)  # the copy's layers carry no offsets (they are the net's)
    with torch.no_grad():
        for source, layer in zip(linear_layers(net), linear_layers(out), strict=True):
            delta = delta_of(source)
            if delta is not None:
                layer.weight += delta.A @ delta.C @ delta.B.T
                if delta.cb is not None:
                    layer.bias += delta.A @ delta.cb
    return out


@FAST
@given(m=st.integers(1, 9), n=st.integers(1, 9), rank=st.integers(1, 6), bias=st.booleans(),
       lead=st.lists(st.integers(1, 3), max_size=2), dtype=DTYPES, seed=st.integers(0, 10**6))
def test_linear_layer_offset(m, n, rank, bias, lead, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    layer = nn.utils.skip_init(nn.Linear, n, m, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(m, n, generator=gen, dtype=dtype))
        if bias:
            layer.bias.copy_(torch.randn(m, generator=gen, dtype=dtype))
    set_offset(layer, random_delta(m, n, rank, bias, dtype, gen))
    x = torch.randn(*lead, 4, n, generator=gen, dtype=dtype)  # any leading batch shape
    torch.testing.assert_close(linear_forward(layer, x), explicit(layer)(x), **tol(dtype))
    # columns of the offset (coordinate directions) are those of the explicit matrix
    index = torch.randint(0, n, (3,), generator=gen)
    delta = delta_of(layer)
    full = delta.A @ delta.C @ delta.B.T
    torch.testing.assert_close(delta.columns(index), full[:, index].T, **tol(dtype))


def assert_same_function(implicit, explicit32, exact64, dtype) -> None:
    """float64: equal to rounding. float32: the implicit offset is as accurate as writing the
    offset into the weights; both are compared with the float64 value, since 3rd/4th-order
    jets cancel large terms and neither float32 result is close to 1e-5 there."""
    if dtype == torch.float64:
        torch.testing.assert_close(implicit, exact64, **tol(dtype))
        return
    err_implicit = float((implicit.double() - exact64).abs().max())
    err_explicit = float((explicit32.double() - exact64).abs().max())
    assert err_implicit <= 10 * err_explicit + 1e-6 * (1 + float(exact64.abs().max()))


@FAST
@given(d=st.integers(1, 7), width=st.integers(1, 8), depth=st.integers(1, 3),
       rank=st.integers(1, 5), activation=st.sampled_from(["tanh", "sin"]), dtype=DTYPES,
       coordinate=st.booleans(), seed=st.integers(0, 10**6))
def test_mlp_implicit_paths_equal_explicit_copy(d, width, depth, rank, activation, dtype,
                                               coordinate, seed):
    gen = torch.Generator().manual_seed(seed)
    net64 = MLP(d, width=width, depth=depth, activation=activation, seed=seed % 997).double()
    for layer in net64.layers:
        set_offset(layer, random_delta(*layer.weight.shape, rank, True, torch.float64, gen))
    exact = explicit(net64)
    net = copy.deepcopy(net64).to(dtype)
    for layer, layer64 in zip(net.layers, net64.layers, strict=True):
        delta = delta_of(layer64)
        set_offset(layer, LowRankDelta(delta.A.to(dtype), delta.B.to(dtype), delta.C.to(dtype),
                                       delta.cb.to(dtype)))
    ref = explicit(net)
    x64 = torch.randn(5, d, generator=gen, dtype=torch.float64)
    x = x64.to(dtype)
    dirs64 = (Directions(d, index=torch.randint(0, d, (3,), generator=gen)) if coordinate else
              Directions(d, dense=torch.randn(3, d, generator=gen, dtype=torch.float64)))
    dirs = dirs64 if coordinate else Directions(d, dense=dirs64.dense.to(dtype))
    with torch.no_grad(), net.first_layer_cache():
        for _ in range(2):  # the second pass reuses the cached W x and x B
            assert_same_function(net(x), ref(x), exact(x64), dtype)
            ts = [-0.3, 0.2]
            assert_same_function(net.line(x, dirs, ts), ref.line(x, dirs, ts),
                                 exact.line(x64, dirs64, ts), dtype)
            for a, b, c in zip(net.jets(x, dirs, 4), ref.jets(x, dirs, 4),
                               exact.jets(x64, dirs64, 4), strict=True):
                assert_same_function(a, b, c, dtype)


@FAST
@given(sizes=st.lists(st.integers(1, 8), min_size=2, max_size=4), rank=st.integers(1, 4),
       bias=st.booleans(), dtype=DTYPES, seed=st.integers(0, 10**6))
def test_hooked_network_equals_explicit_copy(sizes, rank, bias, dtype, seed):
    """Any nn.Linear network (not an MLP of this library) gets the offset through hooks."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b, bias=bias), nn.Tanh()]
    net = nn.Sequential(*layers[:-1]).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    handles = attach_hooks(net)
    for layer in linear_layers(net):
        set_offset(layer, random_delta(*layer.weight.shape, rank, bias, dtype, gen))
    x = torch.randn(4, sizes[0], generator=gen, dtype=dtype)
    ref = explicit(net)
    for h in handles:
        h.remove()
    # Without its hooks the network ignores the offsets: it must differ from the copy, or
    # the comparison below could not tell an applied offset from an ignored one (the
    # last layer's offset A C B^T h is nonzero for almost every draw).
    assert not torch.equal(net(x), ref(x))
    handles = attach_hooks(net)
    torch.testing.assert_close(net(x), ref(x), **tol(dtype))
    for h in handles:
        h.remove()


@FAST
@given(d=st.integers(1, 6), width=st.integers(1, 7), depth=st.integers(1, 3),
       rank=st.integers(1, 4), queries=st.integers(1, 3), sign=st.sampled_from([1, -1]),
       seed=st.integers(0, 10**6))
def test_sdze_perturbation_equals_explicit_parameters(d, width, depth, rank, queries, sign,
                                                      seed):
    """SDZE's evaluation at c + sign eps u_j is the network with W + A (C + sign eps U_j) B^T."""
    dtype = torch.float64
    gen = torch.Generator().manual_seed(seed)
    net = MLP(d, width=width, depth=depth, seed=seed % 991).to(dtype)
    opt = SDZE(net, rank=rank, eps=0.1, queries=queries, seed=seed)
    opt._prepare(0)
    for i in range(len(opt.layers)):
        state = opt.layer_state(i)
        state["coords"] = torch.randn(state["coords"].shape, generator=gen, dtype=dtype)
    j = int(torch.randint(0, queries, (1,), generator=gen))
    opt._perturb(j, sign)
    x = torch.randn(6, d, generator=gen, dtype=dtype)
    got = net(x)
    ref = copy.deepcopy(net)
    with torch.no_grad():
        for i, (layer, sub) in enumerate(zip(linear_layers(ref), opt.subspaces(), strict=True)):
            set_offset(layer, None)
            core, cb = sub.split(opt.layer_state(i)["coords"] + sign * 0.1 * opt._directions[j][i])
            layer.weight += sub.A @ core @ sub.B.T
            layer.bias += sub.A @ cb
    torch.testing.assert_close(got, ref(x), **tol(dtype))
    opt._perturb(None, 0)  # back at the unperturbed point: offset = coordinates only
    torch.testing.assert_close(net(x), explicit(net)(x), **tol(dtype))
