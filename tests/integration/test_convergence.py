"""End to end: SDZE with Taylor-mode derivatives solves Poisson 2D, through the CLI.

The README's main job (``sdze-train method=sdze estimator=taylor trainer.max_steps=2000``:
Poisson 2D of He et al., MLP 4x128, SDZE rank 4 with Adam in the subspace, forward-only
Taylor jets), the only convergence test of SDZE on a PDE. Slow (2000 steps, about 2.5 min
with one thread on the 2-core CPU shared with other jobs): ``pytest -m slow
tests/integration/test_convergence.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sdze_lightning.cli import run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

README = Path(__file__).resolve().parents[2] / "README.md"
STEPS = 2000
#: rel_l2 after 2000 steps measured for seeds 0, 1, 2 (2-core CPU, torch 2.13 CPU wheel,
#: 2026-12-07, benchmarks/results/main_job_ab_output_fit.json): 0.0667, 0.0666, 0.0727 with
#: the output fit (output_fit=constant, the default), 0.0585, 0.0629, 0.0685 without; earlier
#: runs of the same seeds with other rounding: 0.0399, 0.0872, 0.0807. Over the nine, mean
#: 0.067, standard deviation 0.013; mean + 3 standard deviations is 0.108, and the bound
#: keeps the 0.15 set from the larger spread of the first six: rounding and the start's
#: offset change the trajectory about as much as another seed does. An untrained network is
#: at ~1; a method that stalls or diverges stays far above the bound.
MAX_REL_L2 = 0.15


def test_sdze_taylor_solves_poisson2d_in_2000_steps(tmp_path):
    line = next(ln for ln in README.read_text().splitlines()
                if ln.startswith("python3 -m venv") and "sdze-train" in ln)
    readme_job = line.split("sdze-train", 1)[1].split()
    assert readme_job == ["method=sdze", "estimator=taylor", f"trainer.max_steps={STEPS}"]
    summary = run(["pde=poisson2d", *readme_job, "seed=0", "logger=none", "callbacks=none"],
                  tmp_path)
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert summary["rel_l2"] < MAX_REL_L2, summary
