"""Packaging: a checkout imports as-is, and matplotlib is imported only to draw a plot.

The subprocesses run with the repository root as their working directory, where the
checkout's ``sdze_lightning/`` comes first on ``sys.path`` (it shadows an installed copy).
This environment's *editable* install would map ``sdze_lightning.callbacks`` and
``sdze_lightning.configs`` onto the top-level folders through setuptools' import hooks
and make the first test pass by accident: the script removes those hooks first, as a
normal (non-editable) install has none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Drops setuptools' editable-install finders (their module is ``__editable___<name>_finder``).
NO_EDITABLE_HOOKS = textwrap.dedent("""
    import sys
    def _editable(hook):
        return (getattr(hook, "__module__", None) or "").startswith("__editable__")
    sys.meta_path[:] = [f for f in sys.meta_path if not _editable(f)]
    sys.path_hooks[:] = [h for h in sys.path_hooks if not _editable(h)]
    sys.path_importer_cache.clear()
""")


def run_python(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-c", NO_EDITABLE_HOOKS + textwrap.dedent(script),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_checkout_imports_without_an_install(tmp_path):
    out = run_python(f"""
        import json, sys
        from pathlib import Path
        import sdze_lightning
        import sdze_lightning.callbacks
        import sdze_lightning.configs
        from sdze_lightning.builders import compose_config
        from sdze_lightning.config_options import option_names
        cfg = compose_config(["pde=poisson2d", "trainer.max_steps=7"], {str(tmp_path)!r})
        print(json.dumps({{
            "package": sdze_lightning.__file__,
            "callbacks": sdze_lightning.callbacks.__file__,
            "configs": sdze_lightning.configs.__file__,
            "plot": sdze_lightning.callbacks.SolutionPlot.__module__,
            "max_steps": cfg.trainer.max_steps,
            "pde": cfg.pde._target_,
            "methods": sorted(option_names("method")),
        }}))
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(found["package"]) == ROOT / "sdze_lightning" / "__init__.py"  # the checkout's
    assert Path(found["callbacks"]) == ROOT / "callbacks" / "__init__.py"
    assert Path(found["configs"]) == ROOT / "configs" / "__init__.py"
    assert found["plot"] == "sdze_lightning.callbacks.plots"
    assert found["max_steps"] == 7 and found["pde"] == "sdze_lightning.problems.Poisson2D"
    assert "sdze" in found["methods"]


def test_checkout_cli_reads_the_packaged_config():
    """``sdze-train --cfg job`` from the checkout: Hydra's ``pkg://sdze_lightning.configs``."""
    out = run_python("""
        import sys
        from sdze_lightning.cli import main
        sys.argv = ["sdze-train", "--cfg", "job", "pde=poisson2d", "trainer.max_steps=7"]
        main()
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "max_steps: 7" in out.stdout
    assert "_target_: sdze_lightning.problems.Poisson2D" in out.stdout


def test_matplotlib_is_needed_only_to_plot():
    """The package, its callbacks and the CLI import without matplotlib; a plot needs it.

    ``"matplotlib" not in sys.modules`` cannot be the check: with matplotlib installed,
    torchmetrics (imported by Lightning) imports ``matplotlib.pyplot`` itself. The script
    hides matplotlib instead (its import fails and its metadata is gone, so torchmetrics
    skips it), as in an environment without it.
    """
    out = run_python("""
        import importlib.metadata as md
        import sys
        sys.modules["matplotlib"] = None  # `import matplotlib` fails; find_spec: absent
        def hidden(real):
            def get(name):
                if name.lower() == "matplotlib":
                    raise md.PackageNotFoundError(name)
                return real(name)
            return get
        md.version, md.distribution = hidden(md.version), hidden(md.distribution)

        import sdze_lightning, sdze_lightning.callbacks
        from sdze_lightning.cli import main
        from sdze_lightning.callbacks import SolutionPlot
        loaded = sorted(m for m in sys.modules if m.startswith("matplotlib."))
        print("loaded:", loaded)
        try:
            SolutionPlot().figure(None, 0)
        except ImportError as err:
            print("plot needs matplotlib:", type(err).__name__)
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loaded: []" in out.stdout
    assert "plot needs matplotlib: ModuleNotFoundError" in out.stdout
