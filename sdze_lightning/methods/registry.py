"""Methods by name (``method="sdze"``), as the CLI's ``method=<name>`` builds them.

A name is a file of the packaged config group ``configs/method/``: the Python API
gets the same defaults as ``sdze-train method=<name>``, and a method added there is
available by name without registering it here.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from hydra.utils import instantiate
from omegaconf import OmegaConf


def method_names() -> list[str]:
    """Names of the packaged method configs."""
    folder = resources.files("sdze_lightning.configs") / "method"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def build_method(name: str, seed: int = 0) -> Any:
    """The method ``name`` as an optimizer factory (a partial), seeded with ``seed``.

    Raises:
        ValueError: If no packaged config has that name.

    """
    names = method_names()
    if name not in names:
        raise ValueError(f"Unknown method {name!r}; available: {names}.")
    text = (resources.files("sdze_lightning.configs") / "method" / f"{name}.yaml").read_text()
    node = OmegaConf.create({"seed": int(seed), "method": OmegaConf.create(text)})
    return instantiate(node.method)
