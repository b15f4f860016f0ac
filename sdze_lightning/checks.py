"""Argument checks shared by the constructors (the Python API meets them without Hydra).

Each check raises a ``ValueError`` whose message names the config key, says what is
expected and shows the value given, e.g. ``model.width must be a positive integer, got
'wide'.`` (the CLI prints it as ``Error: <message>``).
"""

from __future__ import annotations

import numbers


def _expected(minimum: int | None) -> str:
    if minimum is None:
        return "an integer"
    if minimum == 0:
        return "a non-negative integer"
    if minimum == 1:
        return "a positive integer"
    return f"an integer >= {minimum}"


def integer(name: str, value: object, minimum: int | None = None) -> int:
    """Return ``value`` as an ``int`` if it is an integer (not a bool) ``>= minimum``.

    Args:
        name: The config key, as the message shows it (``"pde.n_interior"``).
        value: The value given.
        minimum: The smallest value allowed; ``None`` allows any integer.

    Returns:
        The value as an ``int``.

    Raises:
        ValueError: ``value`` is not such an integer.

    """
    if (
        not isinstance(value, numbers.Integral)
        or isinstance(value, bool)
        or (minimum is not None and value < minimum)
    ):
        raise ValueError(f"{name} must be {_expected(minimum)}, got {value!r}.")
    return int(value)


def positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an integer ``>= 1``, else raise ``ValueError`` naming ``name``."""
    return integer(name, value, minimum=1)


def non_negative_int(name: str, value: object) -> int:
    """Return ``value`` if it is an integer ``>= 0``, else raise ``ValueError`` naming ``name``."""
    return integer(name, value, minimum=0)


def positive_int_or_none(name: str, value: object) -> int | None:
    """Return ``value`` if it is ``None`` or an integer ``>= 1``, else raise ``ValueError``."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        return int(value)
    raise ValueError(f"{name} must be a positive integer or null, got {value!r}.")


def boolean(name: str, value: object) -> bool:
    """Return ``value`` if it is a ``bool``, else raise ``ValueError`` naming ``name``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    return value
