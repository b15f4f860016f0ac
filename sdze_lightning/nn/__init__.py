"""Networks with implicit perturbation and Taylor-mode jets."""

from sdze_lightning.nn.mlp import MLP, compose_jet, product_jet
from sdze_lightning.nn.perturb import LowRankDelta, attach_hooks, linear_forward, linear_layers

__all__ = [
    "MLP",
    "LowRankDelta",
    "attach_hooks",
    "compose_jet",
    "linear_forward",
    "linear_layers",
    "product_jet",
]
