"""Callbacks and observability: metric, memory, variance monitor, plots, progress bar."""

from __future__ import annotations

import csv
import functools
import json
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import load_benchmark
from lightning.pytorch.loggers import CSVLogger
from sdze_lightning.callbacks import (
    EstimatorVarianceMonitor,
    MemoryMonitor,
    PINNProgressBar,
    SolutionPlot,
)
from sdze_lightning.callbacks.memory import optimizer_state_bytes, parameter_bytes, tensor_bytes
from sdze_lightning.callbacks.variance import total_variance
from torch import nn

from sdze_lightning import Derivatives, PINNProblem
from sdze_lightning.estimators.exact import ExactEstimator
from sdze_lightning.methods.zeroth_order import ZerothOrderOptimizer
from sdze_lightning.metrics import RelativeL2Error
from sdze_lightning.nn import MLP
from sdze_lightning.problems.poisson2d import Poisson2D
from sdze_lightning.seeding import Stream


class OneRandomCoordinate(ExactEstimator):
    """Laplacian from one random coordinate, scaled by d (SDGD with |J| = 1)."""

    name = "one_coordinate"

    def coordinates(self, spatial_dim, generator):
        j = int(torch.randint(spatial_dim, (1,), generator=generator, device=generator.device))
        return [j], float(spatial_dim)


def poisson(estimator=None, dtype=torch.float32, **kwargs):
    defaults = dict(
        net=MLP(2, width=16, depth=2, seed=0),
        estimator=estimator or ExactEstimator(),
        n_interior=32,
        n_boundary=16,
        n_eval=256,
        steps_per_epoch=4,
        method=functools.partial(torch.optim.Adam, lr=1e-2),
    )
    defaults.update(kwargs)
    return Poisson2D(**defaults).to(dtype)


