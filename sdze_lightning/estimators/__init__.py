"""Spatial derivative estimators behind one interface, by name from `configs/estimator/`."""

from sdze_lightning.estimators.base import OPERATORS, Estimator
from sdze_lightning.estimators.registry import ESTIMATORS, build_estimator, estimator_class

__all__ = ["ESTIMATORS", "OPERATORS", "Estimator", "build_estimator", "estimator_class"]
