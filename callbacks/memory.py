"""``MemoryMonitor``: peak memory per step, parameter and optimizer-state bytes.

Logged keys (through ``pl_module.log``, so every attached logger receives them):

* ``memory/peak_allocated_bytes``, ``memory/peak_reserved_bytes`` (CUDA only):
  ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` of the training
  step. The peak counters are reset at the start of every step, so the value is
  the peak *of a step*, not a running maximum; the logged number is the largest
  per-step peak since the previous logged step (Lightning writes on-step values
  only every ``trainer.log_every_n_steps`` steps, and the maximum over the
  window is more useful than the peak of the one step that happens to be kept).
  Each reset first adds the peaks it clears to a running maximum per device
  (:func:`reset_cuda_peak`), so :func:`cuda_peak_bytes`, which ``summary.json``'s
  ``peak_memory_bytes`` reads, is the peak CUDA's counter would show had it
  never been reset: the run's, with or without this callback.
* ``memory/peak_rss_bytes`` (CPU, where :mod:`resource` exists): the process's
  peak resident set size (``getrusage``). The operating system offers no way
  to reset it, so it is a running maximum over the process.
* ``memory/rss_bytes`` (Linux): the current resident set size.
* ``memory/param_bytes``: bytes of the module's parameters.
* ``memory/optimizer_state_bytes``: bytes of every tensor found (recursively)
  in ``optimizer.state``. Adam's grows with the parameter count; SDZE's lives
  in the subspace coordinates and does not grow with the input dimension.

All of it is read only on the steps whose logs are kept, so the per-step cost
is a reset and four reads of the CUDA allocator's counters (host-side, no device
synchronisation) on GPU and nothing on CPU.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

try:  # not available on Windows
    import resource
except ImportError:  # pragma: no cover
    resource = None  # type: ignore[assignment]


def tensor_bytes(obj: Any) -> int:
    """Total bytes of the tensors inside ``obj`` (tensors, mappings, sequences).

    Args:
        obj: A tensor, or a (nested) dict, list, tuple or set of them; other
            objects count zero bytes.

    Returns:
        The sum of ``numel * element_size`` over all tensors, each storage view
        counted at its own size.

    """
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of all parameters of ``module``."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def optimizer_state_bytes(optimizers: torch.optim.Optimizer | Iterable[Any]) -> int:
    """Bytes of every tensor in ``optimizer.state`` (recursively), summed over optimizers.

    Lightning's ``LightningOptimizer`` wrappers are unwrapped.
    """
    if isinstance(optimizers, torch.optim.Optimizer) or hasattr(optimizers, "state"):
        optimizers = [optimizers]
    total = 0
    for opt in optimizers:
        opt = getattr(opt, "optimizer", opt)  # LightningOptimizer -> torch optimizer
        total += tensor_bytes(dict(opt.state))
    return total


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process in bytes, or ``None`` if unknown."""
    if resource is None:  # pragma: no cover
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB


#: Per CUDA device index: the largest peaks (``"allocated"``, ``"reserved"``) that
#: :func:`reset_cuda_peak` has cleared from torch's counters.
_cleared_peaks: dict[int, dict[str, int]] = {}


