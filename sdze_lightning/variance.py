"""The noise of the spatial and zeroth-order gradient estimates, measured without changing anything.

Plain functions (no Lightning) behind
:class:`~sdze_lightning.callbacks.EstimatorVarianceMonitor`; each returns its
values by key (the callback logs them under its prefix).

**Spatial estimator** (:func:`spatial_variance`, any method). On fresh interior
points it re-runs the problem's spatial estimator with several generator seeds:

* ``residual``: the variance of the residual estimate ``r_hat(x)`` across the
  seeds, averaged over the points (zero for a deterministic estimator such as
  ``exact``);
* ``interior_loss``: the variance across the seeds of the interior loss
  ``mean_x r_hat(x)^2``: the noise of ``L_hat(theta; xi)`` that CRNS cancels in
  a two-point difference.

**Zeroth-order gradient** (:func:`zo_variance`). Two-point estimates
``g_j = c_j z_j`` with ``c_j = (L(theta + eps z_j; xi_j) - L(theta - eps z_j;
xi_j)) / (2 eps)``:

* ``zo_grad``: the total variance ``E|g - E g|^2`` (trace of the covariance)
  across the probes, with CRNS (both evaluations of a pair use the same
  collocation points and estimator directions ``xi_j``);
* ``zo_proj``: the variance across the probes of the scalar ``c_j`` (fallback
  probe only);
* with ``compare_crns`` the same with CRNS off (``zo_grad_nocrns``,
  ``zo_proj_nocrns``: the minus evaluation uses independent ``xi_j'``), and
  ``zo_crns_ratio = zo_grad_nocrns / zo_grad``, which grows like ``1 / eps^2``.

:func:`query_variance` adds ``zo_grad_queries`` and ``zo_proj_queries``: the
total variance of the estimates and the variance of the scalars across the
``q`` queries of the step just taken, at no extra cost, when the optimizer
exposes them and ``q >= 2``.

Interface (duck-typed):

* problem, spatial part: ``sample_interior(n, generator)``,
  ``derivatives(x, generator)`` and ``residual(x, derivatives)`` (the
  :class:`~sdze_lightning.problem.PINNProblem` contract);
* problem, ZO part: ``compute_loss(step, key) -> Tensor``, the training loss
  for step ``step`` with noise key ``key`` (the key fixes the collocation
  points and estimator directions). Probes use keys from
  :data:`~sdze_lightning.seeding.PROBE_KEY_BASE` upward, so they never
  coincide with the keys of a training step;
* optimizer, optional: ``probe(loss_at, n[, crns=..., reduce=...]) -> Tensor`` of shape
  ``(n, m)``: ``n`` independent gradient estimates at the current parameters,
  written in orthonormal coordinates of the parameter space (for SDZE the
  subspace coordinates), computed without changing the parameters, the
  optimizer state or its generators. Without ``probe``,
  :func:`fallback_probe_variance` draws its own full-space Gaussian directions
  and evaluates ``theta +- eps z`` through :func:`torch.func.functional_call`:
  the parameters are never written to, so they are restored exactly by
  construction. It holds three parameter-sized buffers (``theta + eps z``,
  ``z`` and the running sum of ``c_j z_j``; two sums with ``compare_crns``)
  while it runs;
* optimizer, optional: ``last_query_estimates``: a ``(q, m)`` tensor of the
  per-query estimates of the last step, in the same coordinates, and
  ``last_scalars``: the ``(q,)`` projected-gradient scalars of the last step
  (:class:`~sdze_lightning.methods.zeroth_order.TwoPointOptimizer` has it).

Randomness comes only from generators seeded from ``seed`` and the step, so
the global RNG and the training trajectory are untouched.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sdze_lightning.devices import device_of
from sdze_lightning.distributed import all_reduce_mean
from sdze_lightning.methods.base import is_zeroth_order
from sdze_lightning.seeding import PROBE_KEY_BASE, Stream, generator


class NotMeasurable(Exception):
    """The problem or optimizer lacks what a measurement needs.

    Attributes:
        what: The measurement (``"spatial"`` or ``"zero-order"``).
        why: What is missing.

    """

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"no {what} measurement: {why}")
        self.what = what
        self.why = why


class _LossAt(nn.Module):
    """Holds the problem as a child so ``functional_call`` can swap its parameters."""

    def __init__(self, problem: nn.Module) -> None:
        super().__init__()
        self.problem = problem

    def forward(self, step: int, key: int) -> Tensor:
        return self.problem.compute_loss(step, key)


def total_variance(estimates: Tensor) -> float:
    """Trace of the sample covariance of ``n`` vector estimates ``(n, m)`` (unbiased)."""
    est = estimates.detach().double().reshape(estimates.shape[0], -1)
    if est.shape[0] < 2:
        return math.nan
    return float(est.var(dim=0, unbiased=True).sum())


def isolated_points(problem: nn.Module) -> contextlib.AbstractContextManager[None]:
    """``PINNProblem.isolated_points()``: points drawn inside do not stay cached."""
    isolated = getattr(problem, "isolated_points", None)
    return isolated() if callable(isolated) else contextlib.nullcontext()


def spatial_variance(
    problem: nn.Module, step: int, seeds: int, points: int, seed: int
) -> dict[str, float]:
    """Variance of the residual estimate across estimator seeds, at fixed points.

    Args:
        problem: The problem (spatial interface in the module docstring).
        step: Step index; it seeds the points and the estimator seeds.
        seeds: Number of estimator seeds (at least 2).
        points: Number of interior points.
        seed: Seed of the measurement's generators.

    Returns:
        ``residual`` and ``interior_loss``.

    Raises:
        NotMeasurable: If the problem lacks the spatial interface.

    """
    needed = ("sample_interior", "derivatives", "residual")
    missing = [name for name in needed if not callable(getattr(problem, name, None))]
    if missing:
        raise NotMeasurable("spatial", f"the module lacks {missing}")
    device = device_of(problem)
    x = problem.sample_interior(points, generator(device, Stream.VARIANCE_POINTS, seed, step))
    res = torch.stack(
        [
            problem.residual(
                x, problem.derivatives(x, generator(device, Stream.VARIANCE_SPATIAL, seed, step, s))
            )
            .detach()
            .double()
            for s in range(seeds)
        ]
    )  # (S, N)
    return {
        "residual": float(res.var(dim=0, unbiased=True).mean()),
        "interior_loss": float(res.square().mean(dim=1).var(unbiased=True)),
    }


def query_variance(optimizer: Any) -> dict[str, float]:
    """Variances across the queries of the step just taken (from the optimizer's last step).

    Returns:
        ``zo_grad_queries`` when the optimizer exposes at least two per-query
        estimates, ``zo_proj_queries`` when it exposes at least two scalars.

    """
    out: dict[str, float] = {}
    queries = getattr(optimizer, "last_query_estimates", None)
    if isinstance(queries, Tensor) and queries.dim() >= 1 and queries.shape[0] >= 2:
        out["zo_grad_queries"] = total_variance(queries)
    scalars = getattr(optimizer, "last_scalars", None)
    if isinstance(scalars, Tensor) and scalars.numel() >= 2:
        out["zo_proj_queries"] = float(scalars.detach().double().reshape(-1).var())
    return out


@dataclass(frozen=True)
class ProbeSettings:
    """How the zeroth-order variance is probed.

    Attributes:
        count: Number of two-point probes (at least 2).
        compare_crns: Also measure with CRNS off (one more evaluation per probe).
        eps: Perturbation size of the fallback probes (``None``: :func:`probe_eps`).
        seed: Seed of the fallback probes' directions.

    """

    count: int
    compare_crns: bool = True
    eps: float | None = None
    seed: int = 0


def zo_variance(
    problem: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    probes: ProbeSettings,
) -> dict[str, float]:
    """Variance of two-point gradient estimates at the current parameters.

    Uses the optimizer's own ``probe`` where it has one
    (:func:`optimizer_probe_variance`), else :func:`fallback_probe_variance`.

    Args:
        problem: The problem (ZO interface in the module docstring).
        optimizer: The optimizer in use (a ``LightningOptimizer`` is unwrapped), or ``None``.
        step: Step index; it seeds the probes.
        probes: Number, CRNS comparison, eps and seed of the probes.

    Raises:
        NotMeasurable: If the problem has no ``compute_loss`` or no trainable parameters.

    """
    if not callable(getattr(problem, "compute_loss", None)):
        raise NotMeasurable("zero-order", "the module has no compute_loss(step, key)")
    inner = getattr(optimizer, "optimizer", optimizer)  # unwrap LightningOptimizer
    if callable(getattr(inner, "probe", None)):
        return optimizer_probe_variance(problem, inner, step, probes)
    return fallback_probe_variance(problem, inner, step, probes)


def optimizer_probe_variance(
    problem: nn.Module, optimizer: Any, step: int, probes: ProbeSettings
) -> dict[str, float]:
    """``zo_grad`` (and the CRNS-off pair) from the optimizer's own ``probe``."""

    def loss_at(key: int) -> Tensor:
        return problem.compute_loss(step, key)

    try:
        accepts = inspect.signature(optimizer.probe).parameters
    except (TypeError, ValueError):
        accepts = {}
    kwargs: dict[str, Any] = {}
    shard = getattr(getattr(problem, "collocation", None), "shard", None)  # this rank's share
    if shard is not None and shard.active and "reduce" in accepts:
        kwargs["reduce"] = all_reduce_mean  # every rank probes its share: average the values
    out = {"zo_grad": total_variance(optimizer.probe(loss_at, probes.count, **kwargs))}
    if probes.compare_crns:
        if "crns" in accepts:
            off = total_variance(optimizer.probe(loss_at, probes.count, crns=False, **kwargs))
            out["zo_grad_nocrns"] = off
            out["zo_crns_ratio"] = off / out["zo_grad"] if out["zo_grad"] > 0 else math.inf
    return out


def probe_eps(optimizer: Any, dtype: torch.dtype, eps: float | None = None) -> float:
    """Perturbation size of the fallback probes.

    ``eps`` if given, else the zeroth-order optimizer's ``eps``, else ``1e-3``
    (``1e-4`` in float64).
    """
    if eps is not None:
        return eps
    if optimizer is not None and is_zeroth_order(optimizer):
        value = optimizer.param_groups[0].get("eps", getattr(optimizer, "eps", None))
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return 1e-4 if dtype == torch.float64 else 1e-3


def fallback_probe_variance(
    problem: nn.Module, optimizer: Any, step: int, probes: ProbeSettings
) -> dict[str, float]:
    """Full-space two-point probes through ``functional_call`` (parameters never written).

    Returns ``zo_grad`` and ``zo_proj`` (and the CRNS-off pair with
    ``probes.compare_crns``); arguments as :func:`zo_variance`.

    Raises:
        NotMeasurable: If the problem has no trainable parameters.

    """
    named = [(f"problem.{n}", p) for n, p in problem.named_parameters() if p.requires_grad]
    if not named:
        raise NotMeasurable("zero-order", "the module has no trainable parameters")
    device = named[0][1].device
    eps = probe_eps(optimizer, named[0][1].dtype, probes.eps)
    wrapper = _LossAt(problem)
    acc_dtype = [torch.promote_types(p.dtype, torch.float32) for _, p in named]

    def loss(z: list[Tensor], sign: float, key: int) -> float:
        params = {n: p + (sign * eps) * zi for (n, p), zi in zip(named, z, strict=True)}
        with isolated_points(problem):  # do not let probe points pile up
            value = torch.func.functional_call(wrapper, params, (step, key), strict=False)
        return float(value.detach())

    modes = ("on", "off") if probes.compare_crns else ("on",)
    sums = {
        m: [torch.zeros_like(p, dtype=dt) for (_, p), dt in zip(named, acc_dtype, strict=True)]
        for m in modes
    }
    sq = dict.fromkeys(modes, 0.0)
    cs: dict[str, list[float]] = {m: [] for m in modes}
    for j in range(probes.count):
        gen = generator(device, Stream.VARIANCE_DIRECTIONS, probes.seed, step, j)
        z = [torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype) for _, p in named]
        z_sq = sum(float(zi.double().square().sum()) for zi in z)
        key = PROBE_KEY_BASE + 2 * j
        plus = loss(z, 1.0, key)
        minus = {"on": loss(z, -1.0, key)}
        if probes.compare_crns:
            minus["off"] = loss(z, -1.0, key + 1)  # independent points and directions
        for m in modes:
            c = (plus - minus[m]) / (2 * eps)
            cs[m].append(c)
            sq[m] += c * c * z_sq
            for acc, zi in zip(sums[m], z, strict=True):
                acc.add_(zi, alpha=c)
    n = probes.count
    out: dict[str, float] = {}
    for m in modes:
        mean_sq = sum(float(a.double().square().sum()) for a in sums[m]) / n  # n |g_bar|^2
        suffix = "" if m == "on" else "_nocrns"
        out["zo_grad" + suffix] = (sq[m] - mean_sq) / (n - 1)
        out["zo_proj" + suffix] = float(torch.tensor(cs[m], dtype=torch.float64).var())
    if probes.compare_crns:
        on = out["zo_grad"]
        out["zo_crns_ratio"] = out["zo_grad_nocrns"] / on if on > 0 else math.inf
    return out
