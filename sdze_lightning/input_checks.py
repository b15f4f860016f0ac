"""Input checks: refuse a bad problem, network, method or Trainer setting before training.

Each error names the value to fix. The checks run in three places:

* :func:`check_arguments` in the :class:`~sdze_lightning.problem.PINNProblem`
  constructor (types and ranges of its arguments), and :func:`checked_network`
  when it builds the network (input size, whether the parameters fit in memory);
* :func:`check_precision` when the Trainer is set up;
* :func:`check_inputs` once before the first step (the CLI calls it before it writes
  any logger, checkpoint or summary; ``fit`` then finds the problem checked): the
  estimator's reverse passes (:func:`check_reverse_passes`), the user contract on a tiny
  batch (points, network, residual, boundary), the method's configuration on a
  parameter-free copy of the network, and the memory of training.

``sdze-train`` also checks the reverse passes before it builds the problem
(:func:`~sdze_lightning.builders.build_problem`), so that a run that cannot finish is
refused before its network is allocated.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sdze_lightning.checks import boolean, integer, non_negative_int, positive_int
from sdze_lightning.collocation import seeded_generator
from sdze_lightning.divergence import check_policy
from sdze_lightning.estimators import Estimator, build_estimator
from sdze_lightning.estimators.base import OPERATORS
from sdze_lightning.estimators.exact import ExactEstimator
from sdze_lightning.kernels import COMPILE_BYTES
from sdze_lightning.loss import checked_residual
from sdze_lightning.memory_budget import Need, check_fits, format_bytes, skip_snapshot_need
from sdze_lightning.methods.base import (
    build_optimizer,
    gradient_numel,
    is_zeroth_order,
    needs_forward_only_estimator,
    state_numel,
    step_temporary_numel,
    withholds_nonfinite,
)
from sdze_lightning.methods.registry import build_method
from sdze_lightning.nn.mlp import MLP
from sdze_lightning.output_fit import check_mode as check_output_fit
from sdze_lightning.seeding import Stream
from sdze_lightning.threads import check_threads

if TYPE_CHECKING:
    from sdze_lightning.contract import ProblemContract

log = logging.getLogger(__name__)

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


def check_arguments(problem_type: type, **args: Any) -> None:
    """Check the :class:`~sdze_lightning.problem.PINNProblem` constructor's arguments.

    Args:
        problem_type: The problem's class (its ``operators`` are checked too).
        **args: The constructor's arguments, by name.

    Raises:
        ValueError: Naming the first bad value.

    """
    for name in ("dim", "n_interior", "steps_per_epoch"):
        positive_int(f"pde.{name}", args[name])
    for name in ("n_boundary", "n_eval"):
        non_negative_int(f"pde.{name}", args[name])
    integer("seed", args["seed"])
    weight = args["boundary_weight"]
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise ValueError(f"pde.boundary_weight must be a number, got {weight!r}.")
    check_policy(args["divergence"])
    for name in ("prefetch", "fused_kernels"):
        boolean(f"pde.{name}", args[name])
    check_threads(args["threads"])
    check_output_fit(args["output_fit"])
    if args["squared_residual"] not in ("biased", "unbiased"):
        raise ValueError(
            "pde.squared_residual must be 'biased' or 'unbiased', got "
            f"{args['squared_residual']!r}."
        )
    unknown = sorted(set(problem_type.operators) - set(OPERATORS))
    if unknown:
        raise ValueError(
            f"{problem_type.__name__}.operators has unknown names {unknown}; "
            f"available: {sorted(OPERATORS)}."
        )


def _inputs(problem: ProblemContract) -> str:
    """``pde.dim=<d>`` and, for a time-dependent problem, ``+ time``."""
    return f"pde.dim={problem.dim}{' + time' if problem.time_dependent else ''}"


def checked_network(
    problem: ProblemContract, net: nn.Module | Callable[..., nn.Module] | None
) -> nn.Module:
    """The problem's network: ``net`` itself, or built by the factory ``net`` (default MLP).

    A factory gets ``in_features`` from the problem, after its parameters are checked to
    fit in memory (:func:`check_network_fits`); a module must take ``input_dim`` inputs.
    """
    if net is None:
        net = functools.partial(MLP)
    if not isinstance(net, nn.Module):
        given = getattr(net, "keywords", {}).get("in_features")
        if given is not None and given != problem.input_dim:
            raise ValueError(
                f"model.in_features={given!r} but the problem has input dimension "
                f"{problem.input_dim} ({_inputs(problem)}); drop model.in_features: "
                "the problem fills it in."
            )
        check_network_fits(problem, net)
        net = net(in_features=problem.input_dim)
    in_features = getattr(net, "in_features", None)
    if in_features is not None and in_features != problem.input_dim:
        raise ValueError(
            f"The network takes {in_features} inputs but the problem has input dimension "
            f"{problem.input_dim} ({_inputs(problem).removeprefix('pde.')}); set "
            "model.in_features accordingly "
            "or pass a factory."
        )
    return net


def checked_estimator(estimator: Estimator | str | None, operators: Collection[str]) -> Estimator:
    """The problem's estimator, refused unless it computes every operator in ``operators``.

    ``estimator`` is an estimator or a registered name (default ``"exact"``).
    """
    if estimator is None:
        estimator = "exact"
    built = build_estimator(estimator) if isinstance(estimator, str) else estimator
    if not isinstance(built, Estimator):
        raise TypeError(f"estimator must be an Estimator or a name, got {type(estimator)}.")
    built.check(operators)
    return built


def checked_method(
    method: Callable[..., torch.optim.Optimizer] | str | None, seed: int, estimator: Estimator
) -> Callable[..., torch.optim.Optimizer]:
    """The problem's method, refused if it needs a forward-only estimator and lacks one.

    A method's name is built from its packaged config with ``seed``; the default is
    Adam with lr 1e-3. A method that keeps the input layer's gradient as factors
    needs a forward-only ``estimator``.
    """
    if isinstance(method, str):
        method = build_method(method, seed=seed)
    method = method or functools.partial(torch.optim.Adam, lr=1e-3)
    if needs_forward_only_estimator(method) and not estimator.forward_only:
        raise ValueError(
            f"estimator={estimator.name} back-propagates through x, which this method "
            "cannot do (it keeps the input layer's gradient as factors); use a "
            "forward-mode estimator: estimator=taylor, fd or stein."
        )
    return method


def check_reverse_passes(estimator: Estimator, operators: Collection[str], dim: int) -> None:
    """Refuse an estimator whose estimates take more reverse passes than its bound.

    Stacked back-propagation (``estimator=exact``) takes one reverse pass through the
    network per coordinate for the Laplacian (:meth:`ExactEstimator.reverse_passes`), each
    about a backward pass: at ``d = 1e7`` a single step would take years. The bound is
    the estimator's ``max_reverse_passes`` (``None``: not checked).

    Args:
        estimator: The run's estimator.
        operators: The operators the residual asks for.
        dim: The spatial dimension ``d`` (``pde.dim``).

    Raises:
        ValueError: One line with the number of passes, the bound and the overrides.

    """
    bound = getattr(estimator, "max_reverse_passes", None)
    if bound is None:
        return
    passes = estimator.reverse_passes(operators, dim)
    if passes <= bound:
        return
    others = "estimator=taylor (forward-only) or estimator=sdgd (K coordinates)"
    if estimator.name == "sdgd":
        others = "estimator=taylor (forward-only) or a smaller estimator.num_directions"
    raise ValueError(
        f"estimator={estimator.name} takes {passes:,} reverse passes through the network per "
        f"batch of collocation points at pde.dim={dim} (one per differentiated coordinate and "
        f"order), more than estimator.max_reverse_passes={bound:,}: each costs about a "
        f"backward pass, so training would not finish. Use a dimension-free estimator, "
        f"{others}, or set estimator.max_reverse_passes=null to run it anyway."
    )


def check_network_fits(problem: ProblemContract, factory: Callable[..., nn.Module]) -> None:
    """Refuse a network whose parameters cannot fit, before allocating them.

    Works for factories whose target has ``parameter_count(in_features=..., **kw)``
    (:meth:`MLP.parameter_count`); others are built unchecked.
    """
    count = getattr(getattr(factory, "func", factory), "parameter_count", None)
    if not callable(count):
        return
    try:
        params = count(**{**getattr(factory, "keywords", {}), "in_features": problem.input_dim})
    except (TypeError, ValueError):
        return  # bad values: the constructor reports them
    itemsize = torch.empty((), dtype=torch.get_default_dtype()).element_size()
    check_fits([_network_need(problem, params, itemsize)])


def _network_need(
    problem: ProblemContract, params: int, itemsize: int, what: str = "network parameters"
) -> Need:
    width = "model.width (or pde.dim)" if problem.input_dim > 1000 else "model.width"
    return Need(f"{what} ({params:,})", params * itemsize, f"lower {width}")


def predicted_needs(problem: ProblemContract) -> list[Need]:
    """Everything the pre-flight predicts a run holds at its peak.

    The network, then :func:`training_needs`. Their sum is the predicted peak of the run's
    memory above the process's own (the interpreter with torch and Lightning imported,
    the Trainer's loop), which it does not include (``benchmarks/preflight_accuracy.py``
    compares it with measured peaks).
    """
    itemsize = torch.empty((), dtype=problem.dtype).element_size()
    params = sum(p.numel() for p in problem.net.parameters())
    return [_network_need(problem, params, itemsize), *training_needs(problem)]


def check_training_fits(problem: ProblemContract) -> None:
    """Refuse a run whose :func:`training_needs` cannot fit next to the network."""
    check_fits(training_needs(problem), problem.device)


def training_needs(problem: ProblemContract) -> list[Need]:
    """What training needs beside the network: the parts the memory check adds up.

    The network is already allocated (the available memory excludes it); a
    first-order method adds at least a gradient per parameter and its optimizer state
    (:func:`~sdze_lightning.methods.base.state_numel`: Adam's two moments), and, with the
    exact estimator (``sdgd``: its ``K`` coordinates), one ``(N, input_dim)`` tensor per
    coordinate in the graph; each step holds its
    collocation batch (two with ``prefetch``) and its estimator's and method's temporaries,
    and validation a held-out chunk, in place of the step's transients. Under
    ``divergence="skip"`` a method that cannot withhold a non-finite step adds a copy
    of the parameters.
    """
    itemsize = torch.empty((), dtype=problem.dtype).element_size()
    needs = []
    grads = gradient_numel(problem.method, problem.net)
    if grads:
        needs.append(_network_need(problem, grads, itemsize, "gradients"))
    state = state_numel(problem.method, problem.net)
    if state:
        needs.append(Need(
            f"optimizer state ({state:,} numbers)", state * itemsize,
            "use a method with less state: method=fused_adafactor (forward-mode estimators) "
            "or method=sdze",
        ))
    temporary = step_temporary_numel(problem.method, problem.net)
    if temporary:
        needs.append(Need(
            f"method's step temporaries ({temporary:,} numbers)", temporary * itemsize,
            "lower method.chunk_size (pde_aware), or use method=sdze",
        ))
    if grads and isinstance(problem.estimator, ExactEstimator):
        coords = problem.estimator.coordinate_count(problem.dim)
        points = problem.n_interior * problem.input_dim  # one (N, d) tensor per coordinate
        needs.append(Need(
            f"estimator={problem.estimator.name}'s graph ({coords} reverse passes over "
            f"{problem.n_interior} points x {problem.input_dim} inputs, each kept for the "
            "parameters' gradient)",
            coords * points * itemsize,
            "use a dimension-free estimator, e.g. estimator=taylor",
        ))
    if problem.divergence == "skip" and not withholds_nonfinite(problem.method):
        params = sum(p.numel() for p in problem.net.parameters() if p.requires_grad)
        needs.append(skip_snapshot_need(params, itemsize))
    batches = 2 if problem.prefetch else 1
    points = (problem.n_interior + problem.n_boundary) * batches
    needs.append(Need(
        f"collocation batch ({points} points x {problem.input_dim} inputs)",
        points * problem.input_dim * itemsize,
        "lower pde.n_interior" + (" or set prefetch=false" if batches > 1 else ""),
    ))
    hidden = sum(m.out_features for m in problem.net.modules() if isinstance(m, nn.Linear))
    estimate = problem.estimator.step_numel(problem.n_interior, problem.input_dim, hidden,
                                            graph=bool(grads))
    if estimate:
        needs.append(Need(
            f"estimator={problem.estimator.name}'s temporaries ({estimate:,} numbers)",
            estimate * itemsize,
            "lower estimator.num_directions or pde.n_interior, or use estimator=taylor",
        ))
    if getattr(problem, "uses_compiled_kernels", False):
        needs.append(Need("compiled kernels (torch.compile)", COMPILE_BYTES,
                          "set fused_kernels=false (slower)"))
    # Validation runs between steps: its chunk takes the place of the step's transients
    # (the batch being trained on, the method's and the estimator's temporaries, the graph).
    step_transients = sum(n.bytes for n in needs if n.what.startswith(TRANSIENT_PARTS))
    step_transients -= (batches - 1) * problem.n_interior * problem.input_dim * itemsize
    rows = min(problem.n_eval, problem.held_out.chunk_rows())
    chunk = rows * problem.input_dim * itemsize
    needs.append(Need(
        f"held-out chunk ({rows} points: {format_bytes(chunk)}, less the step's transients "
        "that validation replaces)",
        max(0, chunk - step_transients),
        "lower pde.n_eval",
    ))
    return needs


#: The parts of :func:`training_needs` that live only during a step (their names' start).
TRANSIENT_PARTS: tuple[str, ...] = (
    "method's step temporaries", "estimator=", "collocation batch",
)


def check_inputs(problem: ProblemContract) -> None:
    """Check the user contract on a tiny batch; raise a clear error naming what to fix.

    ``PINNProblem.check_inputs``. ``fit`` calls it unless it already ran for the module's
    device and dtype (the CLI calls it before it writes any logger, checkpoint or summary).

    The estimator's reverse passes (:func:`check_reverse_passes`), the method's
    configuration (:func:`dry_build_method`) and the memory of training
    (:func:`check_training_fits`) first: all are cheap, and the contract's checks after
    them differentiate a tiny batch at full ``d``. Then the points' shape, the network's
    input size, the residual's shape and dtype, the boundary sample.
    """
    name = type(problem).__name__
    check_reverse_passes(problem.estimator, problem.operators, problem.dim)
    dry_build_method(problem)
    check_training_fits(problem)
    with torch.no_grad():
        x = problem.sample_interior(2, _probe_generator(problem, Stream.INTERIOR))
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != problem.input_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{name}.sample_interior() must return (n, {problem.input_dim}) points "
                f"({_inputs(problem).removeprefix('pde.')}), got {shape}."
            )
        try:
            problem.model(x)
        except RuntimeError as err:
            raise ValueError(
                f"The network cannot evaluate points of shape {tuple(x.shape)}: {err}. "
                f"It must take input_dim={problem.input_dim} inputs ({_inputs(problem)}); "
                "fix model.in_features or the network's first layer."
            ) from err
        gen = _probe_generator(problem, Stream.ESTIMATOR)
        r = checked_residual(problem, x, problem.derivatives(x, gen))
        if r.dtype != x.dtype:
            raise TypeError(
                f"{name}.residual() returned {r.dtype} for {x.dtype} points: compute it in "
                "the points' dtype (create constants with x.new_tensor(...) or "
                "dtype=x.dtype), or precision=64-true silently loses its accuracy."
            )
        _check_boundary(problem)
    if is_zeroth_order(problem.method) and not problem.estimator.forward_only:
        log.warning(
            "estimator=%s back-propagates through x: the zeroth-order method still works, "
            "but memory is no longer inference-level.",
            problem.estimator.name,
        )


class ContractCheck:
    """Runs :func:`check_inputs` on a problem once per device and dtype (its ``contract_check``).

    Args:
        problem: The problem to check.

    Attributes:
        checked_as: ``(device, dtype)`` of the last passed check, ``None`` before one (and
            after a fit ends: the next fit checks again).

    """

    def __init__(self, problem: ProblemContract) -> None:
        self.problem = problem
        self.checked_as: tuple[torch.device, torch.dtype] | None = None

    def run(self) -> None:
        """Check the user contract (:func:`check_inputs`) and remember where it passed."""
        check_inputs(self.problem)
        self.checked_as = (self.problem.device, self.problem.dtype)

    def run_unless_checked(self) -> None:
        """:meth:`run` unless it passed for the problem's device and dtype already."""
        if self.checked_as != (self.problem.device, self.problem.dtype):
            self.run()

    def forget(self) -> None:
        """The next :meth:`run_unless_checked` checks again."""
        self.checked_as = None


def _probe_generator(problem: ProblemContract, stream: Stream) -> torch.Generator:
    """The generator of the checks' tiny batch (step -1: never a training step's)."""
    return seeded_generator(problem.device, problem.seed, -1, 0, stream=stream)


def _check_boundary(problem: ProblemContract) -> None:
    """The boundary sample and residual, or a missing ``n_boundary`` where one is needed."""
    name = type(problem).__name__
    if problem.n_boundary > 0:
        xb = problem.sample_boundary(2, _probe_generator(problem, Stream.BOUNDARY))
        if xb.dim() != 2 or xb.shape[0] == 0 or xb.shape[1] != problem.input_dim:
            raise ValueError(
                f"{name}.sample_boundary() must return (n, "
                f"{problem.input_dim}) points with n > 0, got {tuple(xb.shape)}."
            )
        rb = problem.boundary_residual(xb)
        if not isinstance(rb, Tensor) or rb.shape != (xb.shape[0],):
            shape = tuple(rb.shape) if isinstance(rb, Tensor) else type(rb).__name__
            raise ValueError(
                f"{name}.boundary_residual() must return one value per boundary point, "
                f"shape ({xb.shape[0]},), got {shape} (check boundary_target())."
            )
    elif _needs_boundary_sample(problem):
        raise ValueError(
            f"pde.n_boundary=0, but {name} imposes its boundary/initial condition "
            "through a loss on sampled boundary points (it defines sample_boundary() "
            "and has no hard constraint): set pde.n_boundary to a positive number."
        )


def _needs_boundary_sample(problem: ProblemContract) -> bool:
    return (
        problem.overrides("sample_boundary")
        and problem.constraint is None
        and not problem.overrides("hard_constraint")
    )


def dry_build_method(problem: ProblemContract) -> None:
    """Build the method (and scheduler) once on a parameter-free copy of the network.

    Their constructors validate the ``method.*`` values; doing it here puts those
    errors before training (and before the CLI writes anything). The copy's
    parameters live on the ``meta`` device: no memory, and the real network is
    untouched (no hooks are attached to it).
    """
    memo: dict[int, Any] = {
        id(t): nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
        for t in problem.net.parameters()
    }
    memo.update({id(b): torch.empty_like(b, device="meta") for b in problem.net.buffers()})
    try:
        shadow = copy.deepcopy(problem.net, memo)
    except Exception as err:  # noqa: BLE001 - any failure to copy: checked at fit time
        log.warning(
            "The method's configuration is checked when training starts, not now: the "
            "network cannot be copied for the early check (%s: %s).", type(err).__name__, err
        )
        return
    target = getattr(problem.method, "func", problem.method)
    name = getattr(target, "__name__", type(target).__name__)
    try:
        opt = build_optimizer(problem.method, shadow)
        if problem.scheduler is not None:
            problem.scheduler(opt)
    except Exception as err:
        own = getattr(target, "__module__", "").startswith("sdze_lightning")
        if isinstance(err, ValueError) and own:
            raise  # this library's methods name the field themselves
        keywords = dict(getattr(problem.method, "keywords", {}))
        raise ValueError(
            f"The method {name} rejects its configuration {keywords} "
            f"({type(err).__name__}: {err}); check the method.* (and scheduler) values."
        ) from err
