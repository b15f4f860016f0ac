"""A new PDE in a few lines: the heat equation ``u_t = Delta u`` on ``[0, 1]^d x [0, 1]``.

The exact solution ``u = exp(-t) mean_i sin(x_i)`` gives the initial and side
values (a soft boundary loss) and the error metric. Run it either way:

    python examples/custom_pde.py                                        # plain Lightning
    PYTHONPATH=examples sdze-train --config-dir examples pde=custom_pde  # Hydra CLI
"""

import lightning as L
import torch
from torch import Tensor

from sdze_lightning import Derivatives, PINNProblem


class HeatCube(PINNProblem):
    """``u_t = Delta u`` on ``[0, 1]^d x [0, 1]``; inputs are ``(x, t)``, time last."""

    operators = ("u", "laplacian", "dt")  # what residual() reads from d
    time_dependent = True  # one extra input column: time

    def sample_interior(self, n: int, generator: torch.Generator) -> Tensor:
        return self.rand(n, self.dim + 1, generator=generator)

    def sample_boundary(self, n: int, generator: torch.Generator) -> Tensor:
        x = self.rand(n, self.dim + 1, generator=generator)
        face = torch.randint(0, self.dim + 1, (n,), generator=generator, device=self.device)
        rows = torch.arange(n, device=self.device)
        # face == dim: the initial time t = 0; otherwise the side x_face = 0 or 1.
        x[rows, face] = torch.where(face == self.dim, 0.0, x[rows, face].round())
        return x

    def residual(self, x: Tensor, d: Derivatives) -> Tensor:
        return d.dt - d.laplacian

    def exact_solution(self, x: Tensor) -> Tensor:
        return torch.exp(-x[:, -1]) * torch.sin(x[:, :-1]).mean(dim=1)


if __name__ == "__main__":
    problem = HeatCube(dim=5, n_interior=256, n_boundary=128)
    L.Trainer(max_steps=1000, logger=False, enable_checkpointing=False).fit(problem)
    print(f"relative L2 error: {problem.relative_l2_error():.2e}")
