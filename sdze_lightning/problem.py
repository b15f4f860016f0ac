"""``PINNProblem``: a PDE as a ``LightningModule``.

A new PDE subclasses :class:`PINNProblem` and implements its user contract (sampling,
residual, optionally the exact solution and boundary values); network, spatial
estimator and method are injected, and ``lightning.Trainer(max_steps=...).fit(problem)``
needs no DataModule. The class holds the contract and thin Lightning hooks; each
other concern has its module, named where the class uses it.

A problem records its constructor call (``hparams``, plain data) and its class in every
checkpoint: ``PINNProblem.load_from_checkpoint(path)`` returns the trained problem
(:mod:`sdze_lightning.loading`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn

from sdze_lightning import (
    collocation,
    evaluation,
    fit_lifecycle,
    input_checks,
    loading,
    loss,
    resume,
    stepping,
)
from sdze_lightning.constraints import Constraint
from sdze_lightning.derivatives import Derivatives
from sdze_lightning.distributed import Shard, keep_self_reduced_out_of_ddp
from sdze_lightning.divergence import DivergenceGuard, NonFiniteLossError, steps_skipped
from sdze_lightning.estimators import Estimator
from sdze_lightning.input_checks import check_precision
from sdze_lightning.methods.base import build_optimizer
from sdze_lightning.metrics import RelativeL2Error
from sdze_lightning.model_fn import ModelFunction
from sdze_lightning.output_fit import OutputOffsetFit
from sdze_lightning.stepping import StepOutcome
from sdze_lightning.threads import FitThreads

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

__all__ = ["NonFiniteLossError", "PINNProblem", "StepOutcome", "check_precision"]


class PINNProblem(L.LightningModule):
    """Base class of physics-informed problems (manual optimization).

    Args:
        dim: Spatial dimension ``d`` (time, if any, is an extra input).
        net: Network module, or a factory called as ``net(in_features=...)``;
            defaults to :class:`~sdze_lightning.nn.MLP` (width 128, depth 4).
        estimator: An :class:`~sdze_lightning.estimators.Estimator` or a registered name
            (default ``"exact"``).
        method: Optimizer class or partial, or a method's name (its packaged config,
            seeded with ``seed``); zeroth-order methods receive the network, others its
            parameters. Defaults to Adam(lr=1e-3).
        scheduler: Optional learning-rate scheduler partial, stepped every step.
        n_interior: Interior collocation points per step.
        n_boundary: Boundary/initial points per step (0 under a hard constraint).
        boundary_weight: Weight of the boundary term in the loss.
        n_eval: Held-out points for the relative L2 error.
        seed: Seed of sampling and estimator randomness.
        squared_residual: ``"biased"`` or ``"unbiased"`` (:mod:`~sdze_lightning.loss`).
        steps_per_epoch: Steps per epoch of step indices; without a
            ``val_check_interval`` (the CLI sets one) validation runs once an epoch.
        divergence: ``"stop"`` or ``"skip"`` on a NaN/Inf loss (:mod:`~sdze_lightning.divergence`).
        prefetch: Build the next step's interior batch (and its :meth:`prepare_batch`) on
            a background thread (:mod:`~sdze_lightning.collocation`); ``sample_interior``
            and ``prepare_batch`` must then not depend on the network.
        fused_kernels: Let the problem use fused ``torch.compile`` kernels for its per-batch
            data where it has them (:mod:`sdze_lightning.kernels`).
        threads: Intra-op threads during ``fit``, ``"auto"`` or a count
            (:mod:`sdze_lightning.threads`); the count used is :attr:`intra_op_threads`.
        output_fit: ``"constant"``: before the first step of a fit (not a resume), set the
            network's mean output to the constant that minimises the training loss
            (:mod:`sdze_lightning.output_fit`); ``"none"``: keep the initialisation.

    The arguments of the constructor call (of the subclass, if it has its own) are
    recorded in ``hparams`` as plain data, the network as a recipe (the library's
    ``MLP``: its arguments; a factory: the partial); a network module of one's own is not
    recorded, and :meth:`load_from_checkpoint` then needs ``net=`` again
    (:mod:`sdze_lightning.loading`).

    """

    #: Operators the residual uses; checked against the estimator at construction.
    operators: ClassVar[tuple[str, ...]] = ("u", "laplacian")
    #: Whether the last input coordinate is time.
    time_dependent: ClassVar[bool] = False

    def __init__(
        self, dim: int, net: nn.Module | Callable[..., nn.Module] | None = None,
        estimator: Estimator | str | None = None,
        method: Callable[..., torch.optim.Optimizer] | str | None = None,
        scheduler: Callable[..., Any] | None = None, n_interior: int = 100, n_boundary: int = 0,
        boundary_weight: float = 1.0, n_eval: int = 2000, seed: int = 0,
        squared_residual: str = "biased", steps_per_epoch: int = 1000, divergence: str = "stop",
        prefetch: bool = False, fused_kernels: bool = True, threads: int | str = "auto",
        output_fit: str = "constant",
    ) -> None:
        super().__init__()
        input_checks.check_arguments(
            type(self), dim=dim, n_interior=n_interior, n_boundary=n_boundary, n_eval=n_eval,
            seed=seed, boundary_weight=boundary_weight, squared_residual=squared_residual,
            steps_per_epoch=steps_per_epoch, divergence=divergence, prefetch=prefetch,
            fused_kernels=fused_kernels, threads=threads, output_fit=output_fit,
        )
        self.automatic_optimization = False
        self.dim, self.input_dim, self.seed = dim, dim + int(self.time_dependent), seed
        self.n_interior, self.n_boundary, self.n_eval = n_interior, n_boundary, n_eval
        self.boundary_weight, self.squared_residual = boundary_weight, squared_residual
        self.steps_per_epoch, self.divergence, self.threads = steps_per_epoch, divergence, threads
        self.fused_kernels = fused_kernels
        self.net = input_checks.checked_network(self, net)
        self.estimator = input_checks.checked_estimator(estimator, self.operators)
        #: The two half-estimators of ``squared_residual="unbiased"``.
        self.estimator_halves = self.estimator.halves() if squared_residual == "unbiased" else ()
        self.method = input_checks.checked_method(method, seed, self.estimator)
        self.scheduler = scheduler
        self.constraint: Constraint | None = None
        #: This rank's share of each batch (the whole batch unless data-parallel).
        self.shard = Shard()
        self.collocation = collocation.Collocation(self, prefetch)
        self.divergence_guard = DivergenceGuard()
        #: Fits the network's output offset to the loss before the first step.
        self.output_fit = OutputOffsetFit(output_fit)
        self.fit_threads = FitThreads(threads)
        #: The intra-op thread count of the last ``fit`` (``None`` before one).
        self.intra_op_threads: int | None = None
        self.rel_l2 = RelativeL2Error()
        self.last_loss: float = float("nan")
        self._checked_as: tuple[torch.device, torch.dtype] | None = None
        self._resumed_from: dict[str, Any] | None = None
        loading.record_arguments(self, inspect.currentframe())

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

    def hard_constraint(self, x: Tensor, out: Tensor) -> Tensor:
        """Custom map from network output to ``u``; override only if ``constraint`` cannot.

        Overriding it disables the dimension-free fast paths of the estimators.
        """
        return out

    def prepare_batch(self, x: Tensor, rows: int | None = None) -> None:
        """Compute and cache what depends on the interior batch ``x`` only (default: nothing).

        With ``prefetch`` it runs on the prefetch thread for (about) the first ``rows``
        rows, then on the main thread with ``rows=None`` for the rest
        (:class:`~sdze_lightning.prefetch.PreparePlacement`); it must not use the network.
        An override without ``rows`` gets the whole batch on one thread.
        """

    # Random numbers for the samplers, on this module's device and dtype (see
    # :mod:`sdze_lightning.collocation`; the library's own draws use other streams).
    generator = collocation.generator
    rand = collocation.rand
    randn = collocation.randn

    # -------------------------------------------------- the solution and its operators
    @property
    def model(self) -> ModelFunction:
        """The solution ``u`` as a function of the points (network + constraint)."""
        own = type(self).hard_constraint is not PINNProblem.hard_constraint
        return ModelFunction(self.net, self.constraint, self.hard_constraint if own else None)

    def forward(self, x: Tensor) -> Tensor:
        """Return the predicted solution ``u(x)`` (hard constraint included), shape ``(N,)``."""
        return self.model(x)

    def predict_step(
        self, batch: Tensor | Sequence[Tensor], batch_idx: int = 0, dataloader_idx: int = 0
    ) -> Tensor:
        """``u`` at a batch of points, for ``Trainer.predict``.

        Args:
            batch: Points ``(B, input_dim)``, or a list/tuple whose first entry they are
                (a ``TensorDataset``'s batch); converted to the module's dtype.
            batch_idx: Index of the batch (unused).
            dataloader_idx: Index of the loader (unused).

        Returns:
            ``u(x)`` (hard constraint included), shape ``(B,)``.

        """
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self(x.to(self.dtype) if x.is_floating_point() else x)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | Path | IO, map_location: Any = "cpu", *, strict: bool = True,
        weights_only: bool | None = None, **kwargs: Any,
    ) -> Self:
        """The trained problem of a checkpoint (``sdze-train``'s or ``Trainer.fit``'s).

        Rebuilt from the run's config (``sdze-train``) or the recorded constructor call, of
        the checkpoint's class (which must be ``cls`` or a subclass), with the trained
        weights in their dtype, a zeroth-order method's offset folded in, in eval mode
        (:func:`sdze_lightning.loading.load_checkpoint`).

        Args:
            checkpoint_path: The checkpoint file.
            map_location: Where the weights go (``torch.load``'s argument; default CPU).
            strict: Whether the state dict must match the module's keys.
            weights_only: ``torch.load``'s argument (``None``: torch's default).
            **kwargs: Constructor arguments replacing the recorded ones (``threads=1``,
                ``net=`` a network module of one's own, which is not recorded).

        """
        return loading.load_checkpoint(
            cls, checkpoint_path, map_location, strict, weights_only, **kwargs
        )

    def derivatives(
        self, x: Tensor, generator: torch.Generator, estimator: Estimator | None = None,
        model: Callable[[Tensor], Tensor] | None = None,
    ) -> Derivatives:
        """The accessor ``d`` that :meth:`residual` receives, at any points ``(N, input_dim)``.

        ``estimator`` and ``model`` replace the problem's (e.g. to check a new PDE on its
        exact solution: ``problem.residual(x, problem.derivatives(x, torch.Generator(),
        ExactEstimator(), model=problem.exact_solution))`` is ~0 in float64).
        """
        est = estimator or self.estimator
        values = est.estimate(model or self.model, x, self.operators, generator, self.dim)
        return Derivatives(x, values, self.dim)

    # -------- the library's API: functions of the problem in their modules, bound as methods
    # The points of a step (:mod:`sdze_lightning.collocation`).
    points = collocation.points
    sample_points = collocation.sample_points
    boundary_points = collocation.boundary_points
    isolated_points = collocation.isolated_points

    @property
    def prefetch(self) -> bool:
        """Whether training batches are prefetched (see the ``prefetch`` argument)."""
        return collocation.prefetching(self)

    begin_step = collocation.begin_step
    stop_prefetch = collocation.stop_prefetch

    # The loss (:mod:`sdze_lightning.loss`).
    interior_residuals = loss.interior_residuals
    loss_terms = loss.loss_terms
    residual_batch = loss.residual_batch

    def compute_loss(self, step: int, key: int = 0) -> Tensor:
        """Scalar training loss of ``step`` for noise key ``key``."""
        return self.loss_terms(step, key)["loss"]

    # The held-out error (:mod:`sdze_lightning.evaluation`).
    eval_chunk_rows = evaluation.eval_chunk_rows
    eval_batches = evaluation.eval_batches
    relative_l2_error = evaluation.relative_l2_error

    # One optimizer step, usable without a Trainer (:mod:`sdze_lightning.stepping`).
    run_step = stepping.run_step

    check_inputs = input_checks.check_inputs

    skipped_steps = property(steps_skipped)

    # ---------------------------------------------------------------- lightning hooks
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the seeds a resume must share and the problem's class.

        See :mod:`sdze_lightning.resume` and :mod:`sdze_lightning.loading`.
        """
        resume.on_save_checkpoint(self, checkpoint)
        loading.on_save_checkpoint(self, checkpoint)

    # The precision and seeds of a resume (:mod:`sdze_lightning.resume`).
    on_load_checkpoint = resume.on_load_checkpoint

    def setup(self, stage: str) -> None:
        """Reject a Trainer precision this library cannot train with; set up DDP's exclusions."""
        check_precision(self.trainer.precision)
        keep_self_reduced_out_of_ddp(self, self.method, self.net)

    # The fit's set-up and release (:mod:`sdze_lightning.fit_lifecycle`).
    on_fit_start = fit_lifecycle.on_fit_start
    on_train_start = fit_lifecycle.on_train_start
    on_train_end = fit_lifecycle.on_train_end
    teardown = fit_lifecycle.teardown

    def configure_optimizers(self) -> Any:
        """Build the injected method (and scheduler)."""
        opt = build_optimizer(self.method, self.net)
        if self.scheduler is None:
            return opt
        scheduler = {"scheduler": self.scheduler(opt), "interval": "step"}
        return {"optimizer": opt, "lr_scheduler": scheduler}

    # The steps' indices, the step itself, the held-out error.
    train_dataloader = collocation.train_dataloader
    val_dataloader = collocation.val_dataloader
    training_step = stepping.training_step
    validation_step = evaluation.validation_step
