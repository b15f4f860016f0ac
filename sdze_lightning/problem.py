"""``PINNProblem``: a PDE as a ``LightningModule``.

A new PDE subclasses :class:`PINNProblem` and implements

* :meth:`~PINNProblem.sample_interior` (and :meth:`~PINNProblem.sample_boundary`
  when the boundary is not imposed exactly) from an explicit generator,
* :meth:`~PINNProblem.residual`, written against the
  :class:`~sdze_lightning.derivatives.Derivatives` accessor,
* optionally :meth:`~PINNProblem.exact_solution`, a hard ``constraint`` and
  :meth:`~PINNProblem.boundary_target`,

and declares the operators its residual uses in ``operators``. Network,
spatial estimator and method are injected. Collocation points are sampled
inside ``training_step`` from a per-step seed, so
``lightning.Trainer(max_steps=...).fit(problem)`` needs no DataModule.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from sdze_lightning.constraints import Constraint
from sdze_lightning.derivatives import Derivatives
from sdze_lightning.estimators import Estimator, build_estimator
from sdze_lightning.estimators.base import OPERATORS
from sdze_lightning.methods.base import build_optimizer, is_zeroth_order
from sdze_lightning.metrics import RelativeL2Error
from sdze_lightning.model_fn import ModelFunction
from sdze_lightning.nn.mlp import MLP

log = logging.getLogger(__name__)

warnings.filterwarnings("ignore", message=".*does not have many workers.*")

_MASK = (1 << 63) - 1
#: Streams of the per-step seed: what each generator is used for.
STREAM_INTERIOR, STREAM_BOUNDARY, STREAM_ESTIMATOR, STREAM_EVAL = 1, 2, 3, 4


def mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (splitmix64 finaliser per part)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & _MASK


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss is NaN or infinite; no update is applied."""

    def __init__(self, step: int, terms: dict[str, float], method_state: str = "") -> None:
        self.step = step
        self.terms = terms
        msg = f"Non-finite loss at step {step}: {terms}. The update of this step was not applied."
        if method_state:
            msg += f" Method state: {method_state}."
        super().__init__(msg)


SUPPORTED_PRECISIONS = ("64-true", "64", "32-true", "32", "bf16-mixed", "bf16-true", "bf16")


def check_precision(precision: Any) -> None:
    """Raise ``ValueError`` for a Trainer precision this library cannot train with.

    ``16-mixed`` scales gradients that zeroth-order steps do not have, and
    float16 finite differences lose all accuracy.
    """
    value = str(precision)
    if value.startswith("16") or value not in SUPPORTED_PRECISIONS:
        raise ValueError(
            f"trainer.precision={value} is not supported: float16 loss scaling has no "
            "gradients to scale under zeroth-order training, and float16 finite "
            "differences lose all accuracy. Use 64-true, 32-true or bf16-mixed."
        )


