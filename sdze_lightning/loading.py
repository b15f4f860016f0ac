"""The trained problem back from a checkpoint or a run directory.

A problem records what rebuilds it:

* ``sdze-train`` stores the run's resolved config in every checkpoint
  (:class:`~sdze_lightning.run_dir.ConfigInCheckpoint`): the problem is rebuilt from it
  with :func:`~sdze_lightning.builders.build_problem`;
* every :class:`~sdze_lightning.problem.PINNProblem` records the arguments of its
  constructor call in ``hparams`` (:func:`record_arguments`; Lightning saves them as the
  checkpoint's ``hyper_parameters``) as plain data (:mod:`sdze_lightning.recipes`), and its
  class under :data:`CHECKPOINT_KEY`, so that a checkpoint of
  ``lightning.Trainer().fit(problem)`` rebuilds too. The network is recorded as a recipe
  (the library's ``MLP``: its constructor's arguments; a factory: the partial), never as a
  module: the weights are in the checkpoint once. A network module of the user's own is
  not recorded; loading then needs ``net=`` again.

:func:`load_checkpoint` (``PINNProblem.load_from_checkpoint``) rebuilds the problem, gives
it the dtype of the checkpoint's weights (a ``64-true`` run loads as float64, without a
round trip through float32) on the device of ``map_location`` (CPU by default), loads the
weights, folds a zeroth-order method's implicit offset into them (SDZE keeps the current
window's ``A C B^T`` in its optimizer state; the end of ``fit`` folds it the same way), and
returns the problem in eval mode. :func:`load_run` does it for the newest checkpoint of a
run directory. Loading imports and calls the classes the checkpoint names: load only
checkpoints you trust.
"""

from __future__ import annotations

import contextvars
import inspect
import pickle
import types
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from sdze_lightning.methods.base import build_optimizer, is_zeroth_order
from sdze_lightning.methods.registry import build_method
from sdze_lightning.recipes import decode, encode, object_path, unrecorded
from sdze_lightning.run_dir import CHECKPOINT_KEY as RUN_KEY
from sdze_lightning.run_dir import find_checkpoint

if TYPE_CHECKING:
    from sdze_lightning.problem import PINNProblem

P = TypeVar("P", bound="PINNProblem")

#: Checkpoint entry holding ``{"class": "<module>.<class>"}`` of the problem.
CHECKPOINT_KEY = "sdze_lightning_problem"
#: The injected arguments and the config groups that build them.
INJECTED: dict[str, str] = {
    "net": "model", "estimator": "estimator", "method": "method", "scheduler": "scheduler",
}

_GIVEN: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "given", default=None
)


# ------------------------------------------------------------------------------ recording
def constructor_call(problem: nn.Module, frame: types.FrameType | None) -> dict[str, Any]:
    """The arguments of the outermost constructor of ``problem`` on the stack at ``frame``.

    Walks up from ``frame`` (a constructor of ``problem``) through the ``__init__`` frames
    whose ``self`` is ``problem``: the last one is the call that built it, whose named
    arguments and ``**kwargs`` rebuild it (what a subclass computes and passes to its
    base class is computed again).
    """
    call: dict[str, Any] = {}
    while frame is not None and frame.f_code.co_name == "__init__":
        info = inspect.getargvalues(frame)
        if not info.args or info.locals.get(info.args[0]) is not problem:
            break
        call = {name: info.locals[name] for name in info.args[1:] if name in info.locals}
        if info.keywords:
            call.update(info.locals.get(info.keywords) or {})
        frame = frame.f_back
    return call


def _recorded(problem: PINNProblem, name: str, value: Any) -> Any:
    """``value`` as plain data; for ``net``, the built network's recipe where it has one."""
    if name == "net" and (value is None or value is problem.net
                          or not isinstance(value, nn.Module)):
        built = encode(problem.net)
        if unrecorded(built) is None or not callable(value):
            return built
    return encode(value)


def record_arguments(problem: PINNProblem, frame: types.FrameType | None) -> None:
    """Record the constructor call of ``problem`` in its ``hparams`` (plain data only).

    Args:
        problem: The problem, at the end of ``PINNProblem.__init__``.
        frame: The frame of ``PINNProblem.__init__``.

    """
    call = constructor_call(problem, frame)
    problem.hparams.update({name: _recorded(problem, name, v) for name, v in call.items()})


def on_save_checkpoint(problem: PINNProblem, checkpoint: dict[str, Any]) -> None:
    """Record the problem's class (a ``PINNProblem`` hook)."""
    checkpoint[CHECKPOINT_KEY] = {"class": object_path(type(problem))}


# -------------------------------------------------------------------------------- loading
def given(key: str) -> Any:
    """The value passed as ``key`` to the load in progress (a config's ``_target_``)."""
    return (_GIVEN.get() or {})[key]


