"""No hidden process-wide switches and no silently swallowed errors.

Importing the library leaves the warning filters alone; the fused kernels are a recorded
setting of the problem, not an environment variable; errors that the library cannot
raise where they happen are logged, not dropped.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from sdze_lightning.callbacks import RunSummary
from torch import nn

from sdze_lightning.prefetch import BatchPrefetcher

IMPORT_ALL = """
import importlib, pkgutil, sys, warnings
calls = []
def spy(original):
    def wrapped(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("sdze_lightning"):
            calls.append((caller, args[:2]))
        return original(*args, **kwargs)
    return wrapped
warnings.filterwarnings = spy(warnings.filterwarnings)
warnings.simplefilter = spy(warnings.simplefilter)
import sdze_lightning
names = [m.name for m in pkgutil.walk_packages(sdze_lightning.__path__, "sdze_lightning.")]
for name in names:
    importlib.import_module(name)
print(len(names), repr(calls))
"""


def test_importing_any_library_module_changes_no_warning_filter(tmp_path):
    """Third-party packages may add filters when imported; this library's modules add none."""
    # cwd: not the repository root, whose source tree lacks the installed sub-packages
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True,
                         timeout=300, check=True, cwd=tmp_path)
    count, calls = out.stdout.split(" ", 1)
    assert int(count) > 20  # every module was imported (cli, problem, callbacks, ...)
    assert calls.strip() == "[]"


def test_the_cli_quiets_lightnings_worker_advice_only_while_it_trains(
    tmp_path, monkeypatch, recwarn, tiny_problem, make_trainer
):
    """Lightning advises loader workers on machines with more than 2 cores per device (the
    loader yields dummy step numbers, so the advice does not apply); the CLI silences it
    for its own run and restores the caller's filters."""
    from lightning.pytorch.trainer.connectors import data_connector

    from sdze_lightning.cli import run

    monkeypatch.setattr(data_connector, "suggested_max_num_workers", lambda devices: 8)
    before = list(warnings.filters)
    run(["trainer.max_steps=2", "model.width=8", "model.depth=1", "pde.n_eval=16",
         "logger=none", "callbacks=none"], tmp_path)
    assert warnings.filters == before
    assert not [w for w in recwarn if "many workers" in str(w.message)]
    # outside the CLI, Lightning's advice reaches a plain Trainer.fit user as Lightning sends it
    with pytest.warns(UserWarning, match="many workers"):
        make_trainer(max_steps=1).fit(tiny_problem())


def test_fused_kernels_setting_is_in_the_summary(tiny_problem, make_trainer, tmp_path):
    for fused in (True, False):
        summary = RunSummary(dirpath=tmp_path / str(fused), echo=False)
        make_trainer(max_steps=1, callbacks=[summary]).fit(tiny_problem(fused_kernels=fused))
        data = json.loads((tmp_path / str(fused) / "summary.json").read_text())
        assert data["fused_kernels"]["enabled"] is fused
        assert isinstance(data["fused_kernels"]["ran"], list)


def test_the_config_field_reaches_the_problem(tmp_path):
    from sdze_lightning.cli import build_problem, compose_config

    small = ["model.width=8", "model.depth=1"]
    assert build_problem(compose_config(small, tmp_path)).fused_kernels is True
    off = build_problem(compose_config([*small, "fused_kernels=false"], tmp_path))
    assert off.fused_kernels is False


def test_a_failed_batch_that_nobody_uses_is_logged(caplog):
    started = threading.Event()

    def make(step: int) -> torch.Tensor:
        if step == 1:
            started.set()
            raise RuntimeError("sampler broke at step 1")
        return torch.zeros(1)

    pf = BatchPrefetcher(make)
    pf.get(0)  # step 1 starts on the thread and fails there
    started.wait(timeout=60)
    with caplog.at_level(logging.WARNING, logger="sdze_lightning.prefetch"):
        pf.close()  # nobody asks for step 1: its error is logged, not raised
    messages = [r.getMessage() for r in caplog.records]
    assert any("step 1" in m and "sampler broke at step 1" in m for m in messages), messages


class _Uncopyable(nn.Linear):
    def __deepcopy__(self, memo):
        raise TypeError("holds a file handle")


def test_a_network_that_cannot_be_copied_for_the_early_method_check_is_reported(
    tiny_problem, caplog
):
    problem = tiny_problem(net=nn.Sequential(_Uncopyable(1, 4), nn.Tanh(), nn.Linear(4, 1)))
    with caplog.at_level(logging.WARNING, logger="sdze_lightning.problem"):
        problem.check_inputs()
    assert any("holds a file handle" in r.getMessage() for r in caplog.records)