def trainer(tmp_path, callbacks, max_steps=8, **kwargs):
    defaults = dict(
        max_steps=max_steps,
        max_epochs=-1,
        logger=CSVLogger(tmp_path, name="csv", version=""),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=any(isinstance(c, PINNProgressBar) for c in callbacks),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=2,
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def read_metrics(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    out: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if value not in ("", None):
                out.setdefault(key, []).append(float(value))
    return out


# ----------------------------------------------------------------------- metric
def test_relative_l2_matches_direct_computation():
    gen = torch.Generator().manual_seed(0)
    preds = torch.randn(1000, generator=gen)
    target = torch.randn(1000, generator=gen)
    metric = RelativeL2Error()
    for chunk in range(0, 1000, 300):  # uneven batches
        metric.update(preds[chunk : chunk + 300], target[chunk : chunk + 300])
    direct = torch.linalg.norm(preds.double() - target.double()) / torch.linalg.norm(
        target.double()
    )
    assert float(metric.compute()) == pytest.approx(float(direct), rel=1e-12)


def test_relative_l2_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        RelativeL2Error().update(torch.zeros(3, 1), torch.zeros(3))


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")  # merged, never updated
def test_relative_l2_two_ranks_equal_the_whole():
    gen = torch.Generator().manual_seed(1)
    preds, target = torch.randn(2, 500, generator=gen)
    whole = RelativeL2Error()
    whole.update(preds, target)
    # Rank 0 holds few points with large errors, rank 1 many with small ones:
    # averaging per-rank ratios would be wrong, summing the states is right.
    ranks = [RelativeL2Error(), RelativeL2Error()]
    ranks[0].update(preds[:50] * 3, target[:50])
    ranks[1].update(preds[50:], target[50:])
    both = RelativeL2Error()
    both.update(torch.cat([preds[:50] * 3, preds[50:]]), target)

    merged = RelativeL2Error()
    merged.merge_state(ranks[0])
    merged.merge_state(ranks[1])
    assert float(merged.compute()) == pytest.approx(float(both.compute()), rel=1e-12)

    # The DDP path: at compute(), torchmetrics gathers every state from every
    # rank and applies dist_reduce_fx; a fake gather hands rank 0 both ranks' states.
    mean_of_ratios = 0.5 * sum(float((r.err_sq / r.ref_sq).sqrt()) for r in ranks)
    peers = {}
    rank0 = RelativeL2Error(
        dist_sync_fn=lambda t, group=None: [t.clone(), peers[id(t)].clone()],
        distributed_available_fn=lambda: True,
    )
    rank0.update(preds[:50] * 3, target[:50])
    peers.update(
        {id(getattr(rank0, name)): getattr(ranks[1], name) for name in ("err_sq", "ref_sq")}
    )
    synced = float(rank0.compute())
    assert synced == pytest.approx(float(both.compute()), rel=1e-12)
    assert abs(synced - mean_of_ratios) > 0.1 * synced  # what a per-rank average would give


# ------------------------------------------------------------------ short run
def test_short_run_writes_expected_keys(tmp_path):
    problem = poisson(estimator=OneRandomCoordinate())
    callbacks = [
        MemoryMonitor(),
        EstimatorVarianceMonitor(
            every_n_steps=4, zo=True, probes=3, spatial_seeds=8, spatial_points=16
        ),
        SolutionPlot(every_n_steps=4, resolution=12),
        PINNProgressBar(refresh_rate=1),
    ]
    trainer(tmp_path, callbacks).fit(problem)
    metrics = read_metrics(tmp_path / "csv" / "metrics.csv")
    expected = [
        "train/loss",
        "val/rel_l2",
        "memory/peak_rss_bytes",
        "memory/param_bytes",
        "memory/optimizer_state_bytes",
        "variance/residual",
        "variance/interior_loss",
        "variance/zo_grad",
        "variance/zo_proj",
        "variance/zo_grad_nocrns",
        "variance/zo_proj_nocrns",
        "variance/zo_crns_ratio",
        "variance/probe_seconds",
    ]
    for key in expected:
        assert key in metrics, f"{key} missing from metrics.csv ({sorted(metrics)})"
        assert all(math.isfinite(v) for v in metrics[key]), (key, metrics[key])
    assert len(metrics["variance/residual"]) == 2  # steps 4 and 8
    assert metrics["variance/residual"][0] > 0  # one random coordinate: a noisy Laplacian
    assert metrics["memory/param_bytes"][0] == parameter_bytes(problem)
    # Adam: two moments per parameter plus a scalar step counter per tensor.
    n_tensors = len(list(problem.parameters()))
    assert (
        metrics["memory/optimizer_state_bytes"][-1] == 2 * parameter_bytes(problem) + 4 * n_tensors
    )
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == [
        "solution_step0000004.png",
        "solution_step0000008.png",
    ]


# ---------------------------------------------------------------------- memory
class CubePoisson(PINNProblem):
    """Delta u = -sum sin(x_i) on [0, 1]^d with u = sum sin(x_i) (no boundary term)."""

    def sample_interior(self, n, generator):
        return self.rand(n, self.dim, generator=generator)

    def residual(self, x, d: Derivatives):
        return d.laplacian + torch.sin(x).sum(dim=1)

    def exact_solution(self, x):
        return torch.sin(x).sum(dim=1)


def optimizer_bytes_after_fit(tmp_path, dim, method):
    problem = CubePoisson(
        dim=dim, net=MLP(dim, width=8, depth=2, seed=0), n_interior=4, n_eval=8, method=method
    )
    monitor = MemoryMonitor()
    trainer(
        tmp_path / f"d{dim}", [monitor], max_steps=2, log_every_n_steps=1, limit_val_batches=0
    ).fit(problem)
    return monitor.last["optimizer_state_bytes"], parameter_bytes(problem)


def test_adam_state_bytes_grow_with_dimension(tmp_path):
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    small, params_small = optimizer_bytes_after_fit(tmp_path, 4, adam)
    large, params_large = optimizer_bytes_after_fit(tmp_path, 40, adam)
    assert params_large > params_small
    # Two float32 moments per parameter: the growth is twice the parameter growth.
    assert large - small == 2 * (params_large - params_small)


def test_sdze_state_bytes_do_not_grow_with_dimension(tmp_path):
    from sdze_lightning.methods.sdze import SDZE

    method = functools.partial(SDZE, lr=1e-3, rank=2)
    small, params_small = optimizer_bytes_after_fit(tmp_path, 4, method)
    large, params_large = optimizer_bytes_after_fit(tmp_path, 40, method)
    assert params_large > params_small
    assert small > 0 and large == small


def test_tensor_bytes_is_recursive():
    state = {
        "a": torch.zeros(3),
        "b": [torch.zeros(2, dtype=torch.float64), {"c": torch.zeros(1)}],
        "n": 7,
    }
    assert tensor_bytes(state) == 3 * 4 + 2 * 8 + 4
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(5))], lr=0.1, momentum=0.9)
    assert optimizer_state_bytes(opt) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_is_logged(tmp_path):
    problem = poisson()
    monitor = MemoryMonitor()
    trainer(tmp_path, [monitor], max_steps=2, log_every_n_steps=1, accelerator="gpu").fit(problem)
    assert monitor.last["peak_allocated_bytes"] > 0
    assert monitor.last["peak_reserved_bytes"] >= monitor.last["peak_allocated_bytes"]


