"""sdze-lightning: back-propagation-free PINN training on PyTorch Lightning."""

# First: a checkout imported as-is finds its top-level callbacks/ and configs/ (see module).
from sdze_lightning import _checkout  # noqa: F401
from sdze_lightning.checkpoint_io import StreamingCheckpointIO
from sdze_lightning.derivatives import Derivatives
from sdze_lightning.directions import Directions
from sdze_lightning.loading import load_run
from sdze_lightning.problem import NonFiniteLossError, PINNProblem
from sdze_lightning.tips import silence_lightning_tips

silence_lightning_tips()

__all__ = [
    "Derivatives", "Directions", "NonFiniteLossError", "PINNProblem", "StreamingCheckpointIO",
    "load_run",
]
__version__ = "0.1.0"
