"""Shipped benchmark PDEs, one module each (select with ``pde=<name>``)."""

from sdze_lightning.problems.allen_cahn1d import AllenCahn1D
from sdze_lightning.problems.ball import BallProblem
from sdze_lightning.problems.biharmonic import BiharmonicAnnulus
from sdze_lightning.problems.burgers1d import Burgers1D
from sdze_lightning.problems.hard_cube import HardCube
from sdze_lightning.problems.hjb_lqg import HJBLQG
from sdze_lightning.problems.interval import IntervalProblem
from sdze_lightning.problems.kdv1d import KdV1D
from sdze_lightning.problems.poisson2d import Poisson2D
from sdze_lightning.problems.threebody import ThreeBody
from sdze_lightning.problems.twobody import TwoBody

__all__ = [
    "AllenCahn1D",
    "BallProblem",
    "BiharmonicAnnulus",
    "Burgers1D",
    "HJBLQG",
    "HardCube",
    "IntervalProblem",
    "KdV1D",
    "Poisson2D",
    "ThreeBody",
    "TwoBody",
]
