"""The run directory as the user's record: resume from it, never destroy it.

A run directory (``hydra.run.dir``) holds a run's config, metrics, checkpoints and
summary. This module keeps them across commands:

* every checkpoint carries the composed config (:class:`ConfigInCheckpoint`), so
  ``ckpt_path=last`` alone resumes the same run (:func:`resume_config`);
* an override that would change what is being trained (:data:`PROTECTED`) is refused
  before anything is written, naming the key and both values; the others
  (``trainer.max_steps``, ``trainer.max_time``, ``logger``, ``callbacks``, the lr
  schedule's horizon, ...) are applied and recorded;
* each command's config is kept: the first in ``.hydra/``, later segments in
  ``.hydra/segment-<n>/`` (:func:`record_segment_config`);
* a new run (no ``ckpt_path``) in a directory that already holds one is refused
  (:func:`check_fresh`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

#: Checkpoint entry holding ``{"config": <resolved config>, "choices": <group choices>}``.
CHECKPOINT_KEY = "sdze_lightning_run"
#: Config paths that define what is trained; a resume may not change them.
PROTECTED: tuple[str, ...] = (
    "pde", "model", "method", "estimator", "seed", "trainer.precision", "scheduler", "experiment",
)
#: Paths under :data:`PROTECTED` that a resume may change (the lr schedule's horizon).
SAFE_UNDER_PROTECTED: tuple[str, ...] = (
    "scheduler.T_max", "scheduler.total_iters", "scheduler.total_steps",
)
#: Files whose presence marks a directory as holding a run.
RUN_MARKERS: tuple[str, ...] = ("summary.json", ".hydra/config.yaml", "checkpoints")


#: Environment variables that carry a process's data-parallel rank, in the order Lightning
#: reads them (``lightning.fabric.utilities.rank_zero``), and those of its node.
RANK_VARIABLES: tuple[str, ...] = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
NODE_RANK_VARIABLES: tuple[str, ...] = ("NODE_RANK", "GROUP_RANK")


def is_writing_rank() -> bool:
    """Whether this process writes the run directory: data-parallel rank 0, or no DDP.

    Every rank of a data-parallel run executes ``sdze-train`` (Lightning's launcher
    starts the command again for each local rank; ``torchrun`` and SLURM start every
    rank), before the Trainer that knows the rank exists: the rank is read from the
    environment, as Lightning reads it. Only rank 0 checks, creates and writes the
    run directory's files.
    """
    for name in RANK_VARIABLES:
        if os.environ.get(name) is not None:
            if int(os.environ[name]) != 0:
                return False
            break
    if os.environ.get("RANK") is None:  # a local rank 0 on another node is no rank 0
        node = next((os.environ[v] for v in NODE_RANK_VARIABLES if os.environ.get(v)), "0")
        return int(node) == 0
    return True


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def override_key(override: str) -> str:
    """The config path an override sets (``+a.b=1``, ``~a.b``, ``a/b=c`` -> ``a.b``)."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[0].replace("/", ".")


