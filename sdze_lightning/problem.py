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

Under ``strategy=ddp`` each rank evaluates its share of every batch
(:mod:`sdze_lightning.distributed`); a NaN/Inf loss stops or skips the step
(``divergence``, :mod:`sdze_lightning.divergence`); :meth:`PINNProblem.check_inputs`
validates the user contract before the first step.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import numbers
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from sdze_lightning.constraints import Constraint
from sdze_lightning.derivatives import Derivatives
from sdze_lightning.distributed import Shard, all_reduce_mean, all_true
from sdze_lightning.divergence import MAX_CONSECUTIVE_SKIPS, NonFiniteLossError, check_policy
from sdze_lightning.estimators import Estimator, build_estimator
from sdze_lightning.estimators.base import OPERATORS
from sdze_lightning.memory_budget import Need, check_fits
from sdze_lightning.methods.base import (
    ZerothOrderOptimizer,
    build_optimizer,
    gradient_numel,
    is_zeroth_order,
    needs_forward_only_estimator,
)
from sdze_lightning.methods.registry import build_method
from sdze_lightning.metrics import RelativeL2Error
from sdze_lightning.model_fn import ModelFunction
from sdze_lightning.nn.mlp import MLP
from sdze_lightning.prefetch import BatchPrefetcher, PreparePlacement
from sdze_lightning.seeding import Stream, mix
from sdze_lightning.threads import check_threads, resolve_threads

log = logging.getLogger(__name__)

#: Input numbers per held-out chunk at most (1 GiB in float32): the held-out points are
#: drawn, evaluated and dropped chunk by chunk, so ``n_eval`` costs time, not memory.
#: Up to d = 524,288 a chunk is 512 points, as the held-out set was always drawn.
EVAL_CHUNK_ELEMENTS = 1 << 28
EVAL_MAX_CHUNK = 512

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


def _describe(optimizer: torch.optim.Optimizer) -> str:
    """The method's state for divergence reports (zeroth-order state, or the learning rate)."""
    if isinstance(optimizer, ZerothOrderOptimizer):
        return optimizer.describe_state()
    lrs = [g.get("lr") for g in optimizer.param_groups]
    return f"{type(optimizer).__name__}(lr={lrs[0] if len(lrs) == 1 else lrs})"


@dataclass
class StepOutcome:
    """What one optimizer step did (:meth:`PINNProblem.run_step`).

    Attributes:
        loss: The step's loss (detached; zeroth-order: the mean of the evaluated
            losses); NaN for a skipped step.
        terms: Loss terms (``"loss"``, ``"interior"``, ``"boundary"``) of the step's
            last evaluation.
        skipped: For a non-finite step skipped under ``skip_nonfinite``: its report
            (nothing of the step was applied); ``None`` otherwise.

    """

    loss: Tensor
    terms: dict[str, Tensor]
    skipped: NonFiniteLossError | None = None


def _snapshot(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list[Tensor]]:
    """Copies of an optimizer's state and of its parameters (restored by :func:`_restore`)."""
    params = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
    return copy.deepcopy(optimizer.state_dict()), params


