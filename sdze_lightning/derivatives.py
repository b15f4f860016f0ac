"""The derivative accessor a residual is written against."""

from __future__ import annotations

from torch import Tensor

from sdze_lightning.estimators.base import OPERATORS


class Derivatives:
    """Operators of ``u`` at the collocation points, from the configured estimator.

    A residual reads ``d.u``, ``d.grad``, ``d.grad_norm2``, ``d.laplacian``,
    ``d.dt``, ``d.third`` and ``d.biharmonic`` (see
    :data:`~sdze_lightning.estimators.OPERATORS`), plus the points ``d.x``,
    their spatial part ``d.space`` and time ``d.t``. Only the operators the
    problem declares in ``PINNProblem.operators`` are computed.
    """

    def __init__(self, x: Tensor, values: dict[str, Tensor], spatial_dim: int) -> None:
        self.x = x
        self._values = values
        self.spatial_dim = spatial_dim

    def _get(self, name: str) -> Tensor:
        try:
            return self._values[name]
        except KeyError:
            raise KeyError(
                f"The residual uses operator {name!r} ({OPERATORS[name]}) but the problem "
                f"does not declare it: add it to `operators` (declared: {sorted(self._values)})."
            ) from None

    @property
    def space(self) -> Tensor:
        """Spatial coordinates of the points, ``(N, d)``."""
        return self.x[:, : self.spatial_dim]

    @property
    def t(self) -> Tensor:
        """Time coordinate of the points, ``(N,)`` (time-dependent problems)."""
        if self.x.shape[1] == self.spatial_dim:
            raise AttributeError("This problem has no time coordinate (time_dependent=False).")
        return self.x[:, -1]

    @property
    def u(self) -> Tensor:
        """Value ``u(x)``, ``(N,)``."""
        return self._get("u")

    @property
    def grad(self) -> Tensor:
        """Spatial gradient, ``(N, d)``."""
        return self._get("grad")

    @property
    def grad_norm2(self) -> Tensor:
        """``|grad_x u|^2``, ``(N,)``."""
        return self._get("grad_norm2")

    @property
    def laplacian(self) -> Tensor:
        """``Delta_x u``, ``(N,)``."""
        return self._get("laplacian")

    @property
    def dt(self) -> Tensor:
        """``du/dt``, ``(N,)``."""
        return self._get("dt")

    @property
    def third(self) -> Tensor:
        """``sum_i d^3u/dx_i^3``, ``(N,)`` (``u_xxx`` in one dimension)."""
        return self._get("third")

    @property
    def biharmonic(self) -> Tensor:
        """``Delta_x^2 u``, ``(N,)``."""
        return self._get("biharmonic")