def find_checkpoint(ckpt_path: str | None, cfg: DictConfig, run_dir: str | Path) -> Path | None:
    """The file ``ckpt_path`` names (``last``: the run directory's ``last.ckpt``), if it exists."""
    if ckpt_path in (None, "best", "hpc"):
        return None
    if ckpt_path != "last":
        return Path(ckpt_path)
    dirs = [
        Path(node["dirpath"])
        for node in (cfg.get("callbacks") or {}).values()
        if isinstance(node, DictConfig) and node.get("dirpath")
    ]
    for folder in [*dirs, Path(run_dir) / "checkpoints"]:
        found = sorted(folder.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    return None


def stored_run(path: Path) -> dict[str, Any] | None:
    """The config entry of checkpoint ``path`` (memory-mapped: the weights are not read)."""
    ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    return ckpt.get(CHECKPOINT_KEY)


def _describe(value: Any) -> str:
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    return repr(value)


def _moved(node: Any, old: str | None, new: str | Path | None) -> Any:
    """``node`` with every path under the run's old directory moved under ``new``."""
    if old is None or new is None or str(old) == str(new):
        return node
    if isinstance(node, dict):
        return {k: _moved(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_moved(v, old, new) for v in node]
    if isinstance(node, str) and (node == old or node.startswith(old.rstrip("/") + "/")):
        return str(new) + node[len(old):]
    return node


def resume_config(
    cfg: DictConfig,
    stored: dict[str, Any],
    overrides: list[str],
    choices: dict[str, Any],
    run_dir: str | Path | None = None,
) -> tuple[DictConfig, dict[str, Any]]:
    """The config of a resumed run: the stored one, with this command's safe overrides.

    Paths under the directory the run was stored from move to ``run_dir`` (a run
    directory that was moved or copied resumes in place).

    Args:
        cfg: The config this command composed (defaults plus its overrides).
        stored: The checkpoint's entry (``config`` and ``choices``).
        overrides: This command's overrides (``key=value`` strings).
        choices: This command's config-group choices (``method: sdze``, ...).
        run_dir: This command's run directory.

    Returns:
        The config to train with and its group choices.

    Raises:
        ValueError: An override changes a :data:`PROTECTED` value; the message names
            each such key with the run's value and the command's.

    """
    saved = OmegaConf.create(_moved(stored["config"], stored.get("run_dir"), run_dir))
    saved_choices = dict(stored.get("choices") or {})
    conflicts, apply = [], []
    for override in overrides:
        key = override_key(override)
        if key == "ckpt_path":
            continue
        if any(_under(key, s) for s in SAFE_UNDER_PROTECTED):
            apply.append((override, key))
            continue
        touched = {
            key if _under(key, p) else p for p in PROTECTED if _under(p, key) or _under(key, p)
        }
        for path in sorted(touched):
            if key == path and path in choices and path in saved_choices:
                before, after = repr(saved_choices[path]), repr(choices[path])
            else:
                before = _describe(OmegaConf.select(saved, path, default=None))
                after = _describe(OmegaConf.select(cfg, path, default=None))
            if before != after:
                conflicts.append(f"{path} (the run has {before}, this command gives {after})")
        if not any(_under(key, p) for p in PROTECTED):
            apply.append((override, key))  # unchanged protected values are kept as stored
    if conflicts:
        raise ValueError(
            "Resuming would change what the run trains: "
            + "; ".join(conflicts)
            + ". Drop these overrides (a resume reuses the run's config) or start a new run "
            "in another hydra.run.dir."
        )
    for override, key in apply:
        if override.startswith("~"):
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(saved, parent) if parent else saved
            if isinstance(node, DictConfig) and leaf in node:
                del node[leaf]
            continue
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True)
        OmegaConf.update(saved, key, value, merge=False, force_add=True)
        if key in choices:
            saved_choices[key] = choices[key]
    return saved, saved_choices


def check_fresh(run_dir: str | Path) -> None:
    """Refuse to start a new run in a directory that holds one (it would be overwritten)."""
    found = [m for m in RUN_MARKERS if (Path(run_dir) / m).exists()]
    if found:
        raise ValueError(
            f"hydra.run.dir={run_dir} already holds a run ({', '.join(found)}); resume it with "
            "ckpt_path=last, or choose another hydra.run.dir."
        )


def record_segment_config(
    run_dir: str | Path,
    config: dict[str, Any],
    overrides: list[str],
    choices: dict[str, Any] | None = None,
) -> Path:
    """Write this command's config, overrides and group choices; earlier segments' are kept.

    The first segment writes ``.hydra/config.yaml``, ``.hydra/overrides.yaml`` (Hydra's
    layout) and ``.hydra/choices.yaml`` (``pde: poisson2d``, ``method: sdze``, ...);
    segment ``n >= 1`` writes them to ``.hydra/segment-<n>/``.

    Returns:
        The folder written.

    """
    root = Path(run_dir) / ".hydra"
    folder, n = root, 0
    while (folder / "config.yaml").exists():
        n += 1
        folder = root / f"segment-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    (folder / "choices.yaml").write_text(yaml.safe_dump(dict(choices or {}), sort_keys=False))
    return folder


class ConfigInCheckpoint(L.Callback):
    """Store the run's composed config (and group choices) in every checkpoint.

    Args:
        config: The resolved config.
        choices: The config-group choices (``method: sdze``, ...).
        run_dir: The run directory (the config's paths under it follow a moved run).

    """

    def __init__(
        self, config: dict[str, Any], choices: dict[str, Any], run_dir: str | Path | None = None
    ) -> None:
        self.entry = {"config": config, "choices": choices, "run_dir": run_dir and str(run_dir)}

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Add the config entry (:data:`CHECKPOINT_KEY`)."""
        checkpoint[CHECKPOINT_KEY] = self.entry