# ------------------------------------------------------------ variance monitor
def test_spatial_variance_matches_its_expectation():
    # With the Laplacian estimated as 2 u_jj, j uniform in {1, 2} (one j per
    # estimate, shared by the points), r_hat(x) - r(x) = s (u_11 - u_22)(x) with
    # a random sign s, so the per-point variance is a(x)^2 = (u_11 - u_22)^2.
    # The monitor's sample variance over S seeds is mean_x a(x)^2 * V_S where V_S
    # is the unbiased sample variance of S random signs: E V_S = 1 and
    # sd(V_S) ~ sqrt(2) / S; the tolerance is 4 of those standard deviations.
    problem = poisson(estimator=OneRandomCoordinate(), dtype=torch.float64)
    seeds = 64
    monitor = EstimatorVarianceMonitor(spatial_seeds=seeds, spatial_points=64, zo=False)
    out = monitor.measure(problem, step=3)
    x = problem.sample_interior(64, monitor._generator(problem.device, Stream.VARIANCE_POINTS, 3))
    xg = x.clone().requires_grad_(True)
    u = problem(xg)
    g = torch.autograd.grad(u.sum(), xg, create_graph=True)[0]
    u11 = torch.autograd.grad(g[:, 0].sum(), xg, retain_graph=True)[0][:, 0]
    u22 = torch.autograd.grad(g[:, 1].sum(), xg)[0][:, 1]
    expected = float(((u11 - u22) ** 2).mean())
    assert out["residual"] / expected == pytest.approx(1.0, abs=4 * math.sqrt(2) / seeds)


def test_spatial_variance_is_zero_for_a_deterministic_estimator():
    out = EstimatorVarianceMonitor(spatial_seeds=4, spatial_points=16, zo=False).measure(poisson())
    assert out["residual"] == 0.0 and out["interior_loss"] == 0.0


class Quadratic(nn.Module):
    """compute_loss(step, key) = |theta - target|^2 / 2 + sigma * xi(key), xi ~ N(0, 1)."""

    def __init__(self, dim=10, sigma=0.0):
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.theta = nn.Parameter(torch.randn(dim, generator=gen, dtype=torch.float64))
        self.target = torch.randn(dim, generator=gen, dtype=torch.float64)
        self.sigma = sigma

    def compute_loss(self, step, key):
        xi = torch.randn((), generator=torch.Generator().manual_seed(key), dtype=torch.float64)
        return 0.5 * (self.theta - self.target).square().sum() + self.sigma * xi


def test_zo_probe_variance_matches_theory():
    # g = (z . a) z with z ~ N(0, I_P) and a the gradient (a quadratic loss has
    # no central-difference error): E g = a, trace Cov g = (P + 1) |a|^2 and
    # Var(z . a) = |a|^2. Standard errors from the fourth and eighth Gaussian
    # moments: sd of one (z . a)^2 |z|^2 term is ~23 |a|^2 for P = 10 (so SE =
    # 23 |a|^2 / sqrt(n)), and the sample variance of a Gaussian has relative
    # SE sqrt(2 / (n - 1)). Tolerances are 4 standard errors.
    module = Quadratic(dim=10)
    n = 2000
    monitor = EstimatorVarianceMonitor(
        spatial_seeds=0, zo=True, probes=n, compare_crns=False, eps=1e-3
    )
    before = module.theta.detach().clone()
    out = monitor.measure(module)
    assert torch.equal(module.theta.detach(), before)  # parameters untouched
    a2 = float((module.theta - module.target).detach().square().sum())
    assert out["zo_grad"] == pytest.approx(11 * a2, abs=4 * 23 * a2 / math.sqrt(n))
    assert out["zo_proj"] == pytest.approx(a2, rel=4 * math.sqrt(2 / (n - 1)))


