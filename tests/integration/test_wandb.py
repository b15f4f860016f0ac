"""``logger=wandb`` as a W&B user expects it: run identity, summary, resume.

Offline (``WANDB_MODE=offline``): what W&B recorded is read back from each offline run's
transaction log (``<run dir>/wandb/offline-run-*/run-<id>.wandb``; wandb 0.31 writes no
``files/wandb-summary.json`` or ``config.yaml`` offline). Four W&B runs in all: a
two-seed multirun (``sdze-train -m``, a subprocess) and a run resumed once (in-process).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sdze_lightning.builders import compose_config
from sdze_lightning.cli import run
from sdze_lightning.loggers import (
    WANDB_RUN_RECORD,
    read_wandb_run,
    record_wandb_run,
    update_wandb_summary,
    wandb_run_options,
)

pytest.importorskip("wandb")
pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

SMALL = [
    "trainer.max_steps=8",
    "trainer.log_every_n_steps=4",
    "model.width=8",
    "model.depth=1",
    "pde.n_interior=32",
    "pde.n_boundary=8",
    "pde.n_eval=64",
    "logger=wandb",
]
TAGS = ["pde:poisson2d", "method:adam", "estimator:exact"]


# ------------------------------------------------------------------ the offline record
def _log_records(path: Path) -> list[bytes]:
    """The records of a W&B transaction log (LevelDB log format, 32 KiB blocks)."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    records, pos, partial = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        if kind == 1:  # full
            records.append(chunk)
        elif kind == 2:  # first
            partial = chunk
        elif kind == 3:  # middle
            partial += chunk
        elif kind == 4:  # last
            records.append(partial + chunk)
    return records


def _parsed(log_file: Path, timeout_s: float = 60.0) -> list[Any]:
    """The log's records, once W&B's service has written its last (``exit``) one.

    ``wandb.finish()`` can return before the service process has flushed the file.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        records = []
        for data in _log_records(log_file):
            record = pb.Record()
            record.ParseFromString(data)
            records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{log_file} has no exit record"
        time.sleep(0.2)


def wandb_record(run_folder: Path) -> dict[str, Any]:
    """What W&B recorded for one offline run: its run record and final summary."""
    (log_file,) = run_folder.glob("run-*.wandb")
    run_record, summary = None, {}
    for record in _parsed(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_record = record.run
        elif kind == "summary":
            for item in record.summary.update:
                keys = list(item.nested_key) or [item.key]
                node = summary
                for key in keys[:-1]:
                    node = node.setdefault(key, {})
                node[keys[-1]] = json.loads(item.value_json)
    assert run_record is not None, log_file
    return {
        "id": run_record.run_id,
        "name": run_record.display_name,
        "group": run_record.run_group,
        "tags": list(run_record.tags),
        "job_type": run_record.job_type,
        "resume": run_record.resume,
        "summary": summary,
    }


def offline_runs(run_dir: Path) -> list[Path]:
    """The run directory's offline W&B runs, oldest first."""
    return sorted((run_dir / "wandb").glob("offline-run-*"), key=lambda p: p.name)


# ------------------------------------------------------------------ fixtures: 4 W&B runs
@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """``sdze-train -m seed=0,1 logger=wandb ...``: the sweep directory."""
    root = tmp_path_factory.mktemp("wandb_sweep")
    sweep = root / "sweep"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "sdze_lightning.cli", "-m", "seed=0,1", *SMALL,
         "callbacks=none", f"hydra.sweep.dir={sweep}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return sweep


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> Path:
    """A run of 4 steps (group and tags given) resumed to 8 with ``ckpt_path=last``."""
    run_dir = tmp_path_factory.mktemp("wandb_resume") / "run"
    common = [*SMALL, "callbacks.checkpoint.every_n_train_steps=4", "~callbacks.progress",
              "~callbacks.memory"]
    first = run([*common, "trainer.max_steps=4", "logger.group=mine", "logger.tags=[a,b]"],
                run_dir)
    second = run([*common, "ckpt_path=last"], run_dir)
    assert (first["steps"], second["steps"]) == (4, 8)
    return run_dir


