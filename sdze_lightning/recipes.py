"""Constructor arguments as plain data: what a checkpoint records to rebuild a problem.

A checkpoint is read with ``torch.load(weights_only=True)`` (torch's default, also when
``Trainer.fit(ckpt_path=...)`` resumes), which accepts tensors and plain data (numbers,
strings, ``None``, lists, tuples, dicts) only. :func:`encode` turns a constructor argument
into such data, in Hydra's ``instantiate`` format, and :func:`decode` turns it back:

* plain data (and tensors) stay as they are;
* an object that reports its constructor's arguments in an ``init_args`` dict (the
  library's :class:`~sdze_lightning.nn.MLP`), or, for the library's own classes, whose
  constructor's arguments are its attributes of the same names (the estimators; checked
  by building a copy), becomes
  ``{"_target_": "<module>.<class>", **arguments}``;
* a ``functools.partial`` (a network factory, a method, a scheduler) becomes
  ``{"_target_": ..., "_partial_": True, "_args_": [...], **keywords}``;
* a class or function becomes ``{"_target_": "hydra.utils.get_object", "path": ...}``.

Anything else (a user's own network module, a lambda, a class that cannot be imported by
its name) is recorded as ``{"_unrecorded_": "<type name>"}``: loading then needs that
argument again (:func:`unrecorded`). Decoding imports and calls the recorded targets
through Hydra's ``instantiate`` (with its checks of what a config may call), as
``sdze-train`` builds a run from its config: load only checkpoints you trust.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

#: Key of the marker of an argument that could not be recorded.
UNRECORDED = "_unrecorded_"
#: The package whose classes are recorded from their attributes (a copy is built to check).
LIBRARY = "sdze_lightning"
#: Values stored as they are.
PLAIN: tuple[type, ...] = (bool, int, float, str, type(None), torch.dtype, torch.Tensor)


class _Unrecordable(Exception):
    """Raised inside :func:`encode` for a value that has no plain-data form."""


def object_path(obj: Any) -> str | None:
    """``<module>.<qualified name>`` of a class or function, if importing it gives ``obj`` back."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(name, str) or "<" in name:
        return None
    path = f"{module}.{name}"
    try:
        found = get_object(path)
    except Exception:  # noqa: BLE001 - any import failure means: not importable by name
        return None
    return path if found is obj else None


def _path(obj: Any) -> str:
    path = object_path(obj)
    if path is None:
        raise _Unrecordable(getattr(obj, "__qualname__", type(obj).__name__))
    return path


def _same_state(a: Any, b: Any) -> bool:
    """Whether two objects of one class hold equal attributes."""
    left, right = vars(a), vars(b)
    if left.keys() != right.keys():
        return False
    for key, value in left.items():
        other = right[key]
        try:
            same = (torch.equal(value, other) if isinstance(value, torch.Tensor)
                    else bool(value == other))
        except Exception:  # noqa: BLE001 - incomparable values: not the same state
            return False
        if not same:
            return False
    return True


def _attribute_arguments(obj: Any) -> dict[str, Any]:
    """The constructor arguments of ``obj`` read from its attributes, checked by a rebuild."""
    cls = type(obj)
    if not cls.__module__.startswith(f"{LIBRARY}."):  # no copy of a user's object is built
        raise _Unrecordable(cls.__name__)
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError) as err:  # a builtin type without a signature
        raise _Unrecordable(cls.__name__) from err
    arguments: dict[str, Any] = {}
    for p in parameters:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise _Unrecordable(cls.__name__)
        if hasattr(obj, p.name):
            arguments[p.name] = getattr(obj, p.name)
        elif p.default is p.empty:
            raise _Unrecordable(cls.__name__)
    try:
        rebuilt = cls(**arguments)
    except Exception as err:  # noqa: BLE001 - not rebuildable from its attributes
        raise _Unrecordable(cls.__name__) from err
    if not _same_state(rebuilt, obj):
        raise _Unrecordable(cls.__name__)
    return arguments


def _call_arguments(obj: Any) -> dict[str, Any]:
    """What rebuilds ``obj``: its ``init_args``, or (not for modules) its checked attributes."""
    reported = getattr(obj, "init_args", None)
    if isinstance(reported, dict):
        return dict(reported)
    if isinstance(obj, torch.nn.Module):  # weights cannot be compared with a rebuild
        raise _Unrecordable(type(obj).__name__)
    return _attribute_arguments(obj)


def _encode(value: Any) -> Any:
    if isinstance(value, PLAIN):
        return value
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if type(value) in (list, tuple):
        return type(value)(_encode(v) for v in value)
    if type(value) is dict:
        if not all(isinstance(k, bool | int | float | str) for k in value):
            raise _Unrecordable("dict")
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, functools.partial):
        recipe: dict[str, Any] = {"_target_": _path(value.func), "_partial_": True}
        if value.args:
            recipe["_args_"] = [_encode(a) for a in value.args]
        return recipe | {k: _encode(v) for k, v in value.keywords.items()}
    if inspect.isclass(value) or inspect.isroutine(value):
        return {"_target_": "hydra.utils.get_object", "path": _path(value)}
    target = _path(type(value))
    return {"_target_": target} | {k: _encode(v) for k, v in _call_arguments(value).items()}


def encode(value: Any) -> Any:
    """``value`` as plain data (see the module docstring), or the marker of :data:`UNRECORDED`."""
    try:
        return _encode(value)
    except Exception:  # noqa: BLE001 - recording never stops a problem's construction
        return {UNRECORDED: type(value).__name__}


def unrecorded(value: Any) -> str | None:
    """The type name kept by the marker ``value``, or ``None`` if it is not a marker."""
    if isinstance(value, dict) and UNRECORDED in value:
        return str(value[UNRECORDED])
    return None


def decode(value: Any) -> Any:
    """The object that :func:`encode` recorded as ``value`` (``instantiate`` of a recipe).

    Lists and tuples inside a recipe come back as lists (Hydra's conversion).

    Raises:
        ValueError: ``value`` is the marker of an argument that was not recorded.

    """
    if unrecorded(value) is not None:
        raise ValueError(f"A {unrecorded(value)} was not recorded; pass it again.")
    if type(value) in (list, tuple):
        return type(value)(decode(v) for v in value)
    if type(value) is not dict:
        return value
    if "_target_" not in value:
        return {k: decode(v) for k, v in value.items()}
    return instantiate(value, _convert_="all")
