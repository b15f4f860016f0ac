"""The packaged method and estimator configs are the classes' defaults.

Each key of ``configs/method/<name>.yaml`` and ``configs/estimator/<name>.yaml``, as
``sdze-train <group>=<name>`` composes it (:func:`~sdze_lightning.builders.compose_config`,
interpolations such as ``${seed}`` resolved), equals the default of the same argument of
the class its ``_target_`` names, or that argument has no default. ``MeZO(net)`` is then the
optimizer of ``sdze-train method=mezo``. One test per (group, option, key).
"""

from __future__ import annotations

import functools
import inspect
from importlib import resources
from typing import Any

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object
from omegaconf import OmegaConf

from sdze_lightning.builders import compose_config

GROUPS = ("method", "estimator")



def _options(group: str) -> list[str]:
    """Every YAML option of the packaged config group ``group``, presets included."""
    folder = resources.files("sdze_lightning.configs") / group
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir()
                  if p.name.endswith(".yaml"))


@functools.cache
def _composed(group: str, name: str) -> dict[str, Any]:
    """The group's node of ``sdze-train <group>=<name>``, resolved to plain data.

    ``compose_config`` registers its Hydra config globally; the previous one is put back.
    """
    previous = HydraConfig.instance().cfg
    try:
        cfg = compose_config([f"{group}={name}"], "unused")
        return OmegaConf.to_container(cfg[group], resolve=True)
    finally:
        HydraConfig.instance().cfg = previous


def _preset_of(group: str, name: str) -> str | None:
    """The option of the same group that ``name`` extends through its defaults list, if any."""
    text = (resources.files("sdze_lightning.configs") / group / f"{name}.yaml").read_text()
    defaults = yaml.safe_load(text).get("defaults", [])
    base = [d for d in defaults if isinstance(d, str) and d in _options(group)]
    return base[0] if base else None


def _cases() -> list[Any]:
    """(group, option, key) for every key of every option; a preset (an option that extends
    another, e.g. estimator=stein_he over stein) overrides its base's values on purpose, so
    only the keys it inherits are compared."""
    cases = []
    for group in GROUPS:
        for name in _options(group):
            base = _preset_of(group, name)
            for key, value in _composed(group, name).items():
                if key.startswith("_") and key.endswith("_"):  # _target_, _partial_, ...
                    continue
                if base is not None and value != _composed(group, base).get(key):
                    continue
                cases.append(pytest.param(group, name, key, id=f"{group}/{name}.{key}"))
    return cases


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists (YAML has lists only), recursively."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _parameters(target: str) -> dict[str, inspect.Parameter]:
    """The arguments of ``_target_`` (a class, function or ``functools.partial``)."""
    return dict(inspect.signature(get_object(target)).parameters)


@pytest.mark.parametrize(("group", "name", "key"), _cases())
def test_config_value_is_the_class_default(group, name, key):
    node = _composed(group, name)
    parameter = _parameters(node["_target_"]).get(key)
    assert parameter is not None, (
        f"configs/{group}/{name}.yaml: key {key!r} is not an argument of {node['_target_']}"
    )
    if parameter.default is inspect.Parameter.empty:
        return  # no class default: the config supplies the value
    assert _plain(node[key]) == _plain(parameter.default), (
        f"configs/{group}/{name}.yaml: {key} = {node[key]!r}, but {node['_target_']} "
        f"defaults to {parameter.default!r}"
    )


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_names_a_target_with_a_signature(group):
    names = _options(group)
    assert names, group
    for name in names:
        node = _composed(group, name)
        assert "_target_" in node, f"configs/{group}/{name}.yaml has no _target_"
        assert _parameters(node["_target_"]), node["_target_"]


def test_a_preset_is_recognised_and_its_overrides_skipped():
    assert _preset_of("estimator", "stein_he") == "stein"
    assert _preset_of("estimator", "stein") is None
    ids = {c.id for c in _cases()}
    assert "estimator/stein_he.num_directions" not in ids
    assert "estimator/stein.num_directions" in ids and "estimator/stein_he.sigma" in ids