def test_crns_off_variance_grows_like_one_over_eps_squared():
    # The noise term sigma * xi(key) cancels exactly with CRNS (the scalar is
    # z . a whatever eps) and adds delta / (2 eps), delta = sigma (xi - xi'),
    # without it: c_off ~ N(0, |a|^2 + sigma^2 / (2 eps^2)). Tolerance: 4 relative
    # standard errors sqrt(2 / (n - 1)) of a Gaussian sample variance.
    module = Quadratic(dim=4, sigma=0.1)
    a2 = float((module.theta - module.target).detach().square().sum())
    n = 400
    res = {}
    for eps in (1e-2, 1e-3):
        monitor = EstimatorVarianceMonitor(spatial_seeds=0, zo=True, probes=n, eps=eps)
        res[eps] = out = monitor.measure(module)
        expected = a2 + module.sigma**2 / (2 * eps**2)
        assert out["zo_proj_nocrns"] == pytest.approx(expected, rel=4 * math.sqrt(2 / (n - 1)))
    assert res[1e-2]["zo_grad"] == pytest.approx(res[1e-3]["zo_grad"], rel=1e-6)
    assert res[1e-2]["zo_proj"] == pytest.approx(res[1e-3]["zo_proj"], rel=1e-6)
    assert res[1e-3]["zo_crns_ratio"] > 100 * res[1e-2]["zo_crns_ratio"] / 2


class FakeProbeOptimizer(ZerothOrderOptimizer):
    """Exposes the optional probe interface with fixed estimates."""

    def __init__(self, module, estimates):
        super().__init__(module, {"lr": 0.0})
        self.estimates = estimates
        self.last_query_estimates = estimates[:3]
        self.last_scalars = torch.tensor([1.0, 2.0, 4.0])
        self.calls = []

    def probe(self, loss_at, n, crns=True):
        loss_at(0)
        self.calls.append((n, crns))
        return self.estimates[:n] * (1.0 if crns else 10.0)

    def step(self, closure=None, *, loss_at=None, step_index=None, skip_nonfinite=False):
        return loss_at(0) if loss_at is not None else closure()


