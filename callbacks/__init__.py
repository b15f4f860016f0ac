"""Lightning callbacks: memory, estimator variance, solution plots, progress bar, run summary."""

from sdze_lightning.callbacks.elapsed import ElapsedTime
from sdze_lightning.callbacks.interrupt import GracefulInterrupt
from sdze_lightning.callbacks.memory import MemoryMonitor
from sdze_lightning.callbacks.plots import SolutionPlot
from sdze_lightning.callbacks.progress import PINNProgressBar
from sdze_lightning.callbacks.summary import RunSummary
from sdze_lightning.callbacks.variance import EstimatorVarianceMonitor

__all__ = [
    "ElapsedTime",
    "EstimatorVarianceMonitor",
    "GracefulInterrupt",
    "MemoryMonitor",
    "PINNProgressBar",
    "RunSummary",
    "SolutionPlot",
]
