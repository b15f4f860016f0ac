"""A checkout imported as-is finds its top-level ``callbacks/`` and ``configs/`` (no install).

pyproject's ``package-dir`` maps the two folders into the package (``sdze_lightning.callbacks``,
``sdze_lightning.configs``) only when it is installed. Run from the repository root, the
checkout's ``sdze_lightning/`` shadows an installed copy and lacks both: this module (imported
first by the package) then adds :class:`CheckoutFinder`, which loads exactly those two
sub-packages from the checkout's folders. An installed package has them and adds nothing.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

#: The top-level folders that pyproject maps into the package.
SUBPACKAGES = ("callbacks", "configs")
PACKAGE = __name__.rpartition(".")[0]


class CheckoutFinder:
    """Import finder of ``sdze_lightning.callbacks`` / ``.configs`` from a checkout's root.

    Args:
        root: The repository root (holding ``pyproject.toml``, ``callbacks/``, ``configs/``).

    """

    def __init__(self, root: str) -> None:
        self.root = root

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        """The spec of one of the two sub-packages; ``None`` for any other module."""
        parent, _, name = fullname.rpartition(".")
        if parent != PACKAGE or name not in SUBPACKAGES:
            return None
        folder = os.path.join(self.root, name)
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
        )


def install() -> None:
    """Add a :class:`CheckoutFinder` if the package is a checkout lacking the sub-packages."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(package_dir)
    checkout = all(
        os.path.exists(os.path.join(root, name)) for name in (*SUBPACKAGES, "pyproject.toml")
    )
    if os.path.isdir(os.path.join(package_dir, "configs")) or not checkout:
        return
    if not any(type(f).__name__ == CheckoutFinder.__name__ for f in sys.meta_path):
        sys.meta_path.append(CheckoutFinder(root))  # after the path finder: last resort


install()
