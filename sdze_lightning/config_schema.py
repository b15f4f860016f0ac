"""The typed schema of the run options at the top of ``configs/config.yaml``.

OmegaConf's structured configs check these types and convert the values that have a
clear meaning (``"3"`` -> ``3``, ``"yes"`` -> ``True``); :func:`check_run_options`
turns a rejected value into the CLI's one-line message (``seed must be an integer, got
'abc'.``). The schema is applied when ``sdze-train`` starts a run, not while Hydra composes
the config: a composition error ends the process with Hydra's own report (several
lines, exit status 1) instead of ``Error: <message>`` and exit status 2.

The options that the problem takes (``pde.*``, ``prefetch``, ``fused_kernels``, ``output_fit``,
``threads``) are checked by its constructor, which Python-API users reach without Hydra.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError


class Divergence(enum.Enum):
    """What a NaN/Inf loss does: ``stop`` the run, or ``skip`` the step."""

    stop = "stop"
    skip = "skip"


@dataclasses.dataclass
class TrainerOptions:
    """The integer ``trainer.*`` options (``null``: Lightning's default)."""

    max_steps: int | None = None
    max_epochs: int | None = None
    log_every_n_steps: int | None = None
    num_sanity_val_steps: int | None = None


@dataclasses.dataclass
class RunOptions:
    """The typed top-level options of a run."""

    seed: int = 0
    divergence: Divergence = Divergence.stop
    replay_log: bool = False
    ckpt_path: str | None = None
    trainer: TrainerOptions = dataclasses.field(default_factory=TrainerOptions)


#: What the message says a value of each type must be.
EXPECTED: dict[Any, str] = {int: "an integer", bool: "true or false", str: "a string"}


def _expected(full_key: str) -> str:
    """What the schema expects at ``full_key`` (``"trainer.max_steps"``), in words."""
    kind: Any = RunOptions
    for part in full_key.split("."):
        kind = typing.get_type_hints(kind)[part]
    kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return f"one of {[m.value for m in kind]}"
    return EXPECTED.get(kind, kind.__name__)


def check_run_options(cfg: DictConfig) -> None:
    """Check the keys of ``cfg`` that :class:`RunOptions` types; store their typed values.

    Keys absent from ``cfg`` stay absent; other keys are not looked at.

    Raises:
        ValueError: A value has the wrong type (``seed must be an integer, got 'abc'.``).

    """
    given = {
        f.name: cfg[f.name]
        for f in dataclasses.fields(RunOptions)
        if f.name != "trainer" and f.name in cfg
    }
    trainer = cfg.get("trainer") or {}
    given["trainer"] = {
        f.name: trainer[f.name] for f in dataclasses.fields(TrainerOptions) if f.name in trainer
    }
    try:
        typed = OmegaConf.merge(OmegaConf.structured(RunOptions), given)
    except ValidationError as err:
        message = f"{err.full_key} must be {_expected(err.full_key)}, got {err.value!r}."
        raise ValueError(message) from err
    plain = OmegaConf.to_container(typed, enum_to_str=True)
    for key in given:
        if key != "trainer":
            cfg[key] = plain[key]
    for key in given["trainer"]:
        cfg.trainer[key] = plain["trainer"][key]
