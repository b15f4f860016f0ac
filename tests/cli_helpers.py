"""Objects for tests that launch ``sdze-train`` as a subprocess.

Importable by the launched processes through ``PYTHONPATH=tests``, e.g.
``+callbacks.rank_params._target_=cli_helpers.SaveRankParameters`` or
``pde._target_=cli_helpers.NaNAtStepTwo``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from sdze_lightning.problems import Poisson2D


class SaveRankParameters(L.Callback):
    """At the end of training, save ``{name: tensor}`` to ``<dirpath>/rank<global rank>.pt``."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        params = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"params": params, "global_step": trainer.global_step,
                    "world_size": trainer.world_size},
                   self.dirpath / f"rank{trainer.global_rank}.pt")


class NaNAtStepTwo(Poisson2D):
    """Poisson 2D whose residual is NaN from training step 2 on (fails after it started)."""

    def residual(self, x, d):
        r = super().residual(x, d)
        if self._trainer is not None and self.global_step >= 2:
            r = r + float("nan")
        return r