class _StepIndices(Dataset):
    """``n`` dummy items: points are sampled in ``training_step``, not loaded."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class PINNProblem(L.LightningModule):
    """Base class of physics-informed problems (manual optimization).

    Args:
        dim: Spatial dimension ``d`` (time, if any, is an extra input).
        net: Network module, or a factory called as ``net(in_features=...)``
            (e.g. a Hydra ``_partial_`` of :class:`~sdze_lightning.nn.MLP`).
            Defaults to an ``MLP`` of width 128 and depth 4.
        estimator: An :class:`~sdze_lightning.estimators.Estimator` or a
            registered name; defaults to ``"exact"``.
        method: Optimizer class or partial; zeroth-order methods receive the
            network module, others its parameters. Defaults to Adam(lr=1e-3).
        scheduler: Optional learning-rate scheduler partial, stepped every step.
        n_interior: Interior collocation points per step.
        n_boundary: Boundary/initial points per step (0 when the boundary is
            imposed by a hard constraint).
        boundary_weight: Weight of the boundary term in the loss.
        n_eval: Held-out points for the relative L2 error.
        seed: Seed of sampling and estimator randomness.
        squared_residual: ``"biased"`` (mean of ``r_hat^2``) or ``"unbiased"``
            (mean of ``r_hat_1 * r_hat_2`` from two independent halves of the
            estimator's directions).
        steps_per_epoch: Steps between validations (one "epoch" of dummy items).

    """

    #: Operators the residual uses; checked against the estimator at construction.
    operators: ClassVar[tuple[str, ...]] = ("u", "laplacian")
    #: Whether the last input coordinate is time.
    time_dependent: ClassVar[bool] = False

    def __init__(
        self,
        dim: int,
        net: nn.Module | Callable[..., nn.Module] | None = None,
        estimator: Estimator | str | None = None,
        method: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        n_interior: int = 100,
        n_boundary: int = 0,
        boundary_weight: float = 1.0,
        n_eval: int = 2000,
        seed: int = 0,
        squared_residual: str = "biased",
        steps_per_epoch: int = 1000,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        for name, value in (("pde.dim", dim), ("pde.n_interior", n_interior)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name, value in (("pde.n_boundary", n_boundary), ("pde.n_eval", n_eval)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        if squared_residual not in ("biased", "unbiased"):
            raise ValueError(
                f"pde.squared_residual must be 'biased' or 'unbiased', got {squared_residual!r}."
            )
        unknown = sorted(set(self.operators) - set(OPERATORS))
        if unknown:
            raise ValueError(
                f"{type(self).__name__}.operators has unknown names {unknown}; "
                f"available: {sorted(OPERATORS)}."
            )
        self.dim = dim
        self.input_dim = dim + (1 if self.time_dependent else 0)
        self.n_interior = n_interior
        self.n_boundary = n_boundary
        self.boundary_weight = boundary_weight
        self.n_eval = n_eval
        self.seed = seed
        self.squared_residual = squared_residual
        self.steps_per_epoch = steps_per_epoch

        self.net = self._build_net(net)
        if estimator is None:
            estimator = "exact"
        self.estimator = build_estimator(estimator) if isinstance(estimator, str) else estimator
        if not isinstance(self.estimator, Estimator):
            raise TypeError(f"estimator must be an Estimator or a name, got {type(estimator)}.")
        self.estimator.check(self.operators)
        if squared_residual == "unbiased":
            self._halves = self.estimator.halves()
        self.method = method or functools.partial(torch.optim.Adam, lr=1e-3)
        self.scheduler = scheduler
        self.constraint: Constraint | None = None
        self.rel_l2 = RelativeL2Error()
        self.last_loss: float = float("nan")
        self._points: dict[tuple[int, int], Tensor] = {}

    # ------------------------------------------------------------- user contract
    def sample_interior(self, n: int, generator: torch.Generator) -> Tensor:
        """Return ``n`` interior points ``(n, input_dim)`` drawn with ``generator``."""
        raise NotImplementedError(f"{type(self).__name__} must implement sample_interior().")

    def sample_boundary(self, n: int, generator: torch.Generator) -> Tensor:
        """Return ``n`` boundary/initial points; needed when ``n_boundary > 0``."""
        raise NotImplementedError(
            f"{type(self).__name__} has n_boundary={self.n_boundary} but no sample_boundary()."
        )

    def residual(self, x: Tensor, d: Derivatives) -> Tensor:
        """Return the PDE residual ``L u - f`` at ``x``, shape ``(N,)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement residual().")

    def exact_solution(self, x: Tensor) -> Tensor | None:
        """Return the exact (or reference) solution at ``x``, or ``None`` if unknown."""
        return None

    def boundary_target(self, x: Tensor) -> Tensor:
        """Prescribed boundary/initial values; defaults to the exact solution."""
        target = self.exact_solution(x)
        if target is None:
            raise NotImplementedError(
                f"{type(self).__name__} samples boundary points but defines neither "
                "boundary_target() nor exact_solution()."
            )
        return target

    def boundary_residual(self, x: Tensor) -> Tensor:
        """Return the boundary residual at boundary points ``x``, shape ``(N,)``."""
        return self.model(x) - self.boundary_target(x).to(self.dtype)

    # ------------------------------------------------------------------ helpers
    def _build_net(self, net: nn.Module | Callable[..., nn.Module] | None) -> nn.Module:
        if net is None:
            return MLP(self.input_dim)
        if not isinstance(net, nn.Module):
            net = net(in_features=self.input_dim)
        in_features = getattr(net, "in_features", None)
        if in_features is not None and in_features != self.input_dim:
            raise ValueError(
                f"The network takes {in_features} inputs but the problem has input dimension "
                f"{self.input_dim} (dim={self.dim}"
                f"{' + time' if self.time_dependent else ''}); set model.in_features accordingly "
                "or pass a factory."
            )
        return net

    @property
    def model(self) -> ModelFunction:
        """The solution ``u`` as a function of the points (network + constraint)."""
        compose = None
        if type(self).hard_constraint is not PINNProblem.hard_constraint:
            compose = self.hard_constraint
        return ModelFunction(self.net, self.constraint, compose)

    def hard_constraint(self, x: Tensor, out: Tensor) -> Tensor:
        """Custom map from network output to ``u``; override only if ``constraint`` cannot express it.

        Overriding it disables the dimension-free fast paths of the estimators.
        """
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Return the predicted solution ``u(x)``, shape ``(N,)``."""
        return self.model(x)

    def generator(self, *parts: int) -> torch.Generator:
        """A generator on this module's device seeded from ``(seed, *parts)``."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(mix_seed(self.seed, *parts))
        return gen

    def rand(self, *shape: int, generator: torch.Generator) -> Tensor:
        """Uniform ``[0, 1)`` samples on this module's device and dtype."""
        return torch.rand(*shape, generator=generator, device=self.device, dtype=self.dtype)

    def randn(self, *shape: int, generator: torch.Generator) -> Tensor:
        """Standard normal samples on this module's device and dtype."""
        return torch.randn(*shape, generator=generator, device=self.device, dtype=self.dtype)

    # --------------------------------------------------------------------- loss
    def points(self, step: int, key: int) -> Tensor:
        """Interior points of ``step`` for noise key ``key`` (cached within the step)."""
        cached = self._points.get((step, key))
        if cached is None:
            cached = self.sample_interior(self.n_interior, self.generator(step, key, STREAM_INTERIOR))
            self._points = {(step, key): cached} | {
                k: v for k, v in self._points.items() if k[0] == step
            }
        return cached

    def derivatives(
        self, x: Tensor, generator: torch.Generator, estimator: Estimator | None = None
    ) -> Derivatives:
        """Estimate the declared operators at ``x``."""
        est = estimator or self.estimator
        values = est.estimate(self.model, x, self.operators, generator, self.dim)
        return Derivatives(x, values, self.dim)

    def _checked_residual(self, x: Tensor, d: Derivatives) -> Tensor:
        r = self.residual(x, d)
        if not isinstance(r, Tensor) or r.shape != (x.shape[0],):
            shape = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
            raise ValueError(
                f"{type(self).__name__}.residual() must return a tensor of shape "
                f"({x.shape[0]},) (one value per point), got {shape}."
            )
        if not r.is_floating_point():
            raise TypeError(
                f"{type(self).__name__}.residual() must return a floating tensor, got {r.dtype}."
            )
        return r

    def interior_residuals(self, step: int, key: int = 0) -> tuple[Tensor, ...]:
        """Per-point residual(s) of ``step``: one tensor, or two independent halves."""
        x = self.points(step, key)
        gen = self.generator(step, key, STREAM_ESTIMATOR)
        if self.squared_residual == "unbiased":
            return tuple(self._checked_residual(x, self.derivatives(x, gen, h)) for h in self._halves)
        return (self._checked_residual(x, self.derivatives(x, gen)),)

    def loss_terms(self, step: int, key: int = 0) -> dict[str, Tensor]:
        """Loss of ``step`` as a dict with ``"loss"``, ``"interior"`` and ``"boundary"``."""
        res = self.interior_residuals(step, key)
        interior = (res[0] * res[-1]).mean()
        terms = {"interior": interior}
        loss = interior
        if self.n_boundary > 0:
            xb = self.sample_boundary(self.n_boundary, self.generator(step, key, STREAM_BOUNDARY))
            if xb.shape[0] == 0:
                raise ValueError(f"{type(self).__name__}.sample_boundary() returned no points.")
            rb = self.boundary_residual(xb)
            terms["boundary"] = rb.square().mean()
            loss = loss + self.boundary_weight * terms["boundary"]
        terms["loss"] = loss
        return terms

    def compute_loss(self, step: int, key: int = 0) -> Tensor:
        """Scalar training loss of ``step`` for noise key ``key``."""
        return self.loss_terms(step, key)["loss"]

    def residual_batch(self, step: int, key: int = 0) -> tuple[Tensor, Tensor | None]:
        """Per-point interior residual ``(N,)`` and weighted boundary term (or ``None``).

        For optimizers that need per-point residual gradients (``needs_residuals``,
        e.g. :class:`~sdze_lightning.methods.PDEAware`); the two halves of the
        unbiased form are averaged.
        """
        res = self.interior_residuals(step, key)
        r = res[0] if len(res) == 1 else 0.5 * (res[0] + res[1])
        boundary = None
        if self.n_boundary > 0:
            xb = self.sample_boundary(self.n_boundary, self.generator(step, key, STREAM_BOUNDARY))
            boundary = self.boundary_weight * self.boundary_residual(xb).square().mean()
        return r, boundary

    # ---------------------------------------------------------------- lightning
    def setup(self, stage: str) -> None:
        """Reject incompatible Trainer settings before anything runs."""
        trainer = getattr(self, "_trainer", None)
        check_precision(getattr(trainer, "precision", "32-true") if trainer else "32-true")

    def on_fit_start(self) -> None:
        """Check the residual contract on a tiny batch before the first step."""
        with torch.no_grad():
            x = self.sample_interior(2, self.generator(-1, 0, STREAM_INTERIOR))
            if x.dim() != 2 or x.shape[1] != self.input_dim:
                raise ValueError(
                    f"{type(self).__name__}.sample_interior() must return (n, {self.input_dim}) "
                    f"points, got {tuple(x.shape)}."
                )
            self._checked_residual(x, self.derivatives(x, self.generator(-1, 0, STREAM_ESTIMATOR)))
            if self.n_boundary > 0:
                xb = self.sample_boundary(2, self.generator(-1, 0, STREAM_BOUNDARY))
                if xb.dim() != 2 or xb.shape[0] == 0 or xb.shape[1] != self.input_dim:
                    raise ValueError(
                        f"{type(self).__name__}.sample_boundary() must return (n, "
                        f"{self.input_dim}) points with n > 0, got {tuple(xb.shape)}."
                    )
        if is_zeroth_order(self.method) and not self.estimator.forward_only:
            log.warning(
                "estimator=%s back-propagates through x: the zeroth-order method still works, "
                "but memory is no longer inference-level.",
                self.estimator.name,
            )

    def on_train_end(self) -> None:
        """Fold the method's implicit offset (SDZE) into the weights at the end of training.

        The network is then a plain module; the function it computes does not change.
        """
        for opt in self.trainer.optimizers:
            fold = getattr(opt, "fold", None)
            if callable(fold):
                fold()

    def configure_optimizers(self) -> Any:
        """Build the injected method (and scheduler)."""
        opt = build_optimizer(self.method, self.net)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt), "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        """Dummy loader: one item per step; points are sampled in ``training_step``."""
        return DataLoader(
            _StepIndices(self.steps_per_epoch),
            batch_size=None,
            shuffle=False,
            generator=self._loader_generator(),
        )

    def val_dataloader(self) -> DataLoader:
        """One dummy item: validation evaluates the held-out set."""
        return DataLoader(_StepIndices(1), batch_size=None, generator=self._loader_generator())

    def _loader_generator(self) -> torch.Generator:
        # A DataLoader iterator draws its base seed from its generator, by default the
        # global one; an own generator keeps the global RNG untouched by training.
        gen = torch.Generator()
        gen.manual_seed(self.seed)
        return gen

    def _first_layer_cache(self) -> Any:
        cache = getattr(self.net, "first_layer_cache", None)
        return cache() if cache is not None else contextlib.nullcontext()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """One optimizer step on freshly sampled points."""
        opt = self.optimizers()
        inner = opt.optimizer
        zeroth_order = is_zeroth_order(inner)
        step = self.global_step
        terms: dict[str, Tensor] = {}

        def closure() -> Tensor:
            key = getattr(inner, "noise_key", 0)
            if not zeroth_order:
                opt.zero_grad(set_to_none=True)
            out = self.loss_terms(step, key)
            if not torch.isfinite(out["loss"]):
                raise NonFiniteLossError(
                    step,
                    {k: float(v) for k, v in out.items()},
                    getattr(inner, "describe_state", lambda: "")(),
                )
            if not zeroth_order:
                self.manual_backward(out["loss"])
            terms.clear()
            terms.update(out)
            return out["loss"]

        kwargs: dict[str, Any] = {}
        if getattr(inner, "needs_residuals", False):  # e.g. pde_aware: per-point residuals
            kwargs["residuals"] = functools.partial(self.residual_batch, step)
        with self._first_layer_cache():
            loss = opt.step(closure=closure, **kwargs)
        self._points = {}
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        loss = loss if isinstance(loss, Tensor) else terms["loss"]
        self.last_loss = float(loss.detach())
        self.log("train/loss", loss.detach(), prog_bar=True)
        if "boundary" in terms:
            self.log("train/boundary", terms["boundary"].detach())

    # ---------------------------------------------------------------- evaluation
    def eval_batches(self, chunk: int = 512) -> Iterator[tuple[Tensor, Tensor]]:
        """Held-out points and reference values in chunks (fixed seed)."""
        gen = self.generator(0, 0, STREAM_EVAL)
        remaining = self.n_eval
        while remaining > 0:
            n = min(chunk, remaining)
            x = self.sample_interior(n, gen)
            ref = self.exact_solution(x)
            if ref is None:
                return
            yield x, ref.to(self.dtype)
            remaining -= n

    @torch.no_grad()
    def relative_l2_error(self) -> float | None:
        """Relative L2 error on the held-out points, or ``None`` without a reference."""
        metric = RelativeL2Error().to(self.device)
        found = False
        for x, ref in self.eval_batches():
            metric.update(self(x), ref)
            found = True
        return float(metric.compute()) if found else None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Log ``val/rel_l2`` on the held-out points (torchmetrics, DDP-safe)."""
        found = False
        with torch.no_grad():
            for x, ref in self.eval_batches():
                self.rel_l2.update(self(x), ref)
                found = True
        if found:
            self.log("val/rel_l2", self.rel_l2, prog_bar=True)

