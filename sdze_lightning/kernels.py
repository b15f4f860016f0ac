"""Fused kernels for the hot ``O(N d)`` elementwise work of the shipped problems.

At large ``d`` the step of a forward-only method is bound by a few passes over
the ``N x d`` batch; an analytic source term written with ``torch`` operators
makes a dozen more (each ``sin``, ``mul``, ``add`` reads and writes a full
``N x d`` temporary). :func:`fused_call` runs such a term through
``torch.compile`` (TorchInductor), which fuses it into one pass with row
reductions and no ``N x d`` temporary: about 10x faster and ``O(N)`` extra
memory for the two-body source at ``d = 10^6`` on a CPU
(``benchmarks/README.md``).

Compilation costs tens of seconds once per process (cached across processes
by Inductor), so callers use it only past a size where that pays off, and
fall back to their eager code when it is unavailable: set the environment
variable ``SDZE_FUSED=0`` to turn it off, and any compilation error is
logged once and turns it off for that kernel.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_compiled: dict[Callable, Callable] = {}
_failed: set[Callable] = set()
#: TorchDynamo is not thread-safe; the prefetch thread (``sdze_lightning.prefetch``) and
#: the main thread (validation, probes) may both call a kernel, so calls take turns.
_lock = threading.Lock()


def fused_enabled() -> bool:
    """Whether fused kernels may be used (``SDZE_FUSED`` is not ``0``/``false``)."""
    return os.environ.get("SDZE_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")


def fused_call(fn: Callable[..., tuple[Tensor, ...]], *args: Tensor) -> tuple[Tensor, ...] | None:
    """``fn(*args)`` compiled with ``torch.compile``, without autograd; ``None`` if unavailable.

    Args:
        fn: A pure tensor function (compiled once per process, dynamic shapes).
        *args: Its tensor arguments.

    Returns:
        The outputs of the compiled ``fn``, or ``None`` when fused kernels are
        disabled, ``fn`` failed to compile before, or it fails now (the
        caller then computes the same thing eagerly).

    """
    if not fused_enabled() or fn in _failed:
        return None
    try:
        with _lock, torch.no_grad():
            compiled = _compiled.get(fn)
            if compiled is None:
                compiled = _compiled[fn] = torch.compile(fn, dynamic=True)
            return compiled(*args)
    except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager code
        _failed.add(fn)
        log.warning("torch.compile of %s failed (%s); using the eager version.", fn.__name__, err)
        return None
