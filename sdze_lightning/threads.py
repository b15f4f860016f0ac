"""Intra-op thread policy: how many threads torch's CPU kernels use during ``fit``.

torch starts one intra-op thread per core. Where another process keeps a core busy,
those threads wait for each other at every parallel op (the thread that shares the busy
core runs only when the scheduler gives it a turn), and the small ops of a PINN step
become slower than on one thread (measured: ``benchmarks/README.md``, ``threads.py``).
Where the ops are small, a second thread gains nothing even on an idle machine. The
policy ``threads="auto"`` therefore picks

* one thread when one step's work is small (:data:`MIN_WORK_PER_THREAD`
  multiply-adds per thread and more), and otherwise
* the number of cores that are *free now* (idle time of the allowed CPUs over a short
  window of ``/proc/stat``), less one for a prefetch thread and shared between the
  processes of this node,

and never more than the cores this process may run on. ``OMP_NUM_THREADS`` set by
the user wins over ``auto``; a positive integer is used as given.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: Multiply-adds of one step's largest work item (points x network parameters) per
#: thread below which another thread does not pay: Poisson 2D with the MLP 4x128 and
#: 100 points (~5e6) stays on one thread, the two-body problem at d = 1e4 (~1.3e8)
#: may use two.
MIN_WORK_PER_THREAD = 1 << 25
#: How long the idle time of the CPUs is sampled (seconds).
SAMPLE_SECONDS = 0.2


def check_threads(value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is ``"auto"`` or a positive integer."""
    if value == "auto":
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"threads must be 'auto' or a positive integer, got {value!r}.")


def allowed_cores() -> int:
    """The number of CPUs this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _cpu_times(cpus: set[int] | None) -> tuple[int, int] | None:
    """``(idle, total)`` jiffies summed over ``cpus`` (all CPUs for ``None``)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    idle = total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in fields[:8]]
        idle += values[3] + values[4]  # idle + iowait
        total += sum(values)
    return idle, total


def free_cores(window_s: float = SAMPLE_SECONDS) -> float:
    """Cores left idle by every process over the next ``window_s`` seconds.

    Reads ``/proc/stat`` twice (Linux). Where that is not possible, assumes every
    allowed core is free.
    """
    try:
        cpus: set[int] | None = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = None
    before = _cpu_times(cpus)
    if before is None:
        return float(allowed_cores())
    time.sleep(window_s)
    after = _cpu_times(cpus)
    if after is None or after[1] <= before[1]:
        return float(allowed_cores())
    idle_fraction = (after[0] - before[0]) / (after[1] - before[1])
    return idle_fraction * allowed_cores()


def choose_threads(work: float, free: float, cores: int, reserved: int = 0, share: int = 1) -> int:
    """The intra-op thread count for ``work`` multiply-adds per step.

    Args:
        work: Multiply-adds of the step's largest work item (points x parameters).
        free: Cores idle now (:func:`free_cores`); a core counts as free when at
            least 3/4 of it is idle.
        cores: Cores this process may use at most.
        reserved: Cores taken by this process's own extra threads (a prefetch thread).
        share: Processes of this run on this machine (data-parallel ranks on CPU).

    Returns:
        At least 1; more only where the work is large enough and the cores are idle.

    """
    by_work = max(1, int(work // MIN_WORK_PER_THREAD))
    idle = int(free + 0.25)  # a core 3/4 idle counts; a busy one does not
    by_cores = max(1, (min(idle, cores) - reserved) // max(1, share))
    return max(1, min(by_work, by_cores))


def resolve_threads(setting: int | str, work: float, reserved: int = 0, share: int = 1) -> int:
    """The thread count ``setting`` stands for (``"auto"``: :func:`choose_threads`).

    With ``"auto"`` and ``OMP_NUM_THREADS`` in the environment, torch's current
    count is kept (the user chose it).
    """
    check_threads(setting)
    if isinstance(setting, int):
        return setting
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    return choose_threads(work, free_cores(), allowed_cores(), reserved, share)


class FitThreads:
    """torch's intra-op thread count during ``fit``: :meth:`apply` sets it, :meth:`restore` undoes.

    Args:
        setting: ``"auto"`` or a positive integer (:func:`resolve_threads`).

    """

    def __init__(self, setting: int | str) -> None:
        check_threads(setting)
        self.setting = setting
        self._before: int | None = None

    def apply(self, on_cpu: bool, work: float, reserved: int = 0, share: int = 1) -> int:
        """Set the count for one ``fit`` (off accelerators only) and return the count in use.

        Args:
            on_cpu: Whether the model runs on the CPU (elsewhere the count is left alone).
            work: Multiply-adds of the step's largest work item (points x parameters).
            reserved: Cores taken by this process's own extra threads (a prefetch thread).
            share: Processes of this run on this machine.

        """
        if not on_cpu:
            return torch.get_num_threads()
        count = resolve_threads(self.setting, work, reserved=reserved, share=share)
        if self._before is None:
            self._before = torch.get_num_threads()
        torch.set_num_threads(count)
        log.info("Intra-op threads: %d (threads=%s).", count, self.setting)
        return count

    def restore(self) -> None:
        """Put back the count torch had before :meth:`apply`."""
        if self._before is not None:
            torch.set_num_threads(self._before)
            self._before = None
