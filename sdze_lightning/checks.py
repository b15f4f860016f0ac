"""Argument checks shared by the constructors (the Python API meets them without Hydra).

Each check raises a ``ValueError`` whose message names the config key, says what is
expected and shows the value given, e.g. ``model.width must be a positive integer, got
'wide'.`` (the CLI prints it as ``Error: <message>``).
"""

from __future__ import annotations

import numbers


def _integer_at_least(name: str, value: object, minimum: int | None, expected: str) -> int:
    """Return ``int(value)`` if ``value`` is an integer (not a bool) ``>= minimum``.

    Raises:
        ValueError: Otherwise: ``<name> must be <expected>, got <value>.``

    """
    if (
        not isinstance(value, numbers.Integral)
        or isinstance(value, bool)
        or (minimum is not None and value < minimum)
    ):
        raise ValueError(f"{name} must be {expected}, got {value!r}.")
    return int(value)


def integer(name: str, value: object, minimum: int | None = None) -> int:
    """Return ``value`` as an ``int`` if it is an integer (not a bool) ``>= minimum``.

    Args:
        name: The config key, as the message shows it (``"estimator.num_directions"``).
        value: The value given.
        minimum: The smallest value allowed; ``None`` allows any integer.

    Returns:
        The value as an ``int``.

    Raises:
        ValueError: ``name must be an integer, got ...`` (``an integer >= <minimum>``).

    """
    expected = "an integer" if minimum is None else f"an integer >= {minimum}"
    return _integer_at_least(name, value, minimum, expected)


def positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an integer ``>= 1``, else raise ``ValueError`` naming ``name``."""
    return _integer_at_least(name, value, 1, "a positive integer")


def non_negative_int(name: str, value: object) -> int:
    """Return ``value`` if it is an integer ``>= 0``, else raise ``ValueError`` naming ``name``."""
    return _integer_at_least(name, value, 0, "a non-negative integer")


def positive_int_or_none(name: str, value: object) -> int | None:
    """Return ``value`` if it is ``None`` or an integer ``>= 1``, else raise ``ValueError``."""
    if value is None:
        return None
    return _integer_at_least(name, value, 1, "a positive integer or null")


def positive_float_or_none(name: str, value: object) -> float | None:
    """Return ``value`` as a ``float`` if it is ``None`` or a number ``> 0`` (not NaN).

    Raises:
        ValueError: Otherwise: ``<name> must be > 0 or null, got <value>.``

    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be > 0 or null, got {value!r}.")
    return float(value)


def boolean(name: str, value: object) -> bool:
    """Return ``value`` if it is a ``bool``, else raise ``ValueError`` naming ``name``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    return value
