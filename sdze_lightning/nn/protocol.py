"""What methods need from a network beyond ``forward``: :class:`FirstLayerNetwork`.

The methods that treat the input layer apart (``fused_adafactor``, Adam's ``input_lr``),
the output-offset fit and the shared first-layer product read a network only through
these members. The library's :class:`~sdze_lightning.nn.MLP` implements them; a network
of one's own that lacks any is refused with the names it lacks
(:func:`first_layer_network`). Zeroth-order methods need none of them: they perturb any
``nn.Linear`` (:mod:`sdze_lightning.nn.perturb`).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from torch import nn

if TYPE_CHECKING:
    from sdze_lightning.nn.first_layer_grad import FirstLayerGradient

#: The members of :class:`FirstLayerNetwork`, in the order a refusal lists them.
FIRST_LAYER_MEMBERS: tuple[str, ...] = (
    "input_layer", "output_layer", "first_layer_cache", "capture_first_layer_gradient",
)


@runtime_checkable
class FirstLayerNetwork(Protocol):
    """A network whose input layer the library can treat apart.

    Attributes:
        applies_linear_offsets: Whether the network applies zeroth-order offsets itself
            (no forward hooks on its layers).

    """

    applies_linear_offsets: ClassVar[bool]

    @property
    def input_layer(self) -> nn.Linear:
        """The first linear layer, ``width x d`` (nearly all parameters at large ``d``)."""
        ...

    @property
    def output_layer(self) -> nn.Linear:
        """The last linear layer."""
        ...

    def first_layer_cache(self) -> contextlib.AbstractContextManager[None]:
        """Share the input layer's product between evaluations on the same points."""
        ...

    def capture_first_layer_gradient(self) -> contextlib.AbstractContextManager[
            FirstLayerGradient]:
        """Record the input layer's gradient as low-rank factors instead of ``.grad``."""
        ...


def missing_members(network: nn.Module) -> list[str]:
    """The members of :class:`FirstLayerNetwork` that ``network`` lacks."""
    return [name for name in FIRST_LAYER_MEMBERS if not hasattr(network, name)]


def first_layer_network(network: nn.Module, what: str, instead: str) -> FirstLayerNetwork:
    """``network``, refused unless it implements :class:`FirstLayerNetwork`.

    Args:
        network: The network.
        what: The start of the refusal, up to "the input layer" (``"method=... updates"``).
        instead: The other configuration the refusal suggests beside ``model=mlp``.

    Raises:
        TypeError: Naming the members the network lacks.

    """
    missing = missing_members(network)
    if missing:
        raise TypeError(
            f"{what} the input layer of a network with {', '.join(FIRST_LAYER_MEMBERS)} "
            f"(the library's MLP, sdze_lightning.nn.MLP); {type(network).__name__} lacks "
            f"{', '.join(missing)}. Use model=mlp or {instead}."
        )
    return network  # type: ignore[return-value]
