"""Shipped benchmark PDEs, one module each."""

from sdze_lightning.problems.poisson2d import Poisson2D

__all__ = ["Poisson2D"]