def _cuda_index(device: torch.device) -> int:
    """The index of a CUDA device (the current device for ``cuda`` without one)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def reset_cuda_peak(device: torch.device) -> None:
    """Reset torch's CUDA peak counters of ``device``, keeping the peaks they held.

    The cleared peaks go into a running maximum that :func:`cuda_peak_bytes` adds back,
    so a per-step reset does not lose the peak of the process.
    """
    kept = _cleared_peaks.setdefault(_cuda_index(device), {"allocated": 0, "reserved": 0})
    kept["allocated"] = max(kept["allocated"], int(torch.cuda.max_memory_allocated(device)))
    kept["reserved"] = max(kept["reserved"], int(torch.cuda.max_memory_reserved(device)))
    torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_bytes(device: torch.device, reserved: bool = False) -> int:
    """Peak CUDA memory allocated (or reserved) on ``device``, across :func:`reset_cuda_peak`.

    The larger of torch's counter (the peak since the last reset) and the peaks that
    :func:`reset_cuda_peak` cleared: what the counter would read had it never been reset
    by :class:`MemoryMonitor`. Like the peak resident set size on the CPU, it covers the
    process, not one ``fit``.
    """
    key = "reserved" if reserved else "allocated"
    counter = torch.cuda.max_memory_reserved if reserved else torch.cuda.max_memory_allocated
    cleared = _cleared_peaks.get(_cuda_index(device), {}).get(key, 0)
    return max(int(counter(device)), cleared)


def current_rss_bytes() -> int | None:
    """Return the current resident set size in bytes (Linux ``/proc``), or ``None``."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


class MemoryMonitor(L.Callback):
    """Log per-step peak memory, parameter bytes and optimizer-state bytes.

    Args:
        prefix: Prefix of the logged keys.
        cuda: Log CUDA peaks when the module is on a CUDA device.
        rss: Log the process's peak (and current) resident set size.
        state_bytes: Log parameter and optimizer-state bytes.
        prog_bar: Also show the peak memory in the progress bar.

    """

    def __init__(
        self,
        prefix: str = "memory/",
        cuda: bool = True,
        rss: bool = True,
        state_bytes: bool = True,
        prog_bar: bool = False,
    ) -> None:
        self.prefix = prefix
        self.cuda = cuda
        self.rss = rss
        self.state_bytes = state_bytes
        self.prog_bar = prog_bar
        self._window: dict[str, int] = {}
        self.last: dict[str, float] = {}

    @staticmethod
    def _is_cuda(pl_module: L.LightningModule) -> bool:
        return pl_module.device.type == "cuda" and torch.cuda.is_available()

    @staticmethod
    def _logs_kept(trainer: L.Trainer) -> bool:
        """Whether Lightning writes the on-step values of the step that just ended."""
        every = trainer.log_every_n_steps
        return bool(every) and (trainer.global_step % every == 0 or trainer.should_stop)

    def measure(
        self, pl_module: L.LightningModule, optimizers: Iterable[Any] | None = None
    ) -> dict[str, float]:
        """Return the current measurements (without the CUDA peak window)."""
        out: dict[str, float] = {}
        if self.rss:
            peak = peak_rss_bytes()
            if peak is not None:
                out["peak_rss_bytes"] = float(peak)
            now = current_rss_bytes()
            if now is not None:
                out["rss_bytes"] = float(now)
        if self.state_bytes:
            out["param_bytes"] = float(parameter_bytes(pl_module))
            if optimizers is not None:
                out["optimizer_state_bytes"] = float(optimizer_state_bytes(optimizers))
        return out

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Reset the CUDA peak counters so the next reading is this step's peak.

        The peaks they held are kept for :func:`cuda_peak_bytes` (the run's peak).
        """
        if self.cuda and self._is_cuda(pl_module):
            reset_cuda_peak(pl_module.device)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Record this step's CUDA peak; log everything on the steps whose logs are kept."""
        if self.cuda and self._is_cuda(pl_module):
            dev = pl_module.device
            for key, value in (
                ("peak_allocated_bytes", torch.cuda.max_memory_allocated(dev)),
                ("peak_reserved_bytes", torch.cuda.max_memory_reserved(dev)),
            ):
                self._window[key] = max(self._window.get(key, 0), int(value))
        if not self._logs_kept(trainer):
            return
        metrics = {k: float(v) for k, v in self._window.items()}
        self._window = {}
        metrics.update(self.measure(pl_module, trainer.optimizers))
        self.last = metrics
        for key, value in metrics.items():
            show = self.prog_bar and key in ("peak_allocated_bytes", "peak_rss_bytes")
            pl_module.log(self.prefix + key, value, on_step=True, on_epoch=False, prog_bar=show)
