"""The device a module computes on."""

from __future__ import annotations

import torch
from torch import nn


def device_of(module: nn.Module) -> torch.device:
    """Device of a module: its ``device`` attribute (Lightning), else its first parameter's."""
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
