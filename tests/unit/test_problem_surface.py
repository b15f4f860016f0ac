"""``PINNProblem``'s public surface is the list in its docstring, and nothing else.

Library machinery lives in collaborator objects, not in the user's namespace: a new
public name on the problem (a bound function, a state field) fails here until the
docstring lists it.
"""

from __future__ import annotations

import re

import lightning as L

from sdze_lightning.problem import PINNProblem


class Minimal(PINNProblem):
    """A problem that adds nothing public: its user contract only."""

    def sample_interior(self, n, generator):
        return self.rand(n, self.dim, generator=generator)

    def residual(self, x, d):
        return d.laplacian


def documented_surface() -> set[str]:
    """The ``name`` entries of the docstring's "Public surface" list."""
    doc = PINNProblem.__doc__ or ""
    section = doc[doc.index("Public surface"):]
    return set(re.findall(r"``([a-z_][a-z0-9_]*)``", section))


def public_names(obj: object, base: object) -> set[str]:
    return {n for n in set(dir(obj)) - set(dir(base)) if not n.startswith("_")}


def test_the_docstring_lists_every_public_name_of_a_problem():
    problem = Minimal(dim=2, n_interior=4, n_eval=4)
    assert public_names(problem, L.LightningModule()) == documented_surface()


def test_no_library_function_is_bound_onto_the_class():
    """Every public callable of the class is defined in problem.py (a short method that
    delegates), not a module-level function of another module bound as a method."""
    for name in public_names(PINNProblem, L.LightningModule):
        attr = getattr(PINNProblem, name)
        func = getattr(attr, "fget", None) or getattr(attr, "__func__", None) or attr
        if callable(func) and hasattr(func, "__module__"):
            assert func.__module__ == "sdze_lightning.problem", (name, func.__module__)


def test_the_collaborators_do_not_import_the_problem_module():
    """problem.py imports its collaborators; none of them imports it (no import circle)."""
    import ast
    from pathlib import Path

    import sdze_lightning

    root = Path(sdze_lightning.__file__).parent
    for name in ("collocation", "loss", "stepping", "evaluation", "resume", "output_fit",
                 "input_checks", "contract", "distributed", "divergence"):
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module}
        assert "sdze_lightning.problem" not in imported, name
