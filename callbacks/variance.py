"""``EstimatorVarianceMonitor``: the noise of the spatial and zeroth-order estimates.

Every ``every_n_steps`` training steps the callback measures, at the current
parameters and without changing anything:

**Spatial estimator** (any method, first-order included). On ``spatial_points``
fresh interior points it re-runs the problem's spatial estimator with
``spatial_seeds`` different generator seeds and logs

* ``variance/residual``: the variance of the residual estimate ``r_hat(x)``
  across the seeds, averaged over the points (zero for a deterministic
  estimator such as ``exact``);
* ``variance/interior_loss``: the variance across the seeds of the interior
  loss ``mean_x r_hat(x)^2``: the noise of ``L_hat(theta; xi)`` that CRNS
  cancels in a two-point difference.

Cost: ``spatial_seeds`` residual estimates on ``spatial_points`` points.

**Zeroth-order gradient** (by default only when the optimizer is a
:class:`~sdze_lightning.methods.base.ZerothOrderOptimizer`; ``zo=True`` forces it).
``probes`` two-point estimates ``g_j = c_j z_j`` with
``c_j = (L(theta + eps z_j; xi_j) - L(theta - eps z_j; xi_j)) / (2 eps)`` and logs

* ``variance/zo_grad``: the total variance ``E|g - E g|^2`` (trace of the
  covariance) across the probes, with CRNS (both evaluations of a pair use the
  same collocation points and estimator directions ``xi_j``);
* ``variance/zo_proj``: the variance across the probes of the scalar ``c_j``;
* with ``compare_crns=True`` the same two with CRNS off
  (``variance/zo_grad_nocrns``, ``variance/zo_proj_nocrns``: the minus
  evaluation uses independent ``xi_j'``), and ``variance/zo_crns_ratio``
  ``= zo_grad_nocrns / zo_grad``, which grows like ``1 / eps^2``;
* ``variance/zo_grad_queries`` and ``variance/zo_proj_queries``: the total
  variance of the estimates and the variance of the scalars across the ``q``
  queries of the step just taken, at no extra cost, when the optimizer exposes
  them (see below) and ``q >= 2``.

Cost: ``2 * probes`` loss evaluations, plus ``probes`` with ``compare_crns``
(each one loss evaluation of the training batch, i.e. one forward pass with a
forward-only estimator). The fallback probe (below) also holds three
parameter-sized buffers (``theta + eps z``, ``z`` and the running sum of
``c_j z_j``; two sums with ``compare_crns``) while it runs.
``variance/probe_seconds`` logs the wall time of each measurement.

Interface (duck-typed, so any ``LightningModule`` that offers it works):

* module, spatial part: ``sample_interior(n, generator)``,
  ``derivatives(x, generator)`` and ``residual(x, derivatives)`` (the
  :class:`~sdze_lightning.problem.PINNProblem` contract);
* module, ZO part: ``compute_loss(step, key) -> Tensor``, the training loss
  for step ``step`` with noise key ``key`` (the key fixes the collocation
  points and estimator directions). Probes use keys from ``2**40`` upward, so
  they never coincide with the keys of a training step;
* optimizer, optional: ``probe(loss_at, n[, crns=...]) -> Tensor`` of shape
  ``(n, m)``: ``n`` independent gradient estimates at the current parameters,
  written in orthonormal coordinates of the parameter space (for SDZE the
  subspace coordinates), computed without changing the parameters, the
  optimizer state or its generators. ``loss_at(key)`` returns the loss for
  noise key ``key``. Without ``probe`` the callback draws its
  own full-space Gaussian directions from its own generator and evaluates
  ``theta +- eps z`` through :func:`torch.func.functional_call`: the
  parameters are never written to, so they are restored exactly by
  construction;
* optimizer, optional: ``last_query_estimates``: a ``(q, m)`` tensor of the
  per-query estimates of the last step, in the same coordinates, and
  ``last_scalars``: the ``(q,)`` projected-gradient scalars of the last step
  (:class:`~sdze_lightning.methods.two_point.TwoPointOptimizer` has it).

Randomness comes only from the callback's own generators (seeded from
``seed`` and the step), so the global RNG and the training trajectory are
untouched.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from typing import Any

import lightning as L
import torch
from sdze_lightning.callbacks._utils import device_of
from torch import Tensor, nn

from sdze_lightning.methods.base import is_zeroth_order
from sdze_lightning.seeding import PROBE_KEY_BASE, Stream, mix

log = logging.getLogger(__name__)


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


class EstimatorVarianceMonitor(L.Callback):
    """Log the variance of the spatial and zeroth-order gradient estimates.

    Args:
        every_n_steps: Measure after every ``every_n_steps``-th step. Rounded up
            to a multiple of ``trainer.log_every_n_steps`` (other values would be
            dropped by Lightning's logger connector); ``None`` uses that value.
        spatial_seeds: Estimator seeds for the spatial part (0 disables it).
        spatial_points: Interior points of the spatial part.
        zo: ``"auto"`` (only for zeroth-order optimizers), ``True`` or ``False``.
        probes: Two-point probes of the ZO part (at least 2).
        compare_crns: Also measure with CRNS off (one more evaluation per probe).
        eps: Perturbation size of the fallback probes; defaults to the
            optimizer's ``eps`` if it is zeroth-order, else ``1e-3`` (``1e-4`` in
            float64).
        seed: Seed of the callback's own generators.
        prefix: Prefix of the logged keys.

    """

    def __init__(
        self,
        every_n_steps: int | None = 100,
        spatial_seeds: int = 8,
        spatial_points: int = 256,
        zo: bool | str = "auto",
        probes: int = 8,
        compare_crns: bool = True,
        eps: float | None = None,
        seed: int = 0,
        prefix: str = "variance/",
    ) -> None:
        if every_n_steps is not None and every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}.")
        if spatial_seeds == 1 or spatial_seeds < 0:
            raise ValueError(f"spatial_seeds must be 0 (off) or at least 2, got {spatial_seeds}.")
        if spatial_points <= 0:
            raise ValueError(f"spatial_points must be positive, got {spatial_points}.")
        if zo not in ("auto", True, False):
            raise ValueError(f"zo must be 'auto', true or false, got {zo!r}.")
        if probes < 2:
            raise ValueError(f"probes must be at least 2 (a variance needs two), got {probes}.")
        if eps is not None and eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}.")
        self.every_n_steps = every_n_steps
        self.spatial_seeds = spatial_seeds
        self.spatial_points = spatial_points
        self.zo = zo
        self.probes = probes
        self.compare_crns = compare_crns
        self.eps = eps
        self.seed = seed
        self.prefix = prefix
        #: One dict per measurement: ``{"step": ..., <key>: value, ...}``.
        self.history: list[dict[str, float]] = []
        self._warned: set[str] = set()

    # ---------------------------------------------------------------- lightning
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Align the measurement period with the steps whose logs Lightning keeps."""
        every_log = trainer.log_every_n_steps or 1
        if self.every_n_steps is None:
            self.every_n_steps = every_log
        elif self.every_n_steps % every_log:
            aligned = math.ceil(self.every_n_steps / every_log) * every_log
            log.warning(
                "EstimatorVarianceMonitor: every_n_steps=%d is not a multiple of "
                "trainer.log_every_n_steps=%d, whose other steps' values Lightning drops; "
                "measuring every %d steps instead.",
                self.every_n_steps,
                every_log,
                aligned,
            )
            self.every_n_steps = aligned

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Measure and log on every ``every_n_steps``-th step."""
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps:
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        context = getattr(trainer.precision_plugin, "forward_context", contextlib.nullcontext)
        with context():
            values = self.measure(pl_module, optimizer, step)
        for key, value in values.items():
            pl_module.log(self.prefix + key, value, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ measuring
    def measure(
        self,
        pl_module: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        step: int = 0,
    ) -> dict[str, float]:
        """Measure at the current parameters; usable outside a ``Trainer``.

        Args:
            pl_module: The problem (see the module docstring for the interface).
            optimizer: The optimizer in use, or ``None``.
            step: Step index; it seeds the probe points and directions.

        Returns:
            The measured values by key (without the prefix).

        """
        start = time.perf_counter()
        out: dict[str, float] = {}
        with self._keep_point_cache(pl_module), torch.no_grad():
            if self.spatial_seeds:
                out.update(self.spatial_variance(pl_module, step))
            if self._want_zo(optimizer):
                out.update(self.zo_variance(pl_module, optimizer, step))
            queries = getattr(optimizer, "last_query_estimates", None)
            if isinstance(queries, Tensor) and queries.dim() >= 1 and queries.shape[0] >= 2:
                out["zo_grad_queries"] = total_variance(queries)
            scalars = getattr(optimizer, "last_scalars", None)
            if isinstance(scalars, Tensor) and scalars.numel() >= 2:
                out["zo_proj_queries"] = float(scalars.detach().double().reshape(-1).var())
        out["probe_seconds"] = time.perf_counter() - start
        self.history.append({"step": float(step), **out})
        return out

    def _want_zo(self, optimizer: torch.optim.Optimizer | None) -> bool:
        if self.zo == "auto":
            return optimizer is not None and is_zeroth_order(optimizer)
        return bool(self.zo)

    def _generator(self, device: torch.device, stream: Stream, *parts: int) -> torch.Generator:
        gen = torch.Generator(device=device)
        gen.manual_seed(mix(stream, self.seed, *parts))
        return gen

    @staticmethod
    def _keep_point_cache(pl_module: nn.Module) -> contextlib.AbstractContextManager[None]:
        """``PINNProblem.isolated_points()``: the probes' points do not stay cached."""
        isolated = getattr(pl_module, "isolated_points", None)
        return isolated() if callable(isolated) else contextlib.nullcontext()

    def _skip(self, what: str, why: str) -> dict[str, float]:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("EstimatorVarianceMonitor: no %s measurement: %s", what, why)
        return {}

    def spatial_variance(self, pl_module: nn.Module, step: int) -> dict[str, float]:
        """Variance of the residual estimate across estimator seeds, at fixed points."""
        needed = ("sample_interior", "derivatives", "residual")
        missing = [name for name in needed if not callable(getattr(pl_module, name, None))]
        if missing:
            return self._skip("spatial", f"the module lacks {missing}")
        device = device_of(pl_module)
        x = pl_module.sample_interior(
            self.spatial_points, self._generator(device, Stream.VARIANCE_POINTS, step)
        )
        res = torch.stack(
            [
                pl_module.residual(
                    x,
                    pl_module.derivatives(
                        x, self._generator(device, Stream.VARIANCE_SPATIAL, step, s)
                    ),
                )
                .detach()
                .double()
                for s in range(self.spatial_seeds)
            ]
        )  # (S, N)
        return {
            "residual": float(res.var(dim=0, unbiased=True).mean()),
            "interior_loss": float(res.square().mean(dim=1).var(unbiased=True)),
        }

    def zo_variance(
        self, pl_module: nn.Module, optimizer: torch.optim.Optimizer | None, step: int
    ) -> dict[str, float]:
        """Variance of two-point gradient estimates at the current parameters."""
        if not callable(getattr(pl_module, "compute_loss", None)):
            return self._skip("zero-order", "the module has no compute_loss(step, key)")
        inner = getattr(optimizer, "optimizer", optimizer)  # unwrap LightningOptimizer
        if callable(getattr(inner, "probe", None)):
            return self._optimizer_probe(pl_module, inner, step)
        return self._fallback_probe(pl_module, inner, step)

    def _optimizer_probe(self, pl_module: nn.Module, optimizer: Any, step: int) -> dict[str, float]:
        def loss_at(key: int) -> Tensor:
            return pl_module.compute_loss(step, key)

        out = {"zo_grad": total_variance(optimizer.probe(loss_at, self.probes))}
        if self.compare_crns:
            try:
                accepts_crns = "crns" in inspect.signature(optimizer.probe).parameters
            except (TypeError, ValueError):
                accepts_crns = False
            if accepts_crns:
                off = total_variance(optimizer.probe(loss_at, self.probes, crns=False))
                out["zo_grad_nocrns"] = off
                out["zo_crns_ratio"] = off / out["zo_grad"] if out["zo_grad"] > 0 else math.inf
        return out

    def _resolve_eps(self, optimizer: Any, dtype: torch.dtype) -> float:
        if self.eps is not None:
            return self.eps
        if optimizer is not None and is_zeroth_order(optimizer):
            eps = optimizer.param_groups[0].get("eps", getattr(optimizer, "eps", None))
            if isinstance(eps, (int, float)) and eps > 0:
                return float(eps)
        return 1e-4 if dtype == torch.float64 else 1e-3

    def _fallback_probe(self, pl_module: nn.Module, optimizer: Any, step: int) -> dict[str, float]:
        named = [(f"problem.{n}", p) for n, p in pl_module.named_parameters() if p.requires_grad]
        if not named:
            return self._skip("zero-order", "the module has no trainable parameters")
        device = named[0][1].device
        eps = self._resolve_eps(optimizer, named[0][1].dtype)
        wrapper = _LossAt(pl_module)
        acc_dtype = [torch.promote_types(p.dtype, torch.float32) for _, p in named]

        def loss(z: list[Tensor], sign: float, key: int) -> float:
            params = {n: p + (sign * eps) * zi for (n, p), zi in zip(named, z, strict=True)}
            with self._keep_point_cache(pl_module):  # do not let probe points pile up
                value = torch.func.functional_call(wrapper, params, (step, key), strict=False)
            return float(value.detach())

        modes = ("on", "off") if self.compare_crns else ("on",)
        sums = {
            m: [torch.zeros_like(p, dtype=dt) for (_, p), dt in zip(named, acc_dtype, strict=True)]
            for m in modes
        }
        sq = dict.fromkeys(modes, 0.0)
        cs: dict[str, list[float]] = {m: [] for m in modes}
        for j in range(self.probes):
            gen = self._generator(device, Stream.VARIANCE_DIRECTIONS, step, j)
            z = [
                torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype) for _, p in named
            ]
            z_sq = sum(float(zi.double().square().sum()) for zi in z)
            key = PROBE_KEY_BASE + 2 * j
            plus = loss(z, 1.0, key)
            minus = {"on": loss(z, -1.0, key)}
            if self.compare_crns:
                minus["off"] = loss(z, -1.0, key + 1)  # independent points and directions
            for m in modes:
                c = (plus - minus[m]) / (2 * eps)
                cs[m].append(c)
                sq[m] += c * c * z_sq
                for acc, zi in zip(sums[m], z, strict=True):
                    acc.add_(zi, alpha=c)
        n = self.probes
        out: dict[str, float] = {}
        for m in modes:
            mean_sq = sum(float(a.double().square().sum()) for a in sums[m]) / n  # n |g_bar|^2
            suffix = "" if m == "on" else "_nocrns"
            out["zo_grad" + suffix] = (sq[m] - mean_sq) / (n - 1)
            out["zo_proj" + suffix] = float(torch.tensor(cs[m], dtype=torch.float64).var())
        if self.compare_crns:
            on = out["zo_grad"]
            out["zo_crns_ratio"] = out["zo_grad_nocrns"] / on if on > 0 else math.inf
        return out
