"""``sdze_lightning._checkout``: a checkout finds its top-level ``callbacks/`` and ``configs/``.

Checked in this process, without touching the real package's import state: what
:class:`CheckoutFinder` answers (the two sub-packages only), that imports through it load
the checkout's folders (sub-modules and ``importlib.resources`` included, as Hydra's
``pkg://`` reads them), and when :func:`install` adds it (a checkout lacking the folders,
once) or not (an installed package, a folder that is not a checkout). ``sys.meta_path``
is replaced by a copy in each test. ``tests/docs/test_packaging.py`` runs the real
checkout in a subprocess.
"""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import sys
from importlib.machinery import PathFinder
from pathlib import Path

import pytest

from sdze_lightning import _checkout
from sdze_lightning._checkout import SUBPACKAGES, CheckoutFinder, install

FAKE = "sdze_fake_checkout_pkg"


def finders() -> list[CheckoutFinder]:
    return [f for f in sys.meta_path if type(f).__name__ == "CheckoutFinder"]


@pytest.fixture
def meta_path(monkeypatch):
    """A copy of ``sys.meta_path`` without any CheckoutFinder (restored afterwards)."""
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path
                                           if type(f).__name__ != "CheckoutFinder"])
    return sys.meta_path


def make_checkout(root: Path, *, pyproject=True, installed=False) -> Path:
    """A repository layout under ``root``; returns where its ``_checkout.py`` would be."""
    for name in SUBPACKAGES:
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(f"WHERE = {name!r}\n")
    (root / "configs" / "extra.py").write_text("VALUE = 3\n")
    (root / "configs" / "config.yaml").write_text("x: 1\n")
    if pyproject:
        (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    package = root / "sdze_lightning"
    package.mkdir()
    if installed:
        (package / "configs").mkdir()
    return package / "_checkout.py"


def test_the_finder_answers_for_the_two_sub_packages_only(tmp_path):
    make_checkout(tmp_path)
    finder = CheckoutFinder(str(tmp_path))
    assert SUBPACKAGES == ("callbacks", "configs")
    for name in ("sdze_lightning.nn", "callbacks", "configs", "other.configs",
                 "sdze_lightning.configs.extra", "sdze_lightning.callbacks.plots",
                 "sdze_lightning.callbacks_x"):
        assert finder.find_spec(name, None) is None, name
    for name in SUBPACKAGES:
        spec = finder.find_spec(f"sdze_lightning.{name}", None)
        assert spec.name == f"sdze_lightning.{name}"
        assert Path(spec.origin) == tmp_path / name / "__init__.py"
        assert spec.submodule_search_locations == [str(tmp_path / name)]
        module = importlib.util.module_from_spec(spec)  # not put in sys.modules
        spec.loader.exec_module(module)
        assert module.WHERE == name


def test_imports_through_the_finder_load_the_checkouts_folders(tmp_path, monkeypatch,
                                                                 meta_path):
    make_checkout(tmp_path)
    (tmp_path / "site" / FAKE).mkdir(parents=True)
    (tmp_path / "site" / FAKE / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(_checkout, "PACKAGE", FAKE)
    meta_path.append(CheckoutFinder(str(tmp_path)))
    try:
        configs = importlib.import_module(f"{FAKE}.configs")
        assert Path(configs.__file__) == tmp_path / "configs" / "__init__.py"
        assert importlib.import_module(f"{FAKE}.configs.extra").VALUE == 3
        assert importlib.import_module(f"{FAKE}.callbacks").WHERE == "callbacks"
        resource = importlib.resources.files(f"{FAKE}.configs") / "config.yaml"
        assert resource.read_text() == "x: 1\n"
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"{FAKE}.other")
    finally:
        for name in [m for m in sys.modules if m == FAKE or m.startswith(FAKE + ".")]:
            del sys.modules[name]


def test_install_adds_one_finder_to_a_checkout_lacking_the_folders(tmp_path, monkeypatch,
                                                                    meta_path):
    monkeypatch.setattr(_checkout, "__file__", str(make_checkout(tmp_path)))
    before = list(meta_path)
    install()
    assert meta_path[:-1] == before  # appended: after the path finder, a last resort
    (finder,) = finders()
    assert meta_path[-1] is finder and finder.root == str(tmp_path)
    install()
    assert finders() == [finder]  # once


@pytest.mark.parametrize("layout", [{"installed": True}, {"pyproject": False}])
def test_install_adds_nothing_elsewhere(tmp_path, monkeypatch, meta_path, layout):
    """An installed package (its own ``configs/``), or a folder that is not a checkout."""
    monkeypatch.setattr(_checkout, "__file__", str(make_checkout(tmp_path, **layout)))
    before = list(meta_path)
    install()
    assert meta_path == before


def test_install_adds_nothing_if_a_finder_of_another_copy_is_there(tmp_path, monkeypatch,
                                                                    meta_path):
    """A finder is recognised by its class name (the module may have been imported twice)."""
    monkeypatch.setattr(_checkout, "__file__", str(make_checkout(tmp_path)))
    other = type("CheckoutFinder", (), {"find_spec": lambda self, *a: None})()
    meta_path.append(other)
    before = list(meta_path)
    install()
    assert meta_path == before


def test_this_checkout_has_its_finder_after_the_path_finder():
    """The package imported here: a checkout lacking the folders has the finder, once."""
    package = Path(_checkout.__file__).parent
    root = package.parent
    if (package / "configs").is_dir() or not (root / "pyproject.toml").exists():
        pytest.skip("an installed package: no finder is needed")
    (finder,) = finders()
    assert finder.root == str(root)
    assert sys.meta_path.index(finder) > sys.meta_path.index(PathFinder)
    spec = finder.find_spec("sdze_lightning.configs", None)
    assert Path(spec.origin) == root / "configs" / "__init__.py"
