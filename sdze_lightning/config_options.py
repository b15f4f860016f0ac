"""Options of the packaged config groups by name, for the Python API.

``PINNProblem(method="sdze", estimator="taylor")`` looks the names up here. A name is a
file of ``configs/<group>/`` that names its own ``_target_``: the Python API builds what
``sdze-train <group>=<name>`` builds, with the same defaults, and an option added to the
folder is available by name without being registered anywhere else. Presets that extend
another option through a defaults list (``estimator=stein_he``) need Hydra's composition
and are options of the CLI only.
"""

from __future__ import annotations

import functools
from importlib import resources

from omegaconf import DictConfig, OmegaConf


@functools.cache
def _options(group: str) -> dict[str, str]:
    """Option name -> YAML text, for the files of ``group`` that name a ``_target_``."""
    found = {}
    for path in (resources.files("sdze_lightning.configs") / group).iterdir():
        if path.name.endswith(".yaml"):
            text = path.read_text()
            if "_target_" in OmegaConf.create(text):
                found[path.name.removesuffix(".yaml")] = text
    return found


def option_names(group: str) -> list[str]:
    """The option names of the packaged config group ``group``, sorted."""
    return sorted(_options(group))


def option_config(group: str, name: str, seed: int = 0) -> DictConfig:
    """The config of option ``name`` of ``group``, with ``${seed}`` resolving to ``seed``.

    Raises:
        ValueError: ``group`` has no such option; the message lists the names it has.

    """
    options = _options(group)
    if name not in options:
        raise ValueError(f"Unknown {group} {name!r}; available: {sorted(options)}.")
    root = OmegaConf.create({"seed": seed, group: OmegaConf.create(options[name])})
    return root[group]
