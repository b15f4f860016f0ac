"""Optimization methods (``method=<name>``).

* :class:`SDZE`: forward-only steps in an implicit low-rank subspace with CRNS.
* :class:`MeZO`: full-space two-point zeroth-order baseline.
* :class:`PDEAware`: the PDE-aware first-order optimizer (Churiwala et al. 2025).
* :class:`FusedAdafactor`: exact gradients; Adam on the small layers, the input layer
  updated in place from the factors of its gradient (factored second moment).
* :class:`Adam`: ``torch.optim.Adam`` with an optional input-layer rate (``method=adam``);
  any ``torch.optim`` optimizer also works directly.
"""

from sdze_lightning.methods.adam import Adam
from sdze_lightning.methods.base import FirstOrderStep, build_optimizer, is_zeroth_order
from sdze_lightning.methods.fused_adafactor import FusedAdafactor
from sdze_lightning.methods.mezo import MeZO
from sdze_lightning.methods.pde_aware import PDEAware
from sdze_lightning.methods.sdze import SDZE
from sdze_lightning.methods.zeroth_order import (
    TwoPointOptimizer,
    ZerothOrderOptimizer,
    ZerothOrderStep,
)

__all__ = [
    "SDZE",
    "Adam",
    "FirstOrderStep",
    "FusedAdafactor",
    "MeZO",
    "PDEAware",
    "TwoPointOptimizer",
    "ZerothOrderOptimizer",
    "ZerothOrderStep",
    "build_optimizer",
    "is_zeroth_order",
]