def _read(path: str | Path | IO, map_location: Any, weights_only: bool | None) -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds objects other than tensors and plain data (e.g. modules saved by "
            "a save_hyperparameters() of their own), which torch.load refuses by default; "
            "if you trust the file, pass weights_only=False."
        ) from err


def _problem_class(cls: type[P], path: Any, name: str | None) -> type[P]:
    """The class named ``name`` by the checkpoint, which must be ``cls`` or a subclass of it."""
    if name is None:
        found: Any = cls
    else:
        try:
            found = get_object(name)
        except Exception as err:  # noqa: BLE001 - hydra wraps import errors in its own
            from sdze_lightning.problem import PINNProblem

            if cls is PINNProblem:
                raise ValueError(
                    f"{path} holds a {name}, which cannot be imported here; import its module "
                    f"(or put it on PYTHONPATH) first ({err})."
                ) from err
            found = cls
    if isinstance(found, type) and found.__qualname__ == cls.__qualname__:
        found = cls  # e.g. the class of a script run as __main__, importable as a module too
    if not (isinstance(found, type) and issubclass(found, cls)):
        raise TypeError(
            f"{path} holds a {name}, not a {cls.__name__}; load it with "
            f"{getattr(found, '__name__', name)}.load_from_checkpoint or "
            "PINNProblem.load_from_checkpoint."
        )
    return found


def _from_config(config: dict[str, Any], overrides: dict[str, Any]) -> PINNProblem:
    """The problem of an ``sdze-train`` config, with ``overrides`` of its arguments."""
    from sdze_lightning.builders import build_problem

    cfg = OmegaConf.create(config)
    for key in overrides:  # objects, not config values: handed over by given()
        node = {"_target_": f"{__name__}.given", "key": key}
        if key in INJECTED:
            cfg[INJECTED[key]] = node
        else:
            cfg.pde[key] = node
    token = _GIVEN.set(dict(overrides))
    try:
        return build_problem(cfg)
    except InstantiationException as err:  # the constructor's own error, on one line
        cause = err.__cause__
        if isinstance(cause, TypeError | ValueError):
            raise type(cause)(str(cause)) from err
        raise
    finally:
        _GIVEN.reset(token)


def _accepted(target: type) -> set[str] | None:
    """Names the constructor of ``target`` takes (``None``: any, it has ``**kwargs``)."""
    parameters = inspect.signature(target).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


def _from_arguments(
    target: type[P], recorded: dict[str, Any], overrides: dict[str, Any], path: Any
) -> P:
    """``target`` built with its recorded constructor arguments, ``overrides`` replacing them."""
    accepted = _accepted(target)
    kwargs: dict[str, Any] = {}
    for name, value in recorded.items():
        if name in overrides or (accepted is not None and name not in accepted):
            continue
        kind = unrecorded(value)
        if kind is not None:
            raise ValueError(
                f"{path} was trained with {name}= a {kind}, which a checkpoint does not "
                f"record; pass it again: {target.__name__}.load_from_checkpoint(..., "
                f"{name}=...)."
            )
        try:
            kwargs[name] = decode(value)
        except Exception as err:  # noqa: BLE001 - an import or constructor error
            raise ValueError(
                f"{path}: cannot rebuild {name}={value!r} ({err}); pass {name}=... ."
            ) from err
    return target(**kwargs, **overrides)


def _weights_dtype(state_dict: dict[str, Any]) -> torch.dtype | None:
    """The dtype of the network's weights in ``state_dict`` (else of any floating tensor)."""
    floats = {k: t for k, t in state_dict.items()
              if isinstance(t, Tensor) and t.is_floating_point()}
    found = [t for k, t in floats.items() if k.startswith("net.")] or list(floats.values())
    return found[0].dtype if found else None


def _weights_device(state_dict: dict[str, Any]) -> torch.device:
    return next((t.device for t in state_dict.values() if isinstance(t, Tensor)),
                torch.device("cpu"))


def trained_method(
    problem: PINNProblem, checkpoint: dict[str, Any], overrides: dict[str, Any]
) -> Any:
    """The method the checkpoint was trained with (``None`` where it was not recorded)."""
    if "method" not in overrides:
        return problem.method
    run = checkpoint.get(RUN_KEY)
    if run and run.get("config"):
        return decode(run["config"]["method"])
    recorded = (checkpoint.get("hyper_parameters") or {}).get("method")
    if isinstance(recorded, str):
        return build_method(recorded, seed=problem.seed)
    return None if unrecorded(recorded) is not None else decode(recorded)


def fold_offsets(problem: PINNProblem, method: Any, checkpoint: dict[str, Any]) -> None:
    """Fold the implicit offset of a zeroth-order ``method`` (its state in ``checkpoint``)."""
    states = checkpoint.get("optimizer_states") or []
    if not states or method is None or not is_zeroth_order(method):
        return
    optimizer = build_optimizer(method, problem.net)
    optimizer.load_state_dict(states[0])
    optimizer.close()  # fold, release the hooks: a plain network, as after fit


