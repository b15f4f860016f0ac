"""Methods by name (``method="sdze"``), as the CLI's ``method=<name>`` builds them.

The names are the options of the packaged config group ``configs/method/``
(:mod:`sdze_lightning.config_options`): the Python API gets the same defaults as
``sdze-train method=<name>``, and a method added there is available by name without
registering it here.
"""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate

from sdze_lightning.config_options import option_config, option_names


def method_names() -> list[str]:
    """Names of the packaged method configs."""
    return option_names("method")


def build_method(name: str, seed: int = 0) -> Any:
    """The method ``name`` as an optimizer factory (a partial), seeded with ``seed``.

    Raises:
        ValueError: If no packaged config has that name.

    """
    return instantiate(option_config("method", name, seed=int(seed)))
