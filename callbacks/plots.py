"""``SolutionPlot``: prediction, exact solution and error on a 2D slice (or 1D profile).

Every ``every_n_steps`` steps (and when training ends) the callback evaluates
the model on a ``resolution x resolution`` grid spanning two input coordinates
(the first two spatial ones by default, ``x`` and ``t`` for a one-dimensional
time-dependent problem), with every other coordinate held at ``fixed_value``.
It draws the prediction, the exact (or reference) solution and the point-wise
absolute error, saves the figure as a PNG under ``<run dir>/plots/`` and, when
a :class:`~lightning.pytorch.loggers.WandbLogger` is attached, logs it as a W&B
image (a logger failure is reported once and does not stop training). A problem
with a single input coordinate gets a 1D profile instead.

The figure is drawn with matplotlib's object-oriented API on an Agg canvas:
no ``pyplot`` state and no change of the global backend. matplotlib is imported on the
first plot, not with this module (a run without plots never loads it).

Cost per plot: ``resolution**2`` evaluations of ``u`` and, on the first plot only,
as many of the exact solution (its values cached, since the grid stays fixed). The
grid's input vectors are built chunk by chunk from its two plotted coordinates and
dropped after use: at most ``max_chunk_elements`` input numbers exist at once (one
row where a single input vector is longer), whatever the input dimension. At a very
large input dimension every grid point is a full input vector, so a plot takes time
(not memory): lower ``resolution`` or raise ``every_n_steps`` there.

Interface: the module is called as ``pl_module(x) -> (N,)``; the grid bounds
come from ``bounds`` or, if not given, from the range of points drawn with
``pl_module.sample_interior(n, generator)``; ``exact_solution(x)`` is used when
the module has it and it returns a tensor.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from sdze_lightning.devices import device_of
from sdze_lightning.seeding import Stream, mix

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)



class SolutionPlot(L.Callback):
    """Plot prediction, exact solution and error; save PNGs, log to W&B.

    Args:
        every_n_steps: Plot after every ``every_n_steps``-th step (0: only at the end).
        resolution: Grid points per axis (points of the profile in 1D).
        coords: The two input coordinates spanning the slice; ``None`` picks
            ``(0, 1)``, or ``(0, t)`` for a 1D time-dependent problem.
        fixed_value: Value of every input coordinate not on the slice.
        bounds: ``[[lo, hi], [lo, hi]]`` of the two plotted coordinates (one pair
            in 1D); ``None`` infers them from sampled interior points.
        dirpath: Where PNGs go; defaults to ``<trainer.default_root_dir>/plots``.
        plot_on_train_end: Also plot when training ends.
        wandb_key: Key of the W&B image.
        max_chunk_elements: Largest number of input entries evaluated at once.
        dpi: Resolution of the saved PNG.

    """

    def __init__(
        self,
        every_n_steps: int = 500,
        resolution: int = 64,
        coords: Sequence[int] | None = None,
        fixed_value: float = 0.0,
        bounds: Sequence[Sequence[float]] | None = None,
        dirpath: str | Path | None = None,
        plot_on_train_end: bool = True,
        wandb_key: str = "plots/solution",
        max_chunk_elements: int = 1 << 22,
        dpi: int = 100,
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be non-negative, got {every_n_steps}.")
        if resolution < 2:
            raise ValueError(f"resolution must be at least 2, got {resolution}.")
        if coords is not None and (len(coords) != 2 or coords[0] == coords[1]):
            raise ValueError(f"coords must be two different coordinates, got {coords}.")
        self.every_n_steps = every_n_steps
        self.resolution = resolution
        self.coords = tuple(coords) if coords is not None else None
        self.fixed_value = fixed_value
        self.bounds = [tuple(map(float, b)) for b in bounds] if bounds is not None else None
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.plot_on_train_end = plot_on_train_end
        self.wandb_key = wandb_key
        self.max_chunk_elements = max_chunk_elements
        self.dpi = dpi
        #: PNG files written so far.
        self.paths: list[Path] = []
        self._grid: tuple[Any, ...] | None = None  # (axes, labels, bounds, plane, exact)
        self._last_step: int | None = None
        self._wandb_failed = False

    # ---------------------------------------------------------------- lightning
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Plot on every ``every_n_steps``-th step."""
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            self.plot(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Plot the final state (unless that step was just plotted)."""
        if self.plot_on_train_end and self._last_step != trainer.global_step:
            self.plot(trainer, pl_module)

    # ------------------------------------------------------------------ plotting
    def plot(self, trainer: L.Trainer, pl_module: nn.Module) -> Path | None:
        """Draw, save and log the figure of the current state; return the PNG path."""
        step = trainer.global_step
        self._last_step = step
        if not trainer.is_global_zero:
            return None
        dirpath = self.dirpath or Path(trainer.default_root_dir) / "plots"
        was_training = pl_module.training
        pl_module.eval()
        try:
            fig = self.figure(pl_module, step)
        finally:
            pl_module.train(was_training)
        dirpath.mkdir(parents=True, exist_ok=True)
        path = dirpath / f"solution_step{step:07d}.png"
        fig.savefig(path, dpi=self.dpi)
        self.paths.append(path)
        self._log_wandb(trainer, path, step)
        return path

    def _log_wandb(self, trainer: L.Trainer, path: Path, step: int) -> None:
        if self._wandb_failed:
            return
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            return
        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            try:
                logger.log_image(key=self.wandb_key, images=[str(path)], step=step)
            except Exception as err:  # a logger failure must not stop training
                self._wandb_failed = True
                log.warning(
                    "SolutionPlot: logging the image to W&B failed (%s); PNGs are "
                    "still written to %s.",
                    err,
                    path.parent,
                )

    def _axes(self, pl_module: nn.Module, input_dim: int) -> tuple[tuple[int, ...], list[str]]:
        dim = int(getattr(pl_module, "dim", input_dim))
        time_dependent = bool(getattr(pl_module, "time_dependent", False))
        if self.coords is not None:
            axes = self.coords
        elif input_dim == 1:
            axes = (0,)
        elif dim >= 2:
            axes = (0, 1)
        else:
            axes = (0, input_dim - 1)
        for a in axes:
            if not 0 <= a < input_dim:
                raise ValueError(f"SolutionPlot: coordinate {a} is outside 0..{input_dim - 1}.")
        labels = ["t" if time_dependent and a == input_dim - 1 else f"x{a + 1}" for a in axes]
        return axes, labels

    def _infer_bounds(
        self, pl_module: nn.Module, axes: tuple[int, ...], input_dim: int
    ) -> list[tuple[float, float]]:
        sample = getattr(pl_module, "sample_interior", None)
        if not callable(sample):
            raise ValueError(
                "SolutionPlot needs `bounds` for a module without sample_interior(n, generator)."
            )
        n = max(8, min(1024, self.max_chunk_elements // max(input_dim, 1)))
        gen = torch.Generator(device=device_of(pl_module))
        gen.manual_seed(mix(Stream.PLOT_BOUNDS, input_dim))
        with torch.no_grad():
            pts = sample(n, gen)[:, list(axes)].double()
        lo, hi = pts.min(dim=0).values.tolist(), pts.max(dim=0).values.tolist()
        return [(a, b) if b > a else (a - 0.5, a + 0.5) for a, b in zip(lo, hi, strict=True)]

    def _evaluate(
        self, fn: Any, pl_module: nn.Module, plane: Tensor, axes: tuple[int, ...]
    ) -> Tensor | None:
        """``fn`` on the grid's input vectors, built and dropped chunk by chunk.

        ``plane`` holds the coordinates ``axes`` of every grid point (``(points, len(axes))``);
        every other input is ``fixed_value``.
        """
        input_dim = self._input_dim(pl_module)
        dtype = getattr(pl_module, "dtype", torch.float32)
        rows = max(1, self.max_chunk_elements // max(input_dim, 1))
        outs = []
        for i in range(0, plane.shape[0], rows):
            part = plane[i : i + rows]
            x = torch.full((part.shape[0], input_dim), float(self.fixed_value), dtype=dtype,
                           device=device_of(pl_module))
            x[:, list(axes)] = part.to(x)
            y = fn(x)
            del x
            if y is None:
                return None
            outs.append(y.detach().reshape(-1).double().cpu())
        return torch.cat(outs)

    @staticmethod
    def _input_dim(pl_module: nn.Module) -> int:
        return int(getattr(pl_module, "input_dim", 0) or _in_features(pl_module))

    def _setup_grid(self, pl_module: nn.Module) -> tuple[Any, ...]:
        input_dim = self._input_dim(pl_module)
        axes, labels = self._axes(pl_module, input_dim)
        bounds = self.bounds or self._infer_bounds(pl_module, axes, input_dim)
        if len(bounds) != len(axes):
            raise ValueError(f"SolutionPlot: bounds {bounds} do not match coordinates {axes}.")
        lines = [torch.linspace(lo, hi, self.resolution, dtype=torch.float64) for lo, hi in bounds]
        mesh = torch.meshgrid(*lines, indexing="xy") if len(axes) == 2 else (lines[0],)
        plane = torch.stack([m.reshape(-1) for m in mesh], dim=1)
        exact_fn = getattr(pl_module, "exact_solution", None)
        with torch.no_grad():
            exact = self._evaluate(exact_fn, pl_module, plane, axes) if callable(exact_fn) else None
        return axes, labels, bounds, plane, exact

    def figure(self, pl_module: nn.Module, step: int) -> Figure:
        """Return the figure of the current prediction (not saved)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # on first use: slow import
        from matplotlib.figure import Figure

        if self._grid is None:
            self._grid = self._setup_grid(pl_module)
        axes, labels, bounds, plane, exact = self._grid
        with torch.no_grad():
            pred = self._evaluate(pl_module, pl_module, plane, axes)
        panels = [("prediction", pred)]
        title = f"step {step}"
        if exact is not None:
            err = (pred - exact).abs()
            panels += [("exact", exact), ("|error|", err)]
            rel = float(err.norm() / exact.norm()) if float(exact.norm()) > 0 else math.nan
            title += f", relative L2 on this slice {rel:.3e}"
        fig = Figure(figsize=(4.2 * (len(panels) if len(axes) == 2 else 2), 3.6))
        FigureCanvasAgg(fig)
        if len(axes) == 2:
            extent = (*bounds[0], *bounds[1])
            shape = (self.resolution, self.resolution)
            for i, (name, values) in enumerate(panels):
                ax = fig.add_subplot(1, len(panels), i + 1)
                im = ax.imshow(
                    values.reshape(shape).numpy(),
                    origin="lower",
                    extent=extent,
                    aspect="auto",
                    cmap="magma" if name == "|error|" else "viridis",
                )
                fig.colorbar(im, ax=ax)
                ax.set_title(name)
                ax.set_xlabel(labels[0])
                ax.set_ylabel(labels[1])
        else:
            grid = np.linspace(*bounds[0], self.resolution)
            ax = fig.add_subplot(1, 2, 1)
            ax.plot(grid, pred.numpy(), label="prediction")
            if exact is not None:
                ax.plot(grid, exact.numpy(), "--", label="exact")
            ax.set_xlabel(labels[0])
            ax.legend()
            ax2 = fig.add_subplot(1, 2, 2)
            if exact is not None:
                ax2.semilogy(grid, (pred - exact).abs().numpy() + 1e-300)
            ax2.set_title("|error|")
            ax2.set_xlabel(labels[0])
        fig.suptitle(title)
        fig.tight_layout()
        return fig


def _in_features(module: nn.Module) -> int:
    net = getattr(module, "net", module)
    features = getattr(net, "in_features", None)
    if features is None:
        raise ValueError(
            "SolutionPlot cannot tell the input dimension: set `input_dim` on the module."
        )
    return int(features)