def load_checkpoint(
    cls: type[P],
    path: str | Path | IO,
    map_location: Any = "cpu",
    strict: bool = True,
    weights_only: bool | None = None,
    **overrides: Any,
) -> P:
    """The trained problem of checkpoint ``path`` (``PINNProblem.load_from_checkpoint``).

    Args:
        cls: The class it is loaded through: the checkpoint's class or a base class of it.
        path: A Lightning checkpoint of the problem (``sdze-train``'s or ``Trainer.fit``'s).
        map_location: Where the weights go (``torch.load``'s argument; default CPU).
        strict: Whether the checkpoint's state dict must match the module's keys.
        weights_only: ``torch.load``'s argument (``None``: torch's default, ``True``).
        **overrides: Constructor arguments replacing the recorded ones (``threads=1``,
            ``n_eval=10_000``, ``net=`` a network the checkpoint could not record).

    Returns:
        The problem of the checkpoint's class, with the trained weights in their dtype,
        in eval mode.

    Raises:
        TypeError: The checkpoint holds a problem of another class than ``cls``.
        ValueError: An argument was not recorded and is not in ``overrides``, the file
            holds objects that ``weights_only`` refuses, or it records no arguments and the
            class defaults do not fit its weights.

    """
    checkpoint = _read(path, map_location, weights_only)
    run = checkpoint.get(RUN_KEY)
    recorded = dict(checkpoint.get("hyper_parameters") or {})
    if run and run.get("config"):
        _problem_class(cls, path, (run["config"].get("pde") or {}).get("_target_"))
        problem = _from_config(run["config"], overrides)
    else:
        target = _problem_class(cls, path, (checkpoint.get(CHECKPOINT_KEY) or {}).get("class"))
        problem = _from_arguments(target, recorded, overrides, path)
    state = checkpoint["state_dict"]
    problem.to(device=_weights_device(state), dtype=_weights_dtype(state))
    problem.on_load_checkpoint(checkpoint)
    try:
        problem.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        if run or recorded or overrides:
            raise
        raise ValueError(
            f"{path} records no constructor arguments (it was written before problems "
            "recorded them), and the class defaults do not fit its weights; pass the "
            f"arguments it was trained with: {type(problem).__name__}.load_from_checkpoint("
            "path, dim=..., net=...)."
        ) from err
    fold_offsets(problem, trained_method(problem, checkpoint, overrides), checkpoint)
    return problem.eval()


# ---------------------------------------------------------------------------- run directory
def _newest(paths: Iterator[Path]) -> Path | None:
    found = sorted(paths, key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def run_checkpoint(run_dir: str | Path) -> Path:
    """The newest checkpoint of a run directory: its ``last*.ckpt``, else any ``*.ckpt``.

    Looked for in order: ``checkpoints/last*.ckpt``, ``last*.ckpt`` anywhere below the
    directory, ``last*.ckpt`` where the run's checkpoint callback wrote outside it (its
    ``.hydra/config.yaml``), any ``*.ckpt`` below it; the newest of the first place that
    has one. The seed-replay log's ``replay/initial.ckpt`` (the untrained weights) is not
    a candidate.

    Raises:
        FileNotFoundError: ``run_dir`` is not a directory or holds no checkpoint.

    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run} is not a run directory (no such directory).")
    below = [p for p in run.rglob("*.ckpt") if p.relative_to(run).parts[0] != "replay"]
    last = [p for p in below if p.name.startswith("last")]
    config = run / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(config) if config.is_file() else DictConfig({})
    found = (
        _newest(p for p in last if p.parent == run / "checkpoints")
        or _newest(iter(last))
        or find_checkpoint("last", cfg, run)
        or _newest(iter(below))
    )
    if found is None:
        raise FileNotFoundError(
            f"{run} holds no checkpoint (*.ckpt): the run kept none (callbacks=none, or no "
            "callbacks.checkpoint); the default callbacks keep checkpoints/last.ckpt."
        )
    return found


def load_run(run_dir: str | Path, **kwargs: Any) -> PINNProblem:
    """The trained problem of a run directory (``hydra.run.dir``), from its newest checkpoint.

    Args:
        run_dir: The run directory.
        **kwargs: Passed to ``PINNProblem.load_from_checkpoint`` (``map_location``,
            overrides of the constructor's arguments).

    Raises:
        FileNotFoundError: The directory holds no checkpoint (:func:`run_checkpoint`).

    """
    from sdze_lightning.problem import PINNProblem

    return PINNProblem.load_from_checkpoint(run_checkpoint(run_dir), **kwargs)