def test_monitor_uses_the_optimizer_probe_when_present():
    module = Quadratic()
    estimates = torch.randn(6, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    opt = FakeProbeOptimizer(module, estimates)
    out = EstimatorVarianceMonitor(spatial_seeds=0, probes=4).measure(module, opt)
    assert opt.calls == [(4, True), (4, False)]
    assert out["zo_grad"] == pytest.approx(total_variance(estimates[:4]))
    assert out["zo_crns_ratio"] == pytest.approx(100.0)
    assert out["zo_grad_queries"] == pytest.approx(total_variance(estimates[:3]))
    assert out["zo_proj_queries"] == pytest.approx(7 / 3)  # sample variance of 1, 2, 4


def test_monitor_with_sdze_in_a_run(tmp_path):
    from sdze_lightning.methods.sdze import SDZE

    problem = poisson(method=functools.partial(SDZE, lr=1e-3, rank=2, queries=3))
    monitor = EstimatorVarianceMonitor(every_n_steps=2, probes=3, spatial_seeds=0)  # zo="auto"
    trainer(tmp_path, [monitor], max_steps=2, limit_val_batches=0).fit(problem)
    metrics = read_metrics(tmp_path / "csv" / "metrics.csv")
    # random directions: every variance is positive (0 would mean identical probes)
    for key in ("zo_grad", "zo_grad_nocrns", "zo_grad_queries", "zo_proj_queries"):
        assert 0 < metrics["variance/" + key][0] < math.inf, key
    # the logged ratio is that of the logged variances (logged as float32: 1e-6 relative)
    ratio = metrics["variance/zo_grad_nocrns"][0] / metrics["variance/zo_grad"][0]
    assert metrics["variance/zo_crns_ratio"][0] == pytest.approx(ratio, rel=1e-5)
    assert metrics["variance/zo_crns_ratio"][0] > 1


# ------------------------------------------------------------------ SDZE probe
def sdze_poisson(estimator=None, dtype=torch.float64, **method_kwargs):
    from sdze_lightning.methods.sdze import SDZE

    kwargs = dict(lr=1e-2, rank=2, eps=1e-5 if dtype == torch.float64 else 1e-3, seed=3)
    kwargs.update(method_kwargs)
    problem = poisson(estimator=estimator, dtype=dtype)
    return problem, SDZE(problem.net, **kwargs)


def sdze_steps(problem, opt, steps):
    losses = []
    for _ in range(steps):
        step = opt.zo_state["step"]
        losses.append(float(opt.step(loss_at=functools.partial(problem.compute_loss, step))))
    return losses


def test_sdze_probe_is_the_two_point_estimate_in_subspace_coordinates():
    # Each probe row must be (u_j . g_j) u_j with u_j from the probe stream and
    # g_j the autodiff gradient, w.r.t. the subspace coordinates, of the loss
    # with probe j's noise key. Central differences in float64 at eps = 1e-5
    # are exact up to eps^2 * (third derivative) ~ 1e-10 relative, far below
    # the 1e-6 tolerance; a wrong key, direction or scaling is off by O(1).
    from sdze_lightning.seeding import PROBE_KEY_BASE, Stream, generator

    problem, opt = sdze_poisson()
    sdze_steps(problem, opt, 2)  # nonzero coordinates and Adam state
    step = opt.zo_state["step"]
    est = opt.probe(functools.partial(problem.compute_loss, step), 3)
    subs = opt.subspaces()
    gen = generator("cpu", Stream.SDZE_PROBES, opt.seed, step)
    assert est.shape == (3, sum(sub.size for sub in subs))
    for j in range(3):
        u = torch.cat([torch.randn(sub.size, generator=gen, dtype=torch.float64) for sub in subs])
        offsets = [torch.zeros(sub.size, dtype=torch.float64, requires_grad=True) for sub in subs]
        opt._install(offsets)
        problem.compute_loss(step, PROBE_KEY_BASE + 2 * j).backward()
        opt._install()
        g = torch.cat([o.grad for o in offsets])
        torch.testing.assert_close(est[j], (u @ g) * u, rtol=1e-6, atol=1e-9 * float(g.norm()))


def test_sdze_probe_changes_nothing():
    def run(probe):
        problem, opt = sdze_poisson(dtype=torch.float32, period=2)
        losses = []
        for _ in range(5):  # crosses two window changes
            losses += sdze_steps(problem, opt, 1)
            if probe:
                step = opt.zo_state["step"]
                loss_at = functools.partial(problem.compute_loss, step)
                opt.probe(loss_at, 2)
                opt.probe(loss_at, 2, crns=False)
        return losses, [p.detach().clone() for p in problem.parameters()], opt.state_dict()

    rng = torch.random.get_rng_state()
    losses_with, params_with, state_with = run(True)
    assert torch.equal(rng, torch.random.get_rng_state())
    losses_without, params_without, state_without = run(False)
    assert losses_with == losses_without
    assert all(torch.equal(a, b) for a, b in zip(params_with, params_without, strict=True))
    flat = lambda sd: [  # noqa: E731
        v for st in sd["state"].values() for v in st.values() if isinstance(v, torch.Tensor)
    ]
    pairs = zip(flat(state_with), flat(state_without), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_sdze_probe_without_crns_is_far_noisier():
    # Without CRNS the two evaluations of a probe use different collocation
    # points and estimator coordinates: their difference, O(loss) here, is
    # divided by 2 eps = 2e-3, against a directional derivative of O(|g|) with
    # CRNS. A probe that ignored `crns` would give a ratio near 1.
    problem, opt = sdze_poisson(estimator=OneRandomCoordinate(), dtype=torch.float32)
    loss_at = functools.partial(problem.compute_loss, 0)
    on = total_variance(opt.probe(loss_at, 16))
    off = total_variance(opt.probe(loss_at, 16, crns=False))
    assert off > 100 * on


def test_monitor_measures_sdze_own_estimate_when_q_is_one():
    from sdze_lightning.methods.sdze import SDZE

    problem, opt = sdze_poisson(dtype=torch.float32)
    assert isinstance(opt, SDZE) and opt.queries == 1
    sdze_steps(problem, opt, 1)
    calls = []
    probe = opt.probe

    def spy(closure, n, crns=True):
        calls.append((n, crns, out := probe(closure, n, crns=crns)))
        return out

    opt.probe = spy
    monitor = EstimatorVarianceMonitor(spatial_seeds=0, probes=4)  # zo="auto", compare_crns
    out = monitor.measure(problem, opt, step=1)
    assert [(n, crns) for n, crns, _ in calls] == [(4, True), (4, False)]
    m = sum(sub.size for sub in opt.subspaces())
    assert all(est.shape == (4, m) for *_, est in calls)  # subspace, not parameter space
    assert out["zo_grad"] == pytest.approx(total_variance(calls[0][2]))
    assert out["zo_grad_nocrns"] == pytest.approx(total_variance(calls[1][2]))


def test_monitor_leaves_rng_parameters_and_trajectory_alone(tmp_path):
    def run(with_monitor):
        problem = poisson(estimator=OneRandomCoordinate())
        losses = []
        record = L.Callback()
        record.on_train_batch_end = lambda tr, pl, *a: losses.append(pl.last_loss)
        callbacks = [record]
        if with_monitor:
            callbacks.insert(
                0,
                EstimatorVarianceMonitor(
                    every_n_steps=2, zo=True, probes=2, spatial_seeds=2, spatial_points=8
                ),
            )
        trainer(tmp_path / str(with_monitor), callbacks, max_steps=6).fit(problem)
        return losses, [p.detach().clone() for p in problem.parameters()]

    rng = torch.random.get_rng_state()
    losses_with, params_with = run(True)
    assert torch.equal(rng, torch.random.get_rng_state())
    losses_without, params_without = run(False)
    assert losses_with == losses_without
    assert all(torch.equal(a, b) for a, b in zip(params_with, params_without, strict=True))


def test_period_is_aligned_with_log_every_n_steps(tmp_path):
    monitor = EstimatorVarianceMonitor(every_n_steps=3, spatial_seeds=2, spatial_points=4)
    trainer(tmp_path, [monitor], max_steps=4, log_every_n_steps=2, limit_val_batches=0).fit(
        poisson()
    )
    assert monitor.every_n_steps == 4
    assert [h["step"] for h in monitor.history] == [4.0]


# ---------------------------------------------------------------------- plots
def test_solution_plot_png_opens(tmp_path):
    import matplotlib.image

    plot = SolutionPlot(every_n_steps=2, resolution=16)
    trainer(tmp_path, [plot], max_steps=3, limit_val_batches=0).fit(poisson())
    # steps 2 and the final step 3
    assert [p.name for p in plot.paths] == ["solution_step0000002.png", "solution_step0000003.png"]
    image = matplotlib.image.imread(plot.paths[-1])
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # not a blank canvas


class Heat1D(PINNProblem):
    """u_t = u_xx on [0, 1] x [0, 1], u = exp(-pi^2 t) sin(pi x)."""

    operators = ("u", "laplacian", "dt")
    time_dependent = True

    def sample_interior(self, n, generator):
        return self.rand(n, 2, generator=generator)

    def residual(self, x, d):
        return d.dt - d.laplacian

    def exact_solution(self, x):
        return torch.exp(-(math.pi**2) * x[:, 1]) * torch.sin(math.pi * x[:, 0])


def test_solution_plot_axes_for_time_and_profiles(tiny_problem):
    plot = SolutionPlot(resolution=8)
    heat = Heat1D(dim=1, net=MLP(2, width=8, depth=1))
    axes, labels = plot._axes(heat, 2)
    assert axes == (0, 1) and labels == ["x1", "t"]
    fig = plot.figure(heat, step=0)
    assert len(fig.axes) == 6  # three panels and their colour bars
    profile = SolutionPlot(resolution=8)
    fig = profile.figure(tiny_problem(), step=0)  # 1D problem: a profile and its error
    assert len(fig.axes) == 2


def test_solution_plot_logs_a_wandb_image_offline(tmp_path):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="sdze-test", save_dir=str(tmp_path), offline=True)
    plot = SolutionPlot(every_n_steps=2, resolution=8)
    try:
        trainer(tmp_path, [plot], max_steps=2, logger=logger, limit_val_batches=0).fit(poisson())
    finally:
        wandb.finish()
    assert not plot._wandb_failed
    assert plot.paths == [tmp_path / "plots" / "solution_step0000002.png"]
    images = list(
        (tmp_path / "wandb").glob("offline-run-*/files/media/images/plots/solution_*.png")
    )
    assert len(images) == 1


def test_solution_plot_survives_a_failing_wandb_logger(tmp_path, monkeypatch, caplog):
    import lightning.pytorch.loggers as loggers

    class BrokenWandb:
        def log_image(self, **kwargs):
            raise RuntimeError("no connection")

    monkeypatch.setattr(loggers, "WandbLogger", BrokenWandb)
    plot = SolutionPlot(resolution=8, dirpath=tmp_path)
    fake_trainer = SimpleNamespace(global_step=5, is_global_zero=True, loggers=[BrokenWandb()])
    path = plot.plot(fake_trainer, poisson())
    assert path.exists() and "no connection" in caplog.text
    assert plot.plot(fake_trainer, poisson()).exists()  # keeps writing PNGs


# ----------------------------------------------------------------- progress bar
def test_progress_bar_shows_loss_and_rel_l2(tmp_path):
    bar = PINNProgressBar(refresh_rate=1)
    problem = poisson()
    tr = trainer(tmp_path, [bar], max_steps=4)
    tr.fit(problem)
    shown = bar.get_metrics(tr, problem)
    assert list(shown)[:2] == ["loss", "rel_l2"]
    assert float(shown["loss"]) == pytest.approx(
        float(tr.progress_bar_metrics["train/loss"]), rel=1e-3
    )
    assert float(shown["rel_l2"]) == pytest.approx(
        float(tr.callback_metrics["val/rel_l2"]), rel=1e-3
    )


# ---------------------------------------------------------------------- configs
@pytest.mark.parametrize("group", ["default", "diagnostics", "none"])
def test_callback_configs_instantiate(group, tmp_path):
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    with initialize_config_module("sdze_lightning.configs", version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[f"callbacks={group}", f"hydra.runtime.output_dir={tmp_path}"],
            return_hydra_config=True,
        )
        HydraConfig.instance().set_config(cfg)
        built = {name: instantiate(node) for name, node in (cfg.callbacks or {}).items()}
    expected = {
        "default": {"checkpoint", "memory", "progress"},
        "diagnostics": {"checkpoint", "memory", "progress", "variance", "plots"},
        "none": set(),
    }[group]
    assert set(built) == expected
    assert all(isinstance(cb, L.Callback) for cb in built.values())
    if group == "diagnostics":
        assert built["plots"].dirpath == tmp_path / "plots"


# ------------------------------------------------------------------- benchmark
@pytest.mark.slow  # a benchmark script's smoke mode (`pytest -m slow`)
def test_benchmark_smoke_mode(tmp_path):
    module = load_benchmark("callbacks_cost")
    threads = torch.get_num_threads()
    result = module.main(["--smoke", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads
    assert [r["callbacks"] for r in result["overhead"]] == ["none", "default", "diagnostics"]
    assert all(r["seconds"] > 0 for r in result["probe_cost"])
    assert (tmp_path / "callbacks_cost_smoke.json").exists()
    # every run is sdze-train on the packaged config with the set's overrides
    for row in result["overhead"]:
        assert f"callbacks={row['callbacks']}" in row["overrides"]
        assert row["sdze_train_command"].startswith("sdze-train pde=poisson2d method=adam")
        assert row["s_per_step"] > 0 and row["hook_time_share"]
    assert {r["method"] for r in result["probe_cost"]} == {"adam", "sdze"}
    assert all(f"method={r['method']}" in r["overrides"] for r in result["probe_cost"])
    # the file records its provenance
    saved = json.loads((tmp_path / "callbacks_cost_smoke.json").read_text())
    assert saved["commit"] and saved["machine"] and saved["load_end"] is not None
    assert saved["command"].endswith(f"benchmarks/callbacks_cost.py --smoke --out {tmp_path}")