@torch.no_grad()
def _restore(optimizer: torch.optim.Optimizer, saved: tuple[dict[str, Any], list[Tensor]]) -> None:
    state, params = saved
    for p, value in zip((p for g in optimizer.param_groups for p in g["params"]), params,
                        strict=True):
        p.copy_(value)
    optimizer.load_state_dict(state)


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
        method: Optimizer class or partial, or a method's name (``"sdze"``: the
            packaged ``configs/method/<name>.yaml``, seeded with ``seed``);
            zeroth-order methods receive the network module, others its
            parameters. Defaults to Adam(lr=1e-3).
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
        divergence: On a NaN/Inf loss, ``"stop"`` training (raise
            :class:`~sdze_lightning.divergence.NonFiniteLossError`) or ``"skip"``
            the step (counted, not applied); see :mod:`sdze_lightning.divergence`.
        prefetch: Sample the next step's interior batch on a background thread while
            the current step runs, and split :meth:`prepare_batch` on it between
            that thread and the main one (:mod:`sdze_lightning.prefetch`). Same numbers;
            faster steps at large ``d`` where a core is free; one more batch in
            memory. ``sample_interior`` and ``prepare_batch`` may then run on that
            thread: they must depend only on their arguments and on state fixed
            before training (not on the network).
            Prefetches the shared batch of CRNS steps and of first-order methods; a
            zeroth-order method with ``crns=False`` gets no prefetching (warned).
        fused_kernels: Let the problem run its per-batch data (e.g. the two-body
            source) through fused ``torch.compile`` kernels where it has them
            (:mod:`sdze_lightning.kernels`): faster at large ``d``, another
            summation order than the eager code. Recorded in ``summary.json``.
        threads: torch's intra-op thread count during ``fit`` (restored afterwards):
            ``"auto"`` picks it from the step's work and the cores free when ``fit``
            starts (:mod:`sdze_lightning.threads`), an integer is used as given.
            The count used is :attr:`intra_op_threads`.

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
        method: Callable[..., torch.optim.Optimizer] | str | None = None,
        scheduler: Callable[..., Any] | None = None,
        n_interior: int = 100,
        n_boundary: int = 0,
        boundary_weight: float = 1.0,
        n_eval: int = 2000,
        seed: int = 0,
        squared_residual: str = "biased",
        steps_per_epoch: int = 1000,
        divergence: str = "stop",
        prefetch: bool = False,
        fused_kernels: bool = True,
        threads: int | str = "auto",
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        for name, value in (
            ("pde.dim", dim),
            ("pde.n_interior", n_interior),
            ("pde.steps_per_epoch", steps_per_epoch),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name, value in (("pde.n_boundary", n_boundary), ("pde.n_eval", n_eval)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        if isinstance(boundary_weight, bool) or not isinstance(boundary_weight, int | float):
            raise ValueError(f"pde.boundary_weight must be a number, got {boundary_weight!r}.")
        check_policy(divergence)
        for name, flag in (("pde.prefetch", prefetch), ("pde.fused_kernels", fused_kernels)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be true or false, got {flag!r}.")
        check_threads(threads)
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
        self.divergence = divergence
        self.fused_kernels = fused_kernels
        self.threads = threads
        #: The intra-op thread count of the last ``fit`` (``None`` before one).
        self.intra_op_threads: int | None = None
        self._threads_before: int | None = None
        #: This rank's share of each batch (the whole batch unless data-parallel).
        self.shard = Shard()
        #: Steps skipped under ``divergence="skip"`` (in total, and in a row).
        self.skipped_steps = 0
        self._skips_in_a_row = 0

        self.net = self._build_net(net)
        if estimator is None:
            estimator = "exact"
        self.estimator = build_estimator(estimator) if isinstance(estimator, str) else estimator
        if not isinstance(self.estimator, Estimator):
            raise TypeError(f"estimator must be an Estimator or a name, got {type(estimator)}.")
        self.estimator.check(self.operators)
        if squared_residual == "unbiased":
            self._halves = self.estimator.halves()
        if isinstance(method, str):
            method = build_method(method, seed=seed)
        self.method = method or functools.partial(torch.optim.Adam, lr=1e-3)
        if needs_forward_only_estimator(self.method) and not self.estimator.forward_only:
            raise ValueError(
                f"estimator={self.estimator.name} back-propagates through x, which this method "
                "cannot do (it keeps the input layer's gradient as factors); use a "
                "forward-mode estimator: estimator=taylor, fd or stein."
            )
        self.scheduler = scheduler
        self.constraint: Constraint | None = None
        self.rel_l2 = RelativeL2Error()
        self.last_loss: float = float("nan")
        self._points: dict[tuple[int, int], Tensor] = {}
        self._prefetcher = BatchPrefetcher(self._training_batch) if prefetch else None
        #: Which thread prepares prefetched batches (chosen from measured times).
        self._placement = PreparePlacement()
        #: Whether :meth:`prepare_batch` takes ``rows`` (an older override may not).
        self._prepare_takes_rows = "rows" in inspect.signature(self.prepare_batch).parameters
        self._main_since: float | None = None

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
            net = functools.partial(MLP)
        if not isinstance(net, nn.Module):
            given = getattr(net, "keywords", {}).get("in_features")
            if given is not None and given != self.input_dim:
                raise ValueError(
                    f"model.in_features={given!r} but the problem has input dimension "
                    f"{self.input_dim} (pde.dim={self.dim}"
                    f"{' + time' if self.time_dependent else ''}); drop model.in_features: "
                    "the problem fills it in."
                )
            self._check_network_fits(net)
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

    def _check_network_fits(self, factory: Callable[..., nn.Module]) -> None:
        """Refuse a network whose parameters cannot fit, before allocating them.

        Works for factories whose target has ``parameter_count(in_features=..., **kw)``
        (:meth:`MLP.parameter_count`); others are built unchecked.
        """
        count = getattr(getattr(factory, "func", factory), "parameter_count", None)
        if not callable(count):
            return
        try:
            params = count(**{**getattr(factory, "keywords", {}), "in_features": self.input_dim})
        except (TypeError, ValueError):
            return  # bad values: the constructor reports them
        itemsize = torch.empty((), dtype=torch.get_default_dtype()).element_size()
        check_fits([self._network_need(params, itemsize)])

    def _network_need(self, params: int, itemsize: int, what: str = "network parameters") -> Need:
        width = "model.width (or pde.dim)" if self.input_dim > 1000 else "model.width"
        return Need(f"{what} ({params:,})", params * itemsize, f"lower {width}")

    def _check_training_fits(self) -> None:
        """Refuse a run whose batches (and gradients) cannot fit next to the network.

        The network is already allocated (the available memory excludes it); a
        first-order method adds at least a gradient per parameter, each step holds its
        collocation batch (two with ``prefetch``) and validation a held-out chunk.
        """
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        needs = []
        grads = gradient_numel(self.method, self.net)
        if grads:
            needs.append(self._network_need(grads, itemsize, "gradients"))
        batches = 2 if self._prefetcher is not None else 1
        points = (self.n_interior + self.n_boundary) * batches
        needs.append(Need(
            f"collocation batch ({points} points x {self.input_dim} inputs)",
            points * self.input_dim * itemsize,
            "lower pde.n_interior" + (" or set prefetch=false" if batches > 1 else ""),
        ))
        rows = min(self.n_eval, self.eval_chunk_rows())
        needs.append(Need(f"held-out chunk ({rows} points)", rows * self.input_dim * itemsize,
                          "lower pde.n_eval"))
        check_fits(needs, self.device)

    @property
    def model(self) -> ModelFunction:
        """The solution ``u`` as a function of the points (network + constraint)."""
        compose = None
        if type(self).hard_constraint is not PINNProblem.hard_constraint:
            compose = self.hard_constraint
        return ModelFunction(self.net, self.constraint, compose)

    def hard_constraint(self, x: Tensor, out: Tensor) -> Tensor:
        """Custom map from network output to ``u``; override only if ``constraint`` cannot.

        Overriding it disables the dimension-free fast paths of the estimators.
        """
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Return the predicted solution ``u(x)``, shape ``(N,)``."""
        return self.model(x)

    def generator(self, *parts: int, stream: Stream = Stream.USER) -> torch.Generator:
        """A generator on this module's device seeded from ``(stream, seed, *parts)``.

        A problem's own draws use the default ``Stream.USER``; the library's draws
        (points, estimator directions, evaluation set) have their own streams
        (:mod:`sdze_lightning.seeding`), so the two never share numbers.
        """
        gen = torch.Generator(device=self.device)
        gen.manual_seed(mix(stream, self.seed, *parts))
        return gen

    def rand(self, *shape: int, generator: torch.Generator) -> Tensor:
        """Uniform ``[0, 1)`` samples on this module's device and dtype."""
        return torch.rand(*shape, generator=generator, device=self.device, dtype=self.dtype)

    def randn(self, *shape: int, generator: torch.Generator) -> Tensor:
        """Standard normal samples on this module's device and dtype."""
        return torch.randn(*shape, generator=generator, device=self.device, dtype=self.dtype)

    # --------------------------------------------------------------------- loss
    def points(self, step: int, key: int) -> Tensor:
        """Interior points of ``step`` for noise key ``key`` (cached within the step).

        Under data parallelism, this rank's share (:attr:`shard`) of the batch:
        every rank samples the whole batch from the same seed and keeps its rows.
        """
        cached = self._points.get((step, key))
        if cached is None:
            cached = self._sample_points(step, key)
            self._points = {(step, key): cached} | {
                k: v for k, v in self._points.items() if k[0] == step
            }
        return cached

    @contextlib.contextmanager
    def isolated_points(self) -> Iterator[None]:
        """Points cached inside the block (probes, measurements) are dropped at its end.

        The per-step cache of :meth:`points` is left as the block found it.
        """
        saved = dict(self._points)
        try:
            yield
        finally:
            self._points = saved

    def sample_points(self, step: int, key: int = 0) -> Tensor:
        """Interior points of ``step`` for noise key ``key``, drawn anew (not cached)."""
        return self._sample_points(step, key)

    def _sample_points(self, step: int, key: int) -> Tensor:
        gen = self.generator(step, key, stream=Stream.INTERIOR)
        full = self.sample_interior(self.n_interior, gen)
        return self.shard.take(full)

    def prepare_batch(self, x: Tensor, rows: int | None = None) -> None:
        """Compute and cache what depends on the interior batch ``x`` only.

        Called for the next step's batch on the prefetch thread (``prefetch=True``),
        e.g. an analytic source term; it must not use the network or any state that
        changes during training. The default does nothing.

        Args:
            x: The batch.
            rows: Prepare (about) the first ``rows`` rows only; the main thread
                then calls it again with ``None`` to prepare the rest (it splits
                the work between the threads, see
                :class:`~sdze_lightning.prefetch.PreparePlacement`). A problem may
                round ``rows`` or prepare everything at once. An override without
                this argument (``prepare_batch(self, x)``) keeps working: its batch
                is then prepared whole, on whichever thread would take most of it.

        """

    def _prepare_ahead(self, x: Tensor) -> None:
        """Prepare the prefetch thread's share of ``x`` (:attr:`_placement`)."""
        rows = self._placement.rows_ahead(len(x))
        if self._prepare_takes_rows:
            if rows > 0:
                self.prepare_batch(x, rows)
        elif 2 * rows >= len(x):  # an override of the one-argument hook: all or nothing
            self.prepare_batch(x)

    def _training_batch(self, step: int) -> tuple[Tensor, float, float]:
        """Interior points of training ``step`` (key 0) with the times of building them.

        Returns ``(x, sampling seconds, prepare seconds)``; the prefetch thread
        prepares the share of rows that :attr:`_placement` gives it (none: 0 s).
        """
        t0 = time.perf_counter()
        x = self._sample_points(step, 0)
        t1 = time.perf_counter()
        self._prepare_ahead(x)
        return x, t1 - t0, time.perf_counter() - t1

    def begin_step(self, step: int) -> None:
        """Make the interior batch of training ``step`` ready (``prefetch=True``).

        Takes it from the prefetch thread (waiting if it is not done), prepares
        the rows the prefetch thread left (:class:`~sdze_lightning.prefetch.PreparePlacement`
        splits them between the threads) and starts the batch of ``step + 1``;
        without prefetching, does nothing (the batch is drawn when the loss first
        asks for it).
        """
        if self._prefetcher is None:
            return
        now = time.perf_counter()
        main_s = None if self._main_since is None else now - self._main_since
        x, sample_s, ahead_s = self._prefetcher.get(step)
        t0 = time.perf_counter()
        self.prepare_batch(x)
        self._placement.record(sample_s, ahead_s + time.perf_counter() - t0, main_s)
        self._points = {(step, 0): x}
        self._main_since = time.perf_counter()

    @property
    def prefetch(self) -> bool:
        """Whether training batches are prefetched (see the ``prefetch`` argument)."""
        return self._prefetcher is not None

    def stop_prefetch(self) -> None:
        """Stop the prefetch thread and drop the batch it was building."""
        self._main_since = None
        if self._prefetcher is not None:
            self._prefetcher.close()

    def derivatives(
        self,
        x: Tensor,
        generator: torch.Generator,
        estimator: Estimator | None = None,
        model: Callable[[Tensor], Tensor] | None = None,
    ) -> Derivatives:
        """The accessor ``d`` that :meth:`residual` receives, at any points (public).

        Training calls it with the step's points; call it yourself to look at the
        operators outside training, or to check a new PDE on its exact solution::

            d = problem.derivatives(x, torch.Generator(), ExactEstimator(),
                                    model=problem.exact_solution)
            problem.residual(x, d)  # ~0 in float64

        Args:
            x: Points ``(N, input_dim)``.
            generator: The randomness of a randomized estimator (unused by ``exact``).
            estimator: Another estimator than the problem's.
            model: Another function of the points than the network (``problem.model``),
                e.g. ``problem.exact_solution``.

        Returns:
            The declared :attr:`operators` at ``x``.

        """
        est = estimator or self.estimator
        values = est.estimate(model or self.model, x, self.operators, generator, self.dim)
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

    def boundary_points(self, step: int, key: int = 0) -> Tensor:
        """Boundary/initial points of ``step`` (this rank's share under data parallelism)."""
        gen = self.generator(step, key, stream=Stream.BOUNDARY)
        xb = self.sample_boundary(self.n_boundary, gen)
        if xb.shape[0] == 0:
            raise ValueError(f"{type(self).__name__}.sample_boundary() returned no points.")
        return self.shard.take(xb)

    def interior_residuals(
        self, step: int, key: int = 0, rows: slice | None = None
    ) -> tuple[Tensor, ...]:
        """Per-point residual(s) of ``step``: one tensor, or two independent halves.

        ``rows`` restricts them to those interior points (same estimator seed).
        """
        x = self.points(step, key)
        if rows is not None:
            x = x[rows]
        gen = self.generator(step, key, stream=Stream.ESTIMATOR)
        if self.squared_residual == "unbiased":
            return tuple(
                self._checked_residual(x, self.derivatives(x, gen, h)) for h in self._halves
            )
        return (self._checked_residual(x, self.derivatives(x, gen)),)

    def loss_terms(self, step: int, key: int = 0) -> dict[str, Tensor]:
        """Loss of ``step`` as a dict with ``"loss"``, ``"interior"`` and ``"boundary"``."""
        res = self.interior_residuals(step, key)
        # Under data parallelism: this rank's estimate of the global mean (shard.mean).
        interior = self.shard.mean(res[0] * res[-1], self.n_interior)
        terms = {"interior": interior}
        loss = interior
        if self.n_boundary > 0:
            rb = self.boundary_residual(self.boundary_points(step, key))
            terms["boundary"] = self.shard.mean(rb.square(), self.n_boundary)
            loss = loss + self.boundary_weight * terms["boundary"]
        terms["loss"] = loss
        return terms

    def compute_loss(self, step: int, key: int = 0) -> Tensor:
        """Scalar training loss of ``step`` for noise key ``key``."""
        return self.loss_terms(step, key)["loss"]

    def residual_batch(
        self, step: int, key: int = 0, rows: slice | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Per-point interior residual ``(N,)`` and weighted boundary term (or ``None``).

        For optimizers that need per-point residual gradients (``needs_residuals``,
        e.g. :class:`~sdze_lightning.methods.PDEAware`); the two halves of the
        unbiased form are averaged. With ``rows``, the residuals of those interior
        points only (recomputed on them alone) and no boundary term.
        """
        res = self.interior_residuals(step, key, rows)
        r = res[0] if len(res) == 1 else 0.5 * (res[0] + res[1])
        boundary = None
        if self.n_boundary > 0 and rows is None:
            xb = self.boundary_points(step, key)
            boundary = self.boundary_weight * self.boundary_residual(xb).square().mean()
        return r, boundary

    # ---------------------------------------------------------------- lightning
    def setup(self, stage: str) -> None:
        """Reject incompatible Trainer settings before anything runs."""
        trainer = getattr(self, "_trainer", None)
        check_precision(getattr(trainer, "precision", "32-true") if trainer else "32-true")

    def check_inputs(self) -> None:
        """Check the user contract on a tiny batch; raise a clear error naming what to fix.

        Runs before the first step (``on_fit_start``; the CLI calls it before
        creating any logger, checkpoint or summary): the points' shape, the
        network's input size, the residual's shape and dtype, and the boundary
        sample.
        """
        name = type(self).__name__
        with torch.no_grad():
            x = self.sample_interior(2, self.generator(-1, 0, stream=Stream.INTERIOR))
            if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.input_dim:
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(
                    f"{name}.sample_interior() must return (n, {self.input_dim}) points "
                    f"(dim={self.dim}{' + time' if self.time_dependent else ''}), got {shape}."
                )
            try:
                self.model(x)
            except RuntimeError as err:
                raise ValueError(
                    f"The network cannot evaluate points of shape {tuple(x.shape)}: {err}. "
                    f"It must take input_dim={self.input_dim} inputs (pde.dim={self.dim}"
                    f"{' + time' if self.time_dependent else ''}); fix model.in_features or "
                    "the network's first layer."
                ) from err
            r = self._checked_residual(
                x, self.derivatives(x, self.generator(-1, 0, stream=Stream.ESTIMATOR))
            )
            if r.dtype != x.dtype:
                raise TypeError(
                    f"{name}.residual() returned {r.dtype} for {x.dtype} points: compute it in "
                    "the points' dtype (create constants with x.new_tensor(...) or "
                    "dtype=x.dtype), or precision=64-true silently loses its accuracy."
                )
            if self.n_boundary > 0:
                xb = self.sample_boundary(2, self.generator(-1, 0, stream=Stream.BOUNDARY))
                if xb.dim() != 2 or xb.shape[0] == 0 or xb.shape[1] != self.input_dim:
                    raise ValueError(
                        f"{name}.sample_boundary() must return (n, "
                        f"{self.input_dim}) points with n > 0, got {tuple(xb.shape)}."
                    )
                rb = self.boundary_residual(xb)
                if not isinstance(rb, Tensor) or rb.shape != (xb.shape[0],):
                    shape = tuple(rb.shape) if isinstance(rb, Tensor) else type(rb).__name__
                    raise ValueError(
                        f"{name}.boundary_residual() must return one value per boundary point, "
                        f"shape ({xb.shape[0]},), got {shape} (check boundary_target())."
                    )
            elif self._needs_boundary_sample():
                raise ValueError(
                    f"pde.n_boundary=0, but {name} imposes its boundary/initial condition "
                    "through a loss on sampled boundary points (it defines sample_boundary() "
                    "and has no hard constraint): set pde.n_boundary to a positive number."
                )
        self._dry_build_method()
        self._check_training_fits()

    def _dry_build_method(self) -> None:
        """Build the method (and scheduler) once on a parameter-free copy of the network.

        Their constructors validate the ``method.*`` values; doing it here puts those
        errors before training (and before the CLI writes anything). The copy's
        parameters live on the ``meta`` device: no memory, and the real network is
        untouched (no hooks are attached to it).
        """
        memo: dict[int, Any] = {
            id(t): nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
            for t in self.net.parameters()
        }
        memo.update({id(b): torch.empty_like(b, device="meta") for b in self.net.buffers()})
        try:
            shadow = copy.deepcopy(self.net, memo)
        except Exception as err:  # noqa: BLE001 - any failure to copy: checked at fit time
            log.warning(
                "The method's configuration is checked when training starts, not now: the "
                "network cannot be copied for the early check (%s: %s).", type(err).__name__, err
            )
            return
        target = getattr(self.method, "func", self.method)
        name = getattr(target, "__name__", type(target).__name__)
        try:
            opt = build_optimizer(self.method, shadow)
            if self.scheduler is not None:
                self.scheduler(opt)
        except Exception as err:
            own = getattr(target, "__module__", "").startswith("sdze_lightning")
            if isinstance(err, ValueError) and own:
                raise  # this library's methods name the field themselves
            keywords = dict(getattr(self.method, "keywords", {}))
            raise ValueError(
                f"The method {name} rejects its configuration {keywords} "
                f"({type(err).__name__}: {err}); check the method.* (and scheduler) values."
            ) from err

    def _needs_boundary_sample(self) -> bool:
        cls = type(self)
        return (
            cls.sample_boundary is not PINNProblem.sample_boundary
            and self.constraint is None
            and cls.hard_constraint is PINNProblem.hard_constraint
        )

    def _setup_data_parallel(self) -> None:
        """Shard the batches and install the loss-value reduction under DDP.

        Zeroth-order two-point methods and plain first-order optimizers (whose
        gradients Lightning's DDP averages) evaluate this rank's share of the
        points. Optimizers that compute their own per-point gradients
        (``needs_residuals``, e.g. pde_aware) see the whole batch on every rank.
        """
        trainer = self.trainer
        self.shard = Shard()
        world = int(getattr(trainer, "world_size", 1) or 1)
        if world <= 1:
            return
        from lightning.pytorch.strategies import DDPStrategy

        inners = self._inner_optimizers()
        zeroth = self._zeroth_order_optimizers()
        if zeroth and not isinstance(trainer.strategy, DDPStrategy):
            raise ValueError(
                f"Zeroth-order methods support trainer.strategy=ddp (ddp, ddp_spawn, ddp_fork) "
                f"across devices; got {type(trainer.strategy).__name__}."
            )
        if any(getattr(o, "needs_residuals", False) for o in inners):
            return
        for name, n in (("pde.n_interior", self.n_interior), ("pde.n_boundary", self.n_boundary)):
            if 0 < n < world:
                raise ValueError(
                    f"{name}={n} is smaller than the number of ranks ({world}); every rank "
                    "needs at least one point."
                )
        self.shard = Shard(int(trainer.global_rank), world)
        for opt in zeroth:
            opt.reducer = all_reduce_mean

    def teardown(self, stage: str) -> None:
        """Stop prefetching; back to the whole batch and torch's thread count; methods closed.

        ``close()`` leaves the network a plain module (SDZE folds its offset and
        releases its forward hooks), so a later optimizer on the same network
        starts clean.
        """
        self.stop_prefetch()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None
        self.shard = Shard()
        for opt in self._zeroth_order_optimizers():
            opt.reducer = None
            opt.close()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the seeds a resumed run must share (the generators are stateless per step).

        Points and estimator directions are drawn from ``(seed, step, key, stream)``,
        a method's directions and bases from ``(method seed, step/window, layer)``:
        no generator state exists between steps, so the step counter (saved by
        Lightning) and these seeds fix the rest of the trajectory.
        """
        checkpoint["sdze_lightning"] = {
            "seed": int(self.seed),
            "method_seeds": [self._method_seed(o) for o in self._inner_optimizers()],
            "skipped_steps": self.skipped_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Prepare an exact resume; refuse another seed than the checkpoint's.

        Lightning loads the weights before it converts the module to the
        Trainer's precision: with ``precision=64-true`` a module built in
        float32 would round the float64 checkpoint to float32 first. Converting
        here, before the weights are loaded, keeps every bit.
        """
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            trainer.strategy.precision_plugin.convert_module(self)
        saved = checkpoint.get("sdze_lightning")
        if not saved:
            return
        if saved.get("seed") is not None and int(saved["seed"]) != int(self.seed):
            raise ValueError(
                f"The checkpoint was trained with seed={saved['seed']}, this problem has "
                f"seed={self.seed}; resume with seed={saved['seed']}."
            )
        self.skipped_steps = int(saved.get("skipped_steps", 0))
        self._resumed_from = saved

    def on_train_start(self) -> None:
        """Drop a batch prefetched by an earlier fit; after a resume, refuse another method seed.

        With ``prefetch=True`` and a zeroth-order method without CRNS (whose evaluations
        never use the shared key-0 batch) prefetching is turned off with a warning.
        """
        self.stop_prefetch()
        if self._prefetcher is not None and any(
            not o.crns for o in self._zeroth_order_optimizers()
        ):
            warnings.warn(
                "prefetch=true has no effect with method.crns=false (each evaluation draws "
                "its own points); prefetching is turned off.",
                stacklevel=2,
            )
            self._prefetcher = None
        saved, self._resumed_from = getattr(self, "_resumed_from", None), None
        if not saved:
            return
        now = [self._method_seed(o) for o in self._inner_optimizers()]
        for before, after in zip(saved.get("method_seeds", []), now, strict=False):
            if before is not None and after is not None and before != after:
                raise ValueError(
                    f"The checkpoint was trained with method.seed={before}, the method now has "
                    f"seed={after}; resume with method.seed={before}."
                )

    def _inner_optimizers(self) -> list[Any]:
        trainer = getattr(self, "_trainer", None)
        return [getattr(o, "optimizer", o) for o in (trainer.optimizers if trainer else [])]

    def _zeroth_order_optimizers(self) -> list[ZerothOrderOptimizer]:
        return [o for o in self._inner_optimizers() if isinstance(o, ZerothOrderOptimizer)]

    @staticmethod
    def _method_seed(opt: Any) -> int | None:
        seed = opt.seed if isinstance(opt, ZerothOrderOptimizer) else None
        return int(seed) if isinstance(seed, numbers.Integral) else None

    def on_fit_start(self) -> None:
        """Check the inputs on a tiny batch and set up data parallelism before the first step."""
        self.check_inputs()
        self._setup_data_parallel()
        self._set_threads()
        self._skips_in_a_row = 0
        if is_zeroth_order(self.method) and not self.estimator.forward_only:
            log.warning(
                "estimator=%s back-propagates through x: the zeroth-order method still works, "
                "but memory is no longer inference-level.",
                self.estimator.name,
            )

    def _set_threads(self) -> None:
        """Apply the thread policy (:attr:`threads`) for this ``fit``; off accelerators only."""
        if self.device.type != "cpu":
            self.intra_op_threads = torch.get_num_threads()
            return
        points = self.n_interior + self.n_boundary
        work = points * sum(p.numel() for p in self.net.parameters())
        share = int(getattr(self.trainer, "num_devices", 1) or 1)
        reserved = 1 if self._prefetcher is not None else 0
        count = resolve_threads(self.threads, work, reserved=reserved, share=share)
        if self._threads_before is None:
            self._threads_before = torch.get_num_threads()
        torch.set_num_threads(count)
        self.intra_op_threads = count
        log.info("Intra-op threads: %d (threads=%s).", count, self.threads)

    def on_train_end(self) -> None:
        """Fold the method's implicit offset (SDZE) into the weights at the end of training.

        The network is then a plain module; the function it computes does not change.
        """
        for opt in self._zeroth_order_optimizers():
            opt.fold()

    def configure_optimizers(self) -> Any:
        """Build the injected method (and scheduler)."""
        opt = build_optimizer(self.method, self.net)
        if self.scheduler is None:
            return opt
        scheduler = {"scheduler": self.scheduler(opt), "interval": "step"}
        return {"optimizer": opt, "lr_scheduler": scheduler}

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
        """One optimizer step on freshly sampled points (:meth:`run_step`).

        A NaN/Inf loss is caught before anything is applied (first-order: before
        ``backward``; zeroth-order: the method checks the reduced loss values
        before its update) and handled by :attr:`divergence`.
        """
        step = self.global_step
        # The step that would be the MAX_CONSECUTIVE_SKIPS-th skip in a row stops instead.
        skip = self.divergence == "skip" and self._skips_in_a_row + 1 < MAX_CONSECUTIVE_SKIPS
        try:
            outcome = self.run_step(
                self.optimizers(), step, backward=self.manual_backward, skip_nonfinite=skip
            )
        except NonFiniteLossError as err:
            if self.divergence == "skip":
                raise NonFiniteLossError(
                    err.step,
                    err.terms,
                    f"{err.method_state}; stopping: {self._skips_in_a_row + 1} non-finite "
                    "steps in a row under divergence=skip",
                ) from None
            raise
        if outcome.skipped is not None:
            self._skips_in_a_row += 1
            self.skipped_steps += 1
            log.warning("%s Skipping the step (divergence=skip).", outcome.skipped)
        else:
            self._skips_in_a_row = 0
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        self.last_loss = float(outcome.loss)
        self.log("train/loss", outcome.loss, prog_bar=True)
        if "boundary" in outcome.terms:
            self.log("train/boundary", outcome.terms["boundary"].detach())
        if self.skipped_steps:
            self.log("train/skipped_steps", float(self.skipped_steps))

    def run_step(
        self,
        optimizer: torch.optim.Optimizer,
        step: int,
        *,
        backward: Callable[[Tensor], Any] | None = None,
        skip_nonfinite: bool = False,
    ) -> StepOutcome:
        """One optimizer step on the points of step ``step``: what ``training_step`` runs.

        Usable without a ``Trainer`` (benchmarks, notebooks): it takes the
        (prefetched) batch, evaluates the loss as the method asks and updates the
        network, under the first-layer cache.

        * A zeroth-order method (:class:`~sdze_lightning.methods.ZerothOrderOptimizer`)
          gets ``step(loss_at=..., step_index=step)``, ``loss_at(key)`` being the loss
          of ``step`` with noise key ``key``.
        * Any other ``torch.optim.Optimizer`` gets ``step(closure)``; the closure
          zeroes the gradients, computes the loss and back-propagates it (and
          methods with ``needs_residuals``, e.g. pde_aware, get ``residuals=``).

        Args:
            optimizer: The method, or Lightning's wrapper of it (``self.optimizers()``:
                then Lightning counts the step and fires ``on_before_optimizer_step``
                once).
            step: Index of the step; it seeds the points, the estimator directions
                and a zeroth-order method's directions.
            backward: Back-propagates a first-order loss (default ``loss.backward()``;
                ``training_step`` passes ``manual_backward``).
            skip_nonfinite: On a NaN/Inf loss apply nothing and return the report in
                :attr:`StepOutcome.skipped` instead of raising.

        Returns:
            The step's loss and loss terms.

        Raises:
            NonFiniteLossError: On a NaN/Inf loss without ``skip_nonfinite``; nothing
                of the step was applied.

        """
        inner = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper
        try:
            self.begin_step(step)
            with self._first_layer_cache():
                if isinstance(inner, ZerothOrderOptimizer):
                    return self._zeroth_order_step(optimizer, inner, step, skip_nonfinite)
                return self._first_order_step(
                    optimizer, inner, step, backward or Tensor.backward, skip_nonfinite
                )
        except BaseException:
            self.stop_prefetch()  # Lightning skips teardown when fit raises
            raise
        finally:
            self._points = {}

    def _zeroth_order_step(
        self, optimizer: Any, inner: ZerothOrderOptimizer, step: int, skip: bool
    ) -> StepOutcome:
        terms: dict[str, Tensor] = {}
        bad: dict[str, float] = {}

        def loss_at(key: int) -> Tensor:
            # Never raises on a non-finite value: the method checks the (reduced) values,
            # so that under DDP every rank decides alike.
            out = self.loss_terms(step, key)
            if not bad and not bool(torch.isfinite(out["loss"])):
                bad.update({k: float(v.detach()) for k, v in out.items()})
            terms.clear()
            terms.update(out)
            return out["loss"]

        try:
            loss = optimizer.step(loss_at=loss_at, step_index=step, skip_nonfinite=skip)
        except NonFiniteLossError as err:
            raise NonFiniteLossError(step, {**bad, **err.terms}, err.method_state) from None
        loss = torch.as_tensor(loss).detach()
        if bool(torch.isfinite(loss)):
            return StepOutcome(loss, terms)
        report = NonFiniteLossError(step, bad or {"loss": float(loss)}, inner.describe_state())
        return StepOutcome(loss, terms, report)

    def _first_order_step(
        self, optimizer: Any, inner: torch.optim.Optimizer, step: int,
        backward: Callable[[Tensor], Any], skip: bool,
    ) -> StepOutcome:
        terms: dict[str, Tensor] = {}
        bad: dict[str, float] = {}
        saved: list[tuple[dict[str, Any], list[Tensor]]] = []

        def closure() -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            out = self.loss_terms(step, 0)
            terms.clear()
            terms.update(out)
            finite = bool(torch.isfinite(out["loss"]))
            if self.shard.active:
                finite = all_true(finite, self.device)  # every rank decides alike
            if finite:
                backward(out["loss"])
                return out["loss"]
            if not bad:
                bad.update({k: float(v.detach()) for k, v in out.items()})
            if not skip:
                raise NonFiniteLossError(step, dict(bad), _describe(inner))
            if not saved:  # skipped: undo whatever the optimizer does without gradients
                saved.append(_snapshot(inner))
            return out["loss"].detach()

        kwargs: dict[str, Any] = {}
        if getattr(inner, "needs_residuals", False):  # e.g. pde_aware: per-point residuals
            kwargs["residuals"] = functools.partial(self.residual_batch, step)
        loss = optimizer.step(closure=closure, **kwargs)
        if saved:
            _restore(inner, saved[0])
            nan = torch.full((), float("nan"), dtype=self.dtype)
            return StepOutcome(nan, terms, NonFiniteLossError(step, dict(bad), _describe(inner)))
        loss = loss if isinstance(loss, Tensor) else terms["loss"]
        return StepOutcome(loss.detach(), terms)

    # ---------------------------------------------------------------- evaluation
    def eval_chunk_rows(self) -> int:
        """Held-out points per chunk: :data:`EVAL_CHUNK_ELEMENTS` input numbers at most."""
        return max(1, min(EVAL_MAX_CHUNK, EVAL_CHUNK_ELEMENTS // self.input_dim))

    def eval_batches(self, chunk: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Held-out points and reference values in chunks, regenerated from a fixed seed.

        Each chunk is drawn when it is asked for: drop the previous one before asking
        for the next to hold one chunk at a time. ``chunk`` defaults to
        :meth:`eval_chunk_rows` (the points depend on it).
        """
        gen = self.generator(0, 0, stream=Stream.EVAL)
        rows = chunk or self.eval_chunk_rows()
        for start in range(0, self.n_eval, rows):
            x = self.sample_interior(min(rows, self.n_eval - start), gen)
            ref = self.exact_solution(x)
            if ref is None:
                return
            yield x, ref.to(self.dtype)
            del x, ref

    @torch.no_grad()
    def _update_eval_metric(self, metric: RelativeL2Error) -> bool:
        """Stream the held-out set into ``metric``, one chunk in memory.

        Returns ``False`` when the problem has no reference solution.
        """
        found = False
        for x, ref in self.eval_batches():
            metric.update(self(x), ref)
            found = True
            del x, ref  # before the next chunk is drawn
        return found

    def relative_l2_error(self) -> float | None:
        """Relative L2 error on the held-out points, or ``None`` without a reference."""
        metric = RelativeL2Error().to(self.device)
        return float(metric.compute()) if self._update_eval_metric(metric) else None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Log ``val/rel_l2`` on the held-out points (torchmetrics, DDP-safe)."""
        if self._update_eval_metric(self.rel_l2):
            self.log("val/rel_l2", self.rel_l2, prog_bar=True)

