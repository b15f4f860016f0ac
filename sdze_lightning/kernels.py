"""Fused kernels for the hot ``O(N d)`` elementwise work of the shipped problems.

At large ``d`` the step of a forward-only method is bound by a few passes over
the ``N x d`` batch; an analytic source term written with ``torch`` operators
makes a dozen more (each ``sin``, ``mul``, ``add`` reads and writes a full
``N x d`` temporary). :func:`fused_call` runs such a term through
``torch.compile`` (TorchInductor), which fuses it into one pass with row
reductions and no ``N x d`` temporary: at large ``d``, where the passes over memory
dominate, it is faster than the eager code because it makes one pass instead of a
dozen, and it needs ``O(N)`` extra memory (measured: ``benchmarks/README.md``,
``fused_kernels.py``).

Kernels are built with Inductor's C++ wrapper (``cpp_wrapper``), whose entry
point releases the GIL while the kernel runs. With the default Python wrapper
the kernel holds the GIL for its whole run, so a source term computed on the
prefetch thread (:mod:`sdze_lightning.prefetch`) stalls the main thread's
Python between its own operators, and two threads cannot share the work. If
the C++ wrapper fails to build, the default wrapper is tried next.

Compilation runs once per process (Inductor caches its output across processes)
and costs far more than one call, so callers use it only past a size where the
saving per call repays it over a run, and fall back to their eager code when it is
unavailable. Whether a problem uses them is its ``fused_kernels`` argument (the config
field ``fused_kernels``, recorded in ``summary.json`` with :func:`fused_report`): a
fused kernel sums in another order than the eager code, so the choice is part
of a run's record, not a process-wide switch. A kernel that fails to compile
with every wrapper is logged once and turned off.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

#: ``torch.compile`` options to try, in order: the C++ wrapper (releases the GIL), then
#: Inductor's default Python wrapper.
COMPILE_OPTIONS: tuple[dict[str, bool], ...] = ({"cpp_wrapper": True}, {})

#: Memory a process holds once it has compiled and run a kernel (TorchInductor's modules,
#: caches and the compiled code), rounded up from a measurement: the peak RSS of
#: ``import sdze_lightning.cli`` against the same after compiling the two-body kernel
#: (``benchmarks/_common.warm_fused_kernels``). The memory pre-flight counts it (checked
#: against measured peaks: ``benchmarks/README.md``, ``preflight_accuracy.py``).
COMPILE_BYTES = 100_000_000

_compiled: dict[Callable, Callable] = {}
#: Index into :data:`COMPILE_OPTIONS` of each kernel's current (or next) attempt.
_attempt: dict[Callable, int] = {}
_failed: set[Callable] = set()
#: Names of the kernels whose compiled version has run in this process.
_ran: set[str] = set()
#: TorchDynamo is not thread-safe; the prefetch thread (``sdze_lightning.prefetch``) and
#: the main thread may both call a kernel, so calls take turns. The C++ wrapper releases
#: the GIL, not this lock: while one thread runs a kernel the other runs anything but one.
_lock = threading.Lock()


def fused_report(enabled: bool) -> dict[str, bool | list[str]]:
    """What ``summary.json`` records: the setting, and the kernels that ran compiled.

    Args:
        enabled: The problem's ``fused_kernels`` setting.

    Returns:
        ``{"enabled": enabled, "ran": [...]}``, the names of the kernels whose
        compiled version has run in this process (sorted; empty when none applied,
        e.g. below a problem's size threshold, or every compilation failed).

    """
    return {"enabled": bool(enabled), "ran": sorted(_ran)}


def fused_call(fn: Callable[..., tuple[Tensor, ...]], *args: Tensor) -> tuple[Tensor, ...] | None:
    """``fn(*args)`` compiled with ``torch.compile``, without autograd; ``None`` if unavailable.

    Args:
        fn: A pure tensor function (compiled once per process, dynamic shapes).
        *args: Its tensor arguments.

    Returns:
        The outputs of the compiled ``fn``, or ``None`` when ``fn`` failed to
        compile before or fails now (the caller then computes the same thing
        eagerly). Whether to call it at all is the caller's setting (a problem's
        ``fused_kernels``).

    """
    if fn in _failed:
        return None
    with _lock, torch.no_grad():
        while fn not in _failed:
            attempt = _attempt.setdefault(fn, 0)
            try:
                compiled = _compiled.get(fn)
                if compiled is None:
                    options = COMPILE_OPTIONS[attempt]
                    compiled = _compiled[fn] = torch.compile(fn, dynamic=True, options=options)
                out = compiled(*args)
                _ran.add(fn.__name__)
                return out
            except torch.OutOfMemoryError:
                raise  # not a compiler failure: the eager code would need the memory too
            except Exception as err:  # noqa: BLE001 - any compiler failure: next wrapper, then eager
                _compiled.pop(fn, None)
                _attempt[fn] = attempt + 1
                if attempt + 1 >= len(COMPILE_OPTIONS):
                    _failed.add(fn)
                    log.warning("torch.compile of %s failed (%s); using the eager version.",
                                fn.__name__, err)
                else:
                    log.info("torch.compile of %s with %s failed (%s); trying %s.", fn.__name__,
                             COMPILE_OPTIONS[attempt], err, COMPILE_OPTIONS[attempt + 1])
    return None
