"""Memory budget: refuse, before the first step, a run whose memory cannot fit.

The estimates are lower bounds (parameters, gradients, collocation batches; not the
temporaries of a step), so a refused run could not have trained, and a run that passes
may still need more. Each refusal gives the estimated bytes of every part and the
override that shrinks the largest one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Need:
    """One part of a run's memory.

    Attributes:
        what: What it is, e.g. ``"network parameters (1.3e9)"``.
        bytes: Its size.
        fix: The override that makes it smaller, e.g. ``"lower model.width or pde.dim"``.

    """

    what: str
    bytes: int
    fix: str


def skip_snapshot_need(parameters: int, itemsize: int) -> Need:
    """The copy of the parameters that ``divergence="skip"`` takes at a non-finite step.

    Only a first-order method that does not withhold such a step by itself takes it
    (:func:`~sdze_lightning.methods.base.withholds_nonfinite`). The copy of its optimizer
    state, taken with it, is not counted (a lower bound: the state is built at the first
    step).

    Args:
        parameters: Number of trainable parameters.
        itemsize: Bytes per parameter.

    """
    return Need(
        f"divergence=skip copy of the parameters ({parameters:,})",
        parameters * itemsize,
        "set divergence=stop, or use a method that withholds a non-finite step without a "
        "copy (sdze, mezo, adam, pde_aware)",
    )


def format_bytes(n: float) -> str:
    """``n`` bytes in GB (10^9) or MB, e.g. ``'51.2 GB'``."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    """What the cgroup (v2) memory limit leaves, where one is set."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory this process can still allocate on ``device``, or ``None`` if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    known = [b for b in (_meminfo_available(), _cgroup_available()) if b is not None]
    return min(known) if known else None


def check_fits(needs: list[Need], device: torch.device | str = "cpu") -> None:
    """Raise ``ValueError`` when the ``needs`` together exceed the available memory.

    Nothing is checked where the available memory is unknown (another OS, a device
    without a query), or when ``SDZE_SKIP_MEMORY_CHECK=1``.
    """
    if os.environ.get("SDZE_SKIP_MEMORY_CHECK") == "1":
        return
    total = sum(n.bytes for n in needs)
    available = available_bytes(device)
    if available is None or total <= available:
        return
    largest = max(needs, key=lambda n: n.bytes)
    parts = "; ".join(f"{n.what}: {format_bytes(n.bytes)}" for n in needs if n.bytes > 0)
    raise ValueError(
        f"This run needs at least {format_bytes(total)} ({parts}), but only "
        f"{format_bytes(available)} of {torch.device(device).type} memory is available. "
        f"The largest part is the {largest.what}: {largest.fix}. "
        "(SDZE_SKIP_MEMORY_CHECK=1 skips this check.)"
    )
