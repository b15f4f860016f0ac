"""Adam (``method=adam``), optionally with the input layer's weight at its own rate.

Adam normalises each parameter's step to about the learning rate. In the input
layer of an MLP on ``d`` inputs a step whose signs agree across the inputs then
moves each pre-activation ``W x`` by up to ``lr * |x|_1``, which grows with
``d`` while the small layers' steps do not: at large ``d`` the input layer wants
a smaller rate than the rest (``input_lr``), as for
:class:`~sdze_lightning.methods.FusedAdafactor`. Without ``input_lr`` this is
``torch.optim.Adam`` over every parameter, one parameter group (the same state
dict as before, so earlier checkpoints resume).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from sdze_lightning.checks import positive_float_or_none
from sdze_lightning.methods.base import MethodTraits
from sdze_lightning.nn.protocol import first_layer_network


class Adam(torch.optim.Adam):
    """``torch.optim.Adam`` built from the network, with an optional input-layer rate.

    Param groups: one (every parameter, ``lr``) without ``input_lr``; with it, group 0
    is the input layer's weight (``input_lr``) and group 1 everything else (``lr``).
    Learning-rate schedulers scale both groups alike.

    Args:
        module: The network; with ``input_lr``, the library's
            :class:`~sdze_lightning.nn.MLP` (its ``input_layer``:
            :mod:`sdze_lightning.nn.protocol`).
        lr: Learning rate (of every parameter but the input weight when ``input_lr``
            is given).
        input_lr: Learning rate of the input layer's weight (``None``: ``lr``).
        betas: Adam's ``(b1, b2)``.
        eps: Added to the root of the second moment.
        weight_decay: L2 penalty, as in ``torch.optim.Adam``.

    Raises:
        ValueError: If ``input_lr`` is not ``None`` or a number ``> 0``, or torch's Adam
            refuses a value (a negative ``lr``, a ``beta`` outside ``[0, 1)``, ...).
        TypeError: If ``input_lr`` is given and ``module`` lacks the members of
            :class:`~sdze_lightning.nn.protocol.FirstLayerNetwork`.

    """

    #: Built from the network module; ``torch.optim.Adam.step`` skips parameters without a
    #: gradient, so a closure that back-propagated nothing changes nothing:
    #: ``divergence="skip"`` needs no copy of the parameters.
    traits: ClassVar[MethodTraits] = MethodTraits(takes_module=True,
                                                  withholds_nonfinite_step=True)

    def __init__(
        self,
        module: nn.Module,
        lr: float = 1e-3,
        input_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        input_lr = positive_float_or_none("method.input_lr", input_lr)
        if input_lr is None:
            params: list = list(module.parameters())
        else:
            weight = first_layer_network(module, "method.input_lr sets the rate of",
                                         "method.input_lr=null").input_layer.weight
            params = [{"params": [weight], "lr": input_lr},
                      {"params": [p for p in module.parameters() if p is not weight]}]
        hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        try:
            super().__init__(params, **hyper)
        except (TypeError, ValueError) as err:  # torch's own checks, named for the config
            raise ValueError(
                f"method=adam rejects its configuration {hyper} ({err}); check the method.* "
                "values."
            ) from err
