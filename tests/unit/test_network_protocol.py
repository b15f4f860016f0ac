"""What methods need from a network: the FirstLayerNetwork protocol and the offset table.

The library's MLP implements the protocol; a network of one's own that lacks a member is
refused by the methods that need it, with the names it lacks. Zeroth-order offsets live
in the library's table, not on the user's layers.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from sdze_lightning.methods import SDZE, Adam, FusedAdafactor
from sdze_lightning.nn import MLP
from sdze_lightning.nn.perturb import attach_hooks, delta_of, has_offset_hook, linear_layers
from sdze_lightning.nn.protocol import FIRST_LAYER_MEMBERS, FirstLayerNetwork, missing_members


def test_the_library_mlp_implements_the_protocol():
    net = MLP(4, width=8, depth=2)
    assert isinstance(net, FirstLayerNetwork) and missing_members(net) == []
    assert net.input_layer is net.layers[0] and net.output_layer is net.layers[-1]


class HalfNetwork(nn.Module):
    """A network of one's own with an input layer but none of the other members."""

    def __init__(self):
        super().__init__()
        self.input_layer = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.input_layer(x)))


@pytest.mark.parametrize("build", [
    FusedAdafactor, functools.partial(Adam, input_lr=1e-4)], ids=["fused_adafactor", "adam"])
def test_a_network_without_the_members_is_refused_with_their_names(build):
    with pytest.raises(TypeError) as err:
        build(HalfNetwork())
    message = str(err.value)
    assert "HalfNetwork lacks output_layer, first_layer_cache, capture_first_layer_gradient" \
        in message
    assert all(name in message for name in FIRST_LAYER_MEMBERS)


def test_sdze_writes_nothing_onto_the_users_layers():
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    before = [set(vars(layer)) for layer in linear_layers(net)]
    opt = SDZE(net, lr=1e-2, rank=2, seed=0)
    x = torch.rand(5, 3, dtype=torch.float64)
    opt.step(loss_at=lambda key: net(x).square().mean(), step_index=0)
    assert all(delta_of(layer) is not None for layer in linear_layers(net))  # perturbed
    assert all(has_offset_hook(layer) for layer in linear_layers(net))
    assert [set(vars(layer)) for layer in linear_layers(net)] == before
    opt.close()
    assert not any(delta_of(layer) or has_offset_hook(layer) for layer in linear_layers(net))


def test_an_mlp_and_its_copies_apply_offsets_without_hooks():
    """The MLP declares applies_linear_offsets: none of its layers (nor a deep copy's) gets
    a hook, which would add each offset twice."""
    net = MLP(3, width=4, depth=1)
    wrapped = nn.Sequential(copy.deepcopy(net), nn.Linear(1, 1))
    holds = attach_hooks(wrapped)
    assert [has_offset_hook(m) for m in linear_layers(wrapped)] == [False, False, True]
    for hold in holds:
        hold.remove()
    assert not any(has_offset_hook(m) for m in linear_layers(wrapped))
