"""Spatial derivative estimators: unbiasedness, seeding, graphs, jets.

Statistical tolerance. An estimator called ``R`` times with one generator gives
``R`` independent estimates (the generator advances). Their mean has standard
error ``SE = s / sqrt(R)`` with ``s`` the sample standard deviation; for an
unbiased estimator ``(mean - exact) / SE`` is close to standard normal
(``R >= 100``), so ``|mean - exact| <= 4 SE`` fails with probability ~6e-5 per
component. A small absolute allowance covers what the standard error does not:
float64 round-off of exact computations (``1e-9``) and, for ``fd``, the
central-difference truncation bias (``1e-4`` relative; the per-direction
truncation error measured in ``test_fd_matches_taylor_jets`` is below it). Each
check also asserts ``4 SE <= 0.5 * size`` of the quantity (max absolute value, or
max row norm of the gradient), so that a bias of half its size would be caught.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_benchmark

from sdze_lightning.constraints import BallConstraint
from sdze_lightning.directions import Directions
from sdze_lightning.estimators import OPERATORS, build_estimator
from sdze_lightning.estimators.directional import sample_coordinates, sample_directions
from sdze_lightning.estimators.exact import ExactEstimator
from sdze_lightning.estimators.fd import FiniteDifferenceEstimator, default_step
from sdze_lightning.estimators.hte import directional_autodiff
from sdze_lightning.estimators.stein import SteinEstimator, gradient_norm2_ustat
from sdze_lightning.estimators.taylor import TaylorEstimator
from sdze_lightning.model_fn import ModelFunction
from sdze_lightning.nn.mlp import MLP

REPO = Path(__file__).resolve().parents[2]
ALL_OPS = tuple(OPERATORS)
RANDOMIZED = [
    ("sdgd", {}),
    ("hte", {}),
    ("hte", {"distribution": "gaussian"}),
    ("taylor", {}),
    ("taylor", {"distribution": "rademacher"}),
    ("taylor", {"distribution": "gaussian"}),
    ("fd", {}),
    ("fd", {"distribution": "rademacher"}),
    ("fd", {"distribution": "gaussian"}),
]
IDS = [f"{n}-{kw.get('distribution', 'default')}" for n, kw in RANDOMIZED]
FORWARD_ONLY = [
    ("stein", {"num_directions": 8}),
    ("fd", {"num_directions": 3, "distribution": "gaussian"}),
    ("taylor", {"num_directions": 3}),
]


def make_model(
    d: int, time: bool, constraint: bool, seed: int = 1, width: int = 16
) -> ModelFunction:
    net = MLP(d + int(time), width=width, depth=2, seed=seed).double()
    return ModelFunction(net, BallConstraint(1.5, spatial_dim=d) if constraint else None)


def make_points(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (2 * torch.rand(n, dim, generator=gen, dtype=torch.float64) - 1) / math.sqrt(dim)


def exact(model: ModelFunction, x: torch.Tensor, ops, d: int) -> dict[str, torch.Tensor]:
    return ExactEstimator().estimate(model, x, ops, torch.Generator(), d)


def repeat(est, model, x, ops, d, reps: int, seed: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    runs = [est.estimate(model, x, ops, gen, d) for _ in range(reps)]
    return {op: torch.stack([r[op] for r in runs]) for op in ops}


def assert_unbiased(samples, reference, atol_rel: float = 1e-9, power: float = 0.5) -> None:
    """``|mean - ref| <= 4 SE + atol`` per component, and ``4 SE <= power * scale``."""
    for op, s in samples.items():
        ref = reference[op]
        reps = s.shape[0]
        mean, se = s.mean(0), s.std(0) / math.sqrt(reps)
        # Size of the quantity: max |value| (per point), or max row norm for vectors.
        scale = (ref.norm(dim=1) if ref.dim() == 2 else ref.abs()).max().item() + 1e-3
        err = (mean - ref).abs()
        tol = 4 * se + atol_rel * (1 + scale)
        assert bool((err <= tol).all()), (
            f"{op}: max |mean - exact| = {err.max():.3e}, max z = {(err / se).max():.2f}"
        )
        assert 4 * se.max().item() <= power * scale, f"{op}: test has no power (SE {se.max():.2e})"


# --------------------------------------------------------------------------- unbiasedness
SETUPS = {
    # d, time coordinate, hard constraint, operators, directions K, repeats R
    "d6-time-ball": (6, True, True, ALL_OPS, 3, 100),
    "d2-time": (2, True, False, ALL_OPS, 4, 100),
    "d50": (50, False, False, ("u", "grad", "grad_norm2", "laplacian"), 16, 100),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (10x on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(SETUPS))
def setup(request):
    d, time, constraint, ops, k, reps = SETUPS[request.param]
    model = make_model(d, time, constraint)
    x = make_points(3, d + int(time))
    return model, x, ops, d, k, reps, exact(model, x, ops, d)


def project_gradient(values: dict[str, torch.Tensor], d: int) -> dict[str, torch.Tensor]:
    """Replace ``grad`` (N, d) by 4 fixed random linear functionals of it, (N, 4).

    A coordinate-sampled gradient hits each component in only ``R K / d`` of the
    ``R`` repeats: the sample SE of a single component is then unreliable (a
    skewed, mostly-zero distribution), while a functional mixing all components
    is close to normal. Unbiasedness of every functional is unbiasedness of the vector.
    """
    w = torch.randn(d, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = dict(values)
    if "grad" in out:
        out["grad"] = out["grad"] @ w
    return out


@pytest.mark.parametrize(("name", "kwargs"), RANDOMIZED, ids=IDS)
def test_mean_matches_autodiff(setup, name, kwargs):
    model, x, ops, d, k, reps, ref = setup
    est = build_estimator(name, num_directions=k, **kwargs)
    samples = repeat(est, model, x, ops, d, reps)
    if getattr(est, "distribution", "coordinate") == "coordinate":
        samples, ref = project_gradient(samples, d), project_gradient(ref, d)
    # fd: allowance for the O(h^2) truncation bias (see the module docstring).
    assert_unbiased(samples, ref, atol_rel=1e-4 if name == "fd" else 1e-9)


def gauss_hermite_smoothed(model, x, d, sigma, nodes: int = 12):
    """``E f(x + delta)``, ``delta ~ N(0, sigma^2 I_d)``, and derivatives by Gauss-Hermite.

    Derivatives of the smoothed model are smoothed derivatives of ``f``, computed
    exactly by autodiff at the quadrature nodes (error ~1e-12 for these smooth nets).
    """
    z, w = np.polynomial.hermite.hermgauss(nodes)
    grid = torch.cartesian_prod(*[torch.tensor(z)] * d).reshape(-1, d)
    wts = torch.tensor(w)
    weights = torch.ones(grid.shape[0], dtype=torch.float64)
    idx = torch.cartesian_prod(*[torch.arange(nodes)] * d).reshape(-1, d)
    for j in range(d):
        weights = weights * wts[idx[:, j]]
    weights = weights / math.pi ** (d / 2)
    shift = torch.zeros(grid.shape[0], x.shape[1], dtype=torch.float64)
    shift[:, :d] = math.sqrt(2) * sigma * grid
    pts = (x[:, None, :] + shift[None]).reshape(-1, x.shape[1])
    vals = exact(model, pts, ("u", "grad", "laplacian"), d)
    n = x.shape[0]
    smooth = {
        k: torch.einsum("q,nq...->n...", weights, v.reshape(n, grid.shape[0], *v.shape[1:]))
        for k, v in vals.items()
    }
    smooth["grad_norm2"] = (smooth["grad"] ** 2).sum(1)
    return smooth


@pytest.mark.parametrize(("variant", "sigma"), [("vanilla", 0.5), ("cv", 0.3), ("antithetic", 0.1)])
@pytest.mark.parametrize("value", ["plain", "smoothed"])
def test_stein_mean_matches_smoothed_model(variant, sigma, value):
    """Stein estimates the derivatives of u = E f(x + delta), not of f: the reference is that."""
    d = 3
    model = make_model(d, time=True, constraint=True)
    x = make_points(3, d + 1)
    ref = gauss_hermite_smoothed(model, x, d, sigma)
    plain = exact(model, x, ("u", "dt"), d)
    ref["dt"] = plain["dt"]  # time is not smoothed: dt of f at x
    ref["u"] = plain["u"] if value == "plain" else ref["u"]
    est = SteinEstimator(num_directions=512, sigma=sigma, variant=variant, value=value)
    ops = ("u", "grad", "grad_norm2", "laplacian", "dt")
    samples = repeat(est, model, x, ops, d, reps=100)
    # dt is a central difference (bias ~ h^2 f''' ~ 1e-11): covered by the 1e-9 allowance.
    assert_unbiased(samples, ref, atol_rel=1e-9)


def test_stein_variance_reduction_order():
    """He et al. section 4.3: antithetic < cv < vanilla in Laplacian variance at sigma = 0.1."""
    d = 20
    model = make_model(d, time=False, constraint=False)
    x = make_points(4, d)
    var = {}
    for variant in ("vanilla", "cv", "antithetic"):
        est = SteinEstimator(num_directions=64, sigma=0.1, variant=variant)
        s = repeat(est, model, x, ("laplacian",), d, reps=40)["laplacian"]
        var[variant] = s.var(0).mean().item()
    assert var["antithetic"] < var["cv"] < var["vanilla"]


def brute_ustat(a: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    k = a.shape[0]
    pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
    return sum(a[i] * a[j] * (xi[i] @ xi[j]) for i, j in pairs) / (k * (k - 1))


@pytest.mark.parametrize("points", [5, 40])  # N <= K: (a^T xi) route; N > K: Gram route
def test_ustat_paths_agree(points):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, points, generator=gen, dtype=torch.float64)
    xi = torch.randn(16, 7, generator=gen, dtype=torch.float64)
    brute = brute_ustat(a, xi)
    torch.testing.assert_close(gradient_norm2_ustat(a, xi), brute)
    torch.testing.assert_close(gradient_norm2_ustat(a, xi, a.T @ xi / 16), brute)


# ---------------------------------------------------------------------------- Taylor jets
@pytest.mark.parametrize("constraint", [False, True])
@pytest.mark.parametrize("kind", ["gaussian", "coordinate"])
def test_taylor_jets_match_autodiff(constraint, kind):
    """Hand-written Taylor mode vs nested reverse-mode autodiff, float64, orders 1-4."""
    d = 7
    model = make_model(d, time=True, constraint=constraint, width=24)
    x = make_points(5, d + 1)
    dirs = sample_directions(kind, 5, d + 1, d, torch.Generator().manual_seed(3), torch.float64)
    u, dv = TaylorEstimator(5, kind).directional(model, x, dirs, {1, 2, 3, 4})
    v = dirs.materialize(torch.float64, x.device)
    torch.testing.assert_close(u, model(x), rtol=0, atol=1e-14)
    for k in range(1, 5):
        ref = directional_autodiff(model, x, v, k)
        scale = ref.abs().max().item()
        assert (dv[k] - ref).abs().max().item() <= 1e-10 * max(1.0, scale), k


@pytest.mark.parametrize("constraint", [False, True])
@pytest.mark.parametrize("kind", ["gaussian", "coordinate"])
@pytest.mark.parametrize("orders", [{2}, {1, 2}, {1, 2, 3}, {4}])
def test_taylor_summed_top_order_equals_the_mean_of_the_directions(constraint, kind, orders):
    """Carrying the highest order summed over the directions through the network (one row
    per point instead of K) gives the mean of the per-direction derivatives, the lower
    orders unchanged; float64, so only summation order differs (~1e-16 relative)."""
    d = 7
    model = make_model(d, time=True, constraint=constraint, width=24)
    x = make_points(5, d + 1)
    dirs = sample_directions(kind, 5, d + 1, d, torch.Generator().manual_seed(3), torch.float64)
    est = TaylorEstimator(5, kind)
    u, means = est.directional_means(model, x, dirs, orders)
    u_ref, per_direction = est.directional(model, x, dirs, orders)
    torch.testing.assert_close(u, u_ref, rtol=0, atol=0)
    for k in orders:
        ref = per_direction[k] if k == 1 else per_direction[k].mean(dim=0)
        assert means[k].shape == ref.shape, k
        torch.testing.assert_close(means[k], ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))
    # the network really carries one summed row: shape (1, N, out) for the top order
    jet = model.net.jets(x, dirs, max(orders), sum_top=True)
    if max(orders) >= 2:
        assert jet[-1].shape == (1, 5, 1) and jet[1].shape == (5, 5, 1)
    # the generic route (torch.func.jvp, any network) agrees
    if constraint:
        generic = ModelFunction(model.net, compose=lambda p, out: model.constraint.value(p) * out)
        assert not generic.fast
        _, g = est.directional_means(generic, x, dirs, orders)
        for k in orders:
            torch.testing.assert_close(g[k], means[k], rtol=1e-10, atol=1e-10)


def test_taylor_generic_path_matches_fast_path():
    """The torch.func.jvp fallback (any network) agrees with the MLP fast path."""
    d = 5
    fast = make_model(d, time=False, constraint=True)
    generic = ModelFunction(fast.net, compose=lambda x, out: fast.constraint.value(x) * out)
    assert fast.fast and not generic.fast
    x = make_points(3, d)
    for kind in ("coordinate", "rademacher"):
        dirs = sample_directions(kind, 3, d, d, torch.Generator().manual_seed(0), torch.float64)
        a = TaylorEstimator(3, kind).directional(fast, x, dirs, {1, 2, 3, 4})[1]
        b = TaylorEstimator(3, kind).directional(generic, x, dirs, {1, 2, 3, 4})[1]
        for k in range(1, 5):
            torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12)
        fa = FiniteDifferenceEstimator(3, kind).directional(fast, x, dirs, {2})[1][2]
        fb = FiniteDifferenceEstimator(3, kind).directional(generic, x, dirs, {2})[1][2]
        # The two routes round W (x + h v) differently: eps |Wx| / h^2 ~ 1e-8.
        torch.testing.assert_close(fa, fb, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["coordinate", "rademacher", "gaussian"])
def test_fd_matches_taylor_jets(kind):
    """Per-direction central differences with the default steps vs exact jets (float64)."""
    d = 50
    model = make_model(d, time=False, constraint=True)
    x = make_points(4, d)
    dirs = sample_directions(kind, 16, d, d, torch.Generator().manual_seed(1), torch.float64)
    _, fd = FiniteDifferenceEstimator(16, kind).directional(model, x, dirs, {1, 2, 3, 4})
    _, ty = TaylorEstimator(16, kind).directional(model, x, dirs, {1, 2, 3, 4})
    for k in range(1, 5):
        scale = ty[k].abs().max().item()
        assert (fd[k] - ty[k]).abs().max().item() <= 1e-4 * (1 + scale), k


def test_default_steps():
    assert default_step(torch.float64, 2) == pytest.approx(2.22e-16**0.25, rel=1e-2)
    assert default_step(torch.float32, 4) == pytest.approx(1.19e-7 ** (1 / 6), rel=1e-2)
    est = FiniteDifferenceEstimator(step={2: 1e-3})
    assert est.step_for(torch.float64, 2) == 1e-3
    assert est.step_for(torch.float64, 4) == default_step(torch.float64, 4)
    assert FiniteDifferenceEstimator(step=0.01).step_for(torch.float32, 1) == 0.01
    with pytest.raises(ValueError, match="step"):
        FiniteDifferenceEstimator(step={5: 0.1})
    with pytest.raises(ValueError, match="step"):
        FiniteDifferenceEstimator(step=-1.0)


def test_fd_float32_laplacian_is_usable():
    """Default float32 steps: per-direction second derivatives within 1e-2 of exact jets."""
    d = 20
    model = make_model(d, time=False, constraint=False)
    model.net.float()
    x = make_points(4, d).float()
    dirs = sample_directions("rademacher", 8, d, d, torch.Generator().manual_seed(0), torch.float32)
    fd = FiniteDifferenceEstimator(8, "rademacher").directional(model, x, dirs, {2})[1][2]
    ty = TaylorEstimator(8, "rademacher").directional(model, x, dirs, {2})[1][2]
    assert (fd - ty).abs().max().item() <= 1e-2 * (1 + ty.abs().max().item())


# ------------------------------------------------------------------ seeding and the RNG
ALL_ESTIMATORS = [("exact", {})] + RANDOMIZED + [("stein", {"num_directions": 8})]


@pytest.mark.parametrize(("name", "kwargs"), ALL_ESTIMATORS)
def test_seed_locked_repeat_is_bit_identical_and_global_rng_untouched(name, kwargs):
    d = 4
    model = make_model(d, time=True, constraint=True)
    x = make_points(3, d + 1)
    est = build_estimator(name, **kwargs)
    ops = [op for op in ALL_OPS if op in est.operators]
    state = torch.random.get_rng_state()
    a = est.estimate(model, x, ops, torch.Generator().manual_seed(11), d)
    b = est.estimate(model, x, ops, torch.Generator().manual_seed(11), d)
    c = est.estimate(model, x, ops, torch.Generator().manual_seed(12), d)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert set(a) == set(ops)
    for op in ops:
        assert torch.equal(a[op], b[op]), op
    if name != "exact":
        assert any(not torch.equal(a[op], c[op]) for op in ops)


def test_directions_span_space_only():
    gen = torch.Generator().manual_seed(0)
    for kind in ("rademacher", "gaussian"):
        dirs = sample_directions(kind, 6, 5, 4, gen, torch.float64)
        assert dirs.dense.shape == (6, 5) and bool((dirs.dense[:, 4] == 0).all())
    coords = sample_directions("coordinate", 10, 5, 4, gen, torch.float64)
    assert sorted(coords.index.tolist()) == [0, 1, 2, 3]  # capped at d, without replacement


def test_sample_coordinates_distinct_and_uniform():
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(1000)
    for _ in range(400):
        j = sample_coordinates(10, 1000, gen)  # sparse path: no permutation of all d
        assert j.unique().numel() == 10 and int(j.min()) >= 0 and int(j.max()) < 1000
        counts[j] += 1
    # 4000 draws over 1000 cells: Poisson(4) counts; a chi-square with 999 dof has sd ~45.
    chi2 = ((counts - 4) ** 2 / 4).sum().item()
    assert abs(chi2 - 999) < 4 * math.sqrt(2 * 999)


# ---------------------------------------------------------------------- graphs and errors
@pytest.mark.parametrize(("name", "kwargs"), FORWARD_ONLY)
@pytest.mark.parametrize("generic", [False, True])
def test_forward_only_build_no_graph_under_no_grad(name, kwargs, generic):
    d = 4
    model = make_model(d, time=True, constraint=True)
    if generic:
        c = model.constraint
        model = ModelFunction(model.net, compose=lambda x, out: c.value(x) * out)
    x = make_points(3, d + 1)
    est = build_estimator(name, **kwargs)
    assert est.forward_only
    ops = [op for op in ALL_OPS if op in est.operators]
    with torch.no_grad():
        out = est.estimate(model, x, ops, torch.Generator().manual_seed(0), d)
    assert not any(v.requires_grad for v in out.values())
    if not generic:
        with torch.inference_mode():
            inference = est.estimate(model, x, ops, torch.Generator().manual_seed(0), d)
        # the same seed and arithmetic as under no_grad: the same numbers, bit for bit
        assert inference.keys() == out.keys()
        assert all(torch.equal(inference[op], out[op]) for op in out)


@pytest.mark.parametrize("name", ["hte", "sdgd"])
def test_autodiff_estimators_return_no_graph_under_no_grad(name):
    """hte/sdgd differentiate in x internally but hand back nothing attached to a graph."""
    d = 4
    model = make_model(d, time=True, constraint=True)
    est = build_estimator(name, num_directions=2)
    with torch.no_grad():
        out = est.estimate(model, make_points(3, d + 1), ALL_OPS, torch.Generator(), d)
    assert set(out) == set(ALL_OPS)
    assert not any(v.requires_grad for v in out.values())


@pytest.mark.parametrize("name", ["stein", "taylor", "fd", "hte", "sdgd"])
def test_differentiable_wrt_parameters_one_backward(name):
    """Adam over a forward-only estimate: one backward pass through the estimate."""
    d = 4
    model = make_model(d, time=True, constraint=True)
    x = make_points(8, d + 1)
    est = build_estimator(name, num_directions=8)
    ops = [op for op in ("u", "grad_norm2", "laplacian", "dt") if op in est.operators]
    opt = torch.optim.Adam(model.net.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.net.parameters()]
    out = est.estimate(model, x, ops, torch.Generator().manual_seed(0), d)
    assert all(out[op].requires_grad for op in ops)
    loss = (out["laplacian"] + out["dt"] - out["grad_norm2"] + out["u"]).square().mean()
    loss.backward()
    grads = [p.grad for p in model.net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.net.parameters(), strict=True))


def test_taylor_parameter_gradient_matches_exact():
    """With K = d coordinates the Taylor Laplacian is exact, and so is its parameter gradient."""
    d = 5
    model = make_model(d, time=False, constraint=True)
    x = make_points(4, d)
    grads = []
    for est in (ExactEstimator(), TaylorEstimator(num_directions=d)):
        model.net.zero_grad()
        lap = est.estimate(model, x, ("laplacian",), torch.Generator().manual_seed(0), d)
        lap["laplacian"].square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_unsupported_operators_fail_early():
    with pytest.raises(ValueError, match="biharmonic"):
        build_estimator("stein").check(("u", "laplacian", "biharmonic"))
    with pytest.raises(ValueError, match="third"):
        build_estimator("stein").check(("third",))
    with pytest.raises(ValueError, match="Unknown operator"):
        build_estimator("taylor").check(("curl",))
    with pytest.raises(ValueError, match="distribution"):
        build_estimator("hte", distribution="coordinate")
    with pytest.raises(ValueError, match="variant"):
        build_estimator("stein", variant="both")
    with pytest.raises(ValueError, match="num_directions"):
        build_estimator("fd", num_directions=0)
    model = make_model(3, time=False, constraint=False)
    for name in ("fd", "taylor", "stein", "hte", "sdgd"):
        with pytest.raises(ValueError, match="time coordinate"):
            build_estimator(name).estimate(model, make_points(2, 3), ("dt",), torch.Generator(), 3)


def test_problem_rejects_unsupported_estimator(tiny_problem):
    class Fourth(type(tiny_problem())):
        operators = ("u", "biharmonic")

    with pytest.raises(ValueError, match="estimator=stein cannot provide"):
        Fourth(dim=1, estimator="stein", net=MLP(1, width=8, depth=1))


# ------------------------------------------------------------------ halves and the problem
@pytest.mark.parametrize("name", ["sdgd", "hte", "stein", "fd", "taylor"])
def test_halves_and_unbiased_squared_residual(name, tiny_problem):
    est = build_estimator(name, num_directions=8)
    h1, h2 = est.halves()
    assert h1.num_directions == h2.num_directions == 4
    assert est.num_directions == 8
    problem = tiny_problem(estimator=est, squared_residual="unbiased")
    terms = problem.loss_terms(0)
    r1, r2 = problem.interior_residuals(0)
    assert r1.shape == r2.shape == (problem.n_interior,)
    # the interior term is mean(r1 r2) over the two halves' residuals (in 1D only stein's
    # halves differ: sdgd, hte, fd and taylor are exact there, so r1 = r2 for them)
    torch.testing.assert_close(terms["interior"], (r1 * r2).mean())


def test_unbiased_square_removes_variance_bias():
    """E[r1 r2] = r^2 while E[r_hat^2] = r^2 + Var: mean of products vs mean of squares."""
    d = 10
    model = make_model(d, time=False, constraint=False)
    x = make_points(2, d)
    target = exact(model, x, ("laplacian",), d)["laplacian"]
    est = build_estimator("taylor", num_directions=4, distribution="rademacher")
    h1, h2 = est.halves()
    gen = torch.Generator().manual_seed(0)
    prods, squares = [], []
    for _ in range(300):
        a = h1.estimate(model, x, ("laplacian",), gen, d)["laplacian"]
        b = h2.estimate(model, x, ("laplacian",), gen, d)["laplacian"]
        assert not torch.equal(a, b)  # the halves draw different directions
        prods.append(a * b)
        squares.append(((a + b) / 2) ** 2)
    prods, squares = torch.stack(prods), torch.stack(squares)
    se = prods.std(0) / math.sqrt(300)
    assert bool(((prods.mean(0) - target**2).abs() <= 4 * se).all())
    assert bool((squares.mean(0) > target**2).all())  # biased upwards by the variance


# --------------------------------------------------------------------- configs, benchmarks
@pytest.mark.parametrize("name", ["exact", "sdgd", "hte", "stein", "fd", "taylor"])
def test_hydra_configs_instantiate(name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    est = instantiate(OmegaConf.load(REPO / "configs" / "estimator" / f"{name}.yaml"))
    assert est.name == name
    assert type(est) is type(build_estimator(name))




def test_benchmark_smoke_modes(tmp_path):
    threads = torch.get_num_threads()
    rows = load_benchmark("stein_ablation").main(["--smoke", "--out", str(tmp_path)])
    assert {r["estimator"] for r in rows} >= {"stein-vanilla", "stein-cv", "stein-antithetic"}
    assert all(math.isfinite(r["lap_l1"]) for r in rows)
    # each row names the packaged estimator config it measures, on the packaged network
    row = next(r for r in rows if r["estimator"] == "stein-cv" and r["K"] == 16)
    assert {"estimator=stein", "estimator.variant=cv", "estimator.num_directions=16",
            "pde.dim=50", "trainer.precision=64-true"} <= set(row["overrides"])
    assert row["sdze_train_command"] == "sdze-train " + " ".join(row["overrides"])
    meta = json.loads((tmp_path / "stein_ablation_smoke.json").read_text())["meta"]
    assert meta["commit"] and meta["load_end"] is not None
    assert meta["command"].startswith("python benchmarks/stein_ablation.py --smoke")
    rows = load_benchmark("first_layer_scaling").main(["--smoke", "--out", str(tmp_path)])
    assert {r["estimator"] for r in rows} == {"fd", "stein", "taylor"}
    assert all(r["ratio"] > 0 for r in rows)
    # N and K are the smoke configs' pde.n_interior and estimator.num_directions
    assert {(r["N"], r["K"], r["threads"]) for r in rows} == {(8, 4, 1)}
    dense = next(r for r in rows if r["distribution"] == "rademacher" and r["d"] == 1000)
    assert dense["sdze_train_command"].startswith(
        "sdze-train pde=allen_cahn_twobody pde.dim=1000 estimator=fd "
        "estimator.distribution=rademacher")
    meta = json.loads((tmp_path / "first_layer_scaling_smoke.json").read_text())["meta"]
    assert meta["commit"] and meta["load_end"] is not None
    torch.set_num_threads(threads)


def test_first_layer_directions_are_column_lookups():
    """A coordinate direction's W v is the weight column (no product with a dense vector)."""
    net = MLP(1000, width=8, depth=1, seed=0).double()
    dirs = Directions(1000, index=torch.tensor([3, 999]))
    wv = net.first_layer_directions(dirs)
    torch.testing.assert_close(wv, net.layers[0].weight[:, [3, 999]].T)
