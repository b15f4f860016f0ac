"""``GracefulInterrupt``: a run's end, Ctrl-C or SIGTERM included, leaves a resumable checkpoint.

On the first SIGINT or SIGTERM (Ctrl-C, a SLURM preemption, a CI timeout) the step in
progress finishes, a resumable checkpoint of that step is written where
``ModelCheckpoint`` keeps ``last.ckpt`` (so ``ckpt_path=last`` resumes it, bit for bit:
the state is the one between two steps), training stops normally (the summary says
``"status": "interrupted"`` with the last metrics) and one line says how to resume.
A second signal raises ``KeyboardInterrupt`` at once: no checkpoint of a half-done
step is written.

A run that ends normally between two of ``ModelCheckpoint``'s periodic saves also
writes ``last.ckpt`` at its final step (nothing is redone on resume). A run stopped by
an exception (a NaN/Inf loss) writes nothing: ``last.ckpt`` stays the last good state.

The handlers are installed when training starts (after Lightning's own SIGTERM
handler, which would otherwise raise ``SIGTERMException`` at the end of the step) and
restored when it ends. SLURM's requeue signal (``SIGUSR1``) keeps Lightning's
handling (``hpc_ckpt_*.ckpt``, resumed with ``ckpt_path=hpc``).
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger("sdze_lightning")

#: The signals handled.
SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


class GracefulInterrupt(L.Callback):
    """Stop after the current step on SIGINT/SIGTERM, save a checkpoint, report how to resume.

    Args:
        resume_hint: The command that resumes the run (printed after the checkpoint
            path); ``None`` prints the checkpoint path only.

    Attributes:
        interrupted: Whether a signal stopped training.
        checkpoint_path: The checkpoint written on interruption.

    """

    def __init__(self, resume_hint: str | None = None) -> None:
        self.resume_hint = resume_hint
        self.interrupted = False
        self.signal_name: str | None = None
        self.checkpoint_path: Path | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.interrupted:
            self._restore()
            raise KeyboardInterrupt(f"second {name}: stopping at once, no checkpoint")
        self.interrupted, self.signal_name = True, name
        log.warning(
            "Received %s: stopping after this step and saving a checkpoint "
            "(send it again to stop at once).",
            name,
        )

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Install the handlers (main thread only)."""
        self.interrupted, self.checkpoint_path = False, None
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        """After an interrupted step, save the checkpoint and stop; after the last, save it."""
        if not self.interrupted or trainer.should_stop:
            if 0 < trainer.max_steps <= trainer.global_step and self._behind(trainer):
                self._save_last(trainer)  # between steps, like the periodic checkpoints
            return
        self.checkpoint_path = self._save_last(trainer)
        trainer.should_stop = True
        hint = f"; resume with: {self.resume_hint}" if self.resume_hint else ""
        log.warning(
            "Interrupted (%s) at step %d: checkpoint %s%s",
            self.signal_name, trainer.global_step, self.checkpoint_path, hint,
        )

    @staticmethod
    def _save_last(trainer: L.Trainer) -> Path:
        """Write the last checkpoint of this step where ``ModelCheckpoint`` keeps it."""
        keepers = [
            cb for cb in trainer.checkpoint_callbacks
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None and cb.save_last
        ]
        if keepers:
            path = Path(keepers[0].format_checkpoint_name({}, keepers[0].CHECKPOINT_NAME_LAST))
        else:
            path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(path)
        for cb in keepers:
            cb.last_model_path = str(path)
            cb._last_global_step_saved = trainer.global_step
        return path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Restore the handlers; write ``last.ckpt`` of the final step if it is behind."""
        self._restore()
        if self._behind(trainer) and trainer.global_step > 0:  # e.g. stopped by max_time
            self._save_last(trainer)

    @staticmethod
    def _behind(trainer: L.Trainer) -> bool:
        """Whether a ``ModelCheckpoint`` keeps ``last.ckpt`` and it is not of this step."""
        return any(
            isinstance(cb, ModelCheckpoint) and cb.save_last
            and getattr(cb, "_last_global_step_saved", -1) != trainer.global_step
            for cb in trainer.checkpoint_callbacks
        )

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Restore the handlers."""
        self._restore()
