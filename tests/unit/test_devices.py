"""``sdze_lightning.devices.device_of``: the ``device`` attribute, else the first parameter's.

Devices other than the CPU are stood in for by PyTorch's ``meta`` device (no GPU needed):
a ``meta`` answer can only come from the attribute or the parameters looked at.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from sdze_lightning.devices import device_of

META = torch.device("meta")


def test_the_first_parameters_device_without_a_device_attribute():
    module = nn.Linear(2, 3, device="meta")
    assert not hasattr(module, "device")
    assert device_of(module) == META


def test_the_first_parameter_decides_when_parameters_are_split():
    module = nn.Sequential(nn.Linear(2, 2, device="meta"), nn.Linear(2, 2))
    assert device_of(module) == META
    module = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"))
    assert device_of(module) == torch.device("cpu")


def test_a_module_without_parameters_is_on_the_cpu():
    assert device_of(nn.ReLU()) == torch.device("cpu")
    # Buffers are not looked at: only parameters (documented: "its first parameter's").
    module = nn.Module()
    module.register_buffer("table", torch.zeros(3, device="meta"))
    assert device_of(module) == torch.device("cpu")


def test_a_device_attribute_wins_over_the_parameters():
    module = nn.Linear(2, 2)  # parameters on the CPU
    module.device = META
    assert device_of(module) == META


def test_a_device_attribute_that_is_not_a_torch_device_is_ignored():
    module = nn.Linear(2, 2, device="meta")
    module.device = "cpu"  # a string, not a torch.device
    assert device_of(module) == META


def test_a_lightning_module_reports_its_own_device():
    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(2, 2)

    module = Tiny()
    assert device_of(module) == torch.device("cpu") == module.device
    module.to("meta")  # Lightning's device mixin follows .to()
    assert module.device == META
    assert device_of(module) == META