# ------------------------------------------------------------------ tests
def test_sweep_runs_share_the_group_and_carry_the_seed_in_their_names(sweep):
    recorded = {}
    for seed in (0, 1):
        (folder,) = offline_runs(sweep / str(seed))
        recorded[seed] = wandb_record(folder)
    assert [r["name"] for r in recorded.values()] == [
        "poisson2d-adam-exact-s0", "poisson2d-adam-exact-s1"]
    for seed, got in recorded.items():
        assert got["group"] == str(sweep)
        assert got["tags"] == TAGS
        assert got["job_type"] == "train"
        assert not got["resume"]  # a new run requests no resume
        # the id is stored in the run directory for a later resume
        assert read_wandb_run(sweep / str(seed))["id"] == got["id"]


def test_every_summary_field_reaches_the_wandb_summary(sweep):
    for seed in (0, 1):
        summary = json.loads((sweep / str(seed) / "summary.json").read_text())
        (folder,) = offline_runs(sweep / str(seed))
        in_wandb = wandb_record(folder)["summary"]
        assert summary["rel_l2"] > 0 and in_wandb["rel_l2"] == summary["rel_l2"]
        assert {k: in_wandb.get(k) for k in summary} == summary


def test_resume_continues_the_same_wandb_run(resumed):
    first, second = (wandb_record(f) for f in offline_runs(resumed))
    stored = json.loads((resumed / WANDB_RUN_RECORD).read_text())
    assert first["id"] == second["id"] == stored["id"]
    assert not first["resume"] and second["resume"]
    # logger.group / logger.tags given to the first segment win, in both; the name carries
    # the seed
    for got in (first, second):
        assert (got["name"], got["group"], got["tags"], got["job_type"]) == (
            "poisson2d-adam-exact-s0", "mine", ["a", "b"], "train")
    summary = json.loads((resumed / "summary.json").read_text())
    assert second["summary"]["steps"] == summary["steps"] == 8
    assert second["summary"]["segments"] == summary["segments"]


def test_explicit_names_win_and_an_unrecorded_run_starts_anew(tmp_path):
    cfg = compose_config(["logger=wandb", "logger.name=mine", "experiment=poisson2d_he"], tmp_path)
    options = wandb_run_options(cfg, None, tmp_path, resuming=False)
    assert options["name"] == "mine" and options["group"] == "poisson2d_he"
    assert "experiment:poisson2d_he" in options["tags"]
    cfg = compose_config(["logger=wandb", "name=base", "seed=3"], tmp_path)
    assert wandb_run_options(cfg, None, tmp_path, resuming=False)["name"] == "base-s3"
    # a resume of a run without a stored id (an older run, or logged to csv): a new W&B
    # run, whose id is then stored; a stored record is never overwritten
    first = wandb_run_options(cfg, None, tmp_path, resuming=True)
    assert first["resume"] is None and len(first["id"]) == 8

    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(offline=True, save_dir=str(tmp_path), **{**first, "group": "sweep"})
    assert record_wandb_run(logger, tmp_path) == tmp_path / WANDB_RUN_RECORD
    # a resume (in a single run: no sweep) keeps the stored id and group
    again = wandb_run_options(cfg, None, tmp_path, resuming=True)
    assert (again["id"], again["resume"], again["group"]) == (first["id"], "allow", "sweep")
    assert wandb_run_options(cfg, None, tmp_path, resuming=False)["id"] != first["id"]
    other = WandbLogger(offline=True, save_dir=str(tmp_path), id="another1")
    assert record_wandb_run(other, tmp_path) is None
    assert read_wandb_run(tmp_path)["id"] == first["id"]


def test_a_failing_wandb_summary_is_recorded_not_raised(tmp_path, caplog):
    from lightning.pytorch.loggers import WandbLogger

    class Broken(WandbLogger):
        @property
        def experiment(self):
            raise RuntimeError("W&B is gone")

    logger = Broken(offline=True, save_dir=str(tmp_path))
    assert update_wandb_summary(logger, {"rel_l2": 0.1}) is False
    assert logger._sdze_failures == ["Broken.update_wandb_summary: W&B is gone"]
