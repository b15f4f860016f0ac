"""StreamingCheckpointIO: atomic saves straight into the file, memory-mapped loads, exact
resumes through ``Trainer.fit`` and ``sdze-train``, no second copy of the parameters.

The killed save is this file run as a script: it SIGKILLs itself halfway through writing.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sdze_lightning import StreamingCheckpointIO
from sdze_lightning.builders import compose_config
from sdze_lightning.checkpoint_io import (
    PageByPageLoad,
    load_weights_page_by_page,
    streaming_checkpoints,
)
from sdze_lightning.cli import train
from sdze_lightning.estimators.taylor import TaylorEstimator
from sdze_lightning.nn import MLP
from sdze_lightning.problems import Poisson2D

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops: 1 thread is faster here

MAPS = Path("/proc/self/maps")
needs_proc = pytest.mark.skipif(not MAPS.exists(), reason="reads /proc/self (Linux)")
#: Bytes written before the failing and the killed save stop (of a 4 MiB checkpoint).
STOP_AFTER = 1 << 20


def checkpoint(value: float) -> dict:
    """A Lightning-shaped checkpoint: module weights, optimizer state, a callback's tensor."""
    return {
        "state_dict": {"net.weight": torch.full((1 << 20,), value)},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.full((8,), value)}},
                              "param_groups": [{"params": [0], "lr": 0.1}]}],
        "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(value)}},
        "global_step": int(value),
    }


def mapped(path: Path) -> bool:
    """Whether ``path`` is memory-mapped into this process."""
    return str(path.resolve()) in MAPS.read_text()


class StopsWriting:
    """A file that raises, or kills the process, once ``STOP_AFTER`` bytes are written."""

    def __init__(self, f, kill: bool) -> None:
        self.f, self.kill, self.written = f, kill, 0

    def write(self, data) -> int:
        n = self.f.write(data)
        self.written += n
        if self.written > STOP_AFTER:
            self.f.flush()
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, "No space left on device")
        return n

    def __getattr__(self, name: str):
        return getattr(self.f, name)


def save_that_stops(kill: bool):
    """``torch.save`` writing through :class:`StopsWriting`."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        return real(obj, StopsWriting(f, kill), *args, **kwargs)

    return save


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    StreamingCheckpointIO().save_checkpoint(checkpoint(1.0), path)
    monkeypatch.setattr(torch, "save", save_that_stops(kill=False))
    with pytest.raises(Exception) as failure:  # noqa: PT011 - torch may wrap it
        StreamingCheckpointIO().save_checkpoint(checkpoint(2.0), path)
    monkeypatch.undo()
    chain = [failure.value]
    while chain[-1].__context__ is not None:
        chain.append(chain[-1].__context__)
    assert any(getattr(err, "errno", None) == errno.ENOSPC for err in chain)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the temporary file removed
    loaded = torch.load(path, weights_only=True)
    assert loaded["global_step"] == 1 and torch.equal(loaded["state_dict"]["net.weight"],
                                                      checkpoint(1.0)["state_dict"]["net.weight"])


def test_killed_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    StreamingCheckpointIO().save_checkpoint(checkpoint(1.0), path)
    out = subprocess.run([sys.executable, __file__, str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    leftovers = [p for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".last.ckpt.")
    assert STOP_AFTER < leftovers[0].stat().st_size  # it was killed halfway through the write
    loaded = StreamingCheckpointIO().load_checkpoint(path, weights_only=True)
    assert loaded["global_step"] == 1


def test_save_writes_into_a_file_not_a_buffer(tmp_path, monkeypatch):
    """torch.save gets a real file, a temporary one in the target's directory, never a buffer."""
    directory = tmp_path / "sub"
    seen = []
    real = torch.save

    def spy(obj, f, *args, **kwargs):
        inode = os.fstat(f.fileno()).st_ino  # a file object: io.BytesIO has no fileno
        seen.append([p.name for p in directory.iterdir() if p.stat().st_ino == inode])
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", spy)
    StreamingCheckpointIO().save_checkpoint(checkpoint(1.0), directory / "a.ckpt")
    ((name,),) = seen
    assert name.startswith(".a.ckpt.") and name.endswith(".tmp")
    assert [p.name for p in directory.iterdir()] == ["a.ckpt"]  # renamed onto the target
    assert (directory / "a.ckpt").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@needs_proc
def test_load_is_memory_mapped_and_only_the_module_weights_stay_mapped(tmp_path):
    path = tmp_path / "a.ckpt"
    saved = checkpoint(3.0)
    torch.save(saved, path)
    loaded = StreamingCheckpointIO().load_checkpoint(path, weights_only=True)
    assert torch.equal(loaded["state_dict"]["net.weight"], saved["state_dict"]["net.weight"])
    assert torch.equal(loaded["optimizer_states"][0]["state"][0]["exp_avg"],
                       saved["optimizer_states"][0]["state"][0]["exp_avg"])
    assert loaded["callbacks"] == {"ModelCheckpoint": {"best_model_score": torch.tensor(3.0)}}
    assert loaded["global_step"] == 3
    assert mapped(path)  # the weights are read from the file's pages
    del loaded["state_dict"]
    assert not mapped(path)  # the optimizer's and callbacks' tensors are copies


def test_load_keeps_lightnings_behaviour(tmp_path):
    io_ = StreamingCheckpointIO()
    with pytest.raises(FileNotFoundError, match="Checkpoint file not found"):
        io_.load_checkpoint(tmp_path / "missing.ckpt")
    # weights_only as passed: a pickled object is refused with True, loaded with False
    torch.save({"state_dict": {}, "obj": functools.partial(pow, 2)}, tmp_path / "obj.ckpt")
    with pytest.raises(Exception, match="Weights only load failed"):
        io_.load_checkpoint(tmp_path / "obj.ckpt", weights_only=True)
    assert io_.load_checkpoint(tmp_path / "obj.ckpt", weights_only=False)["obj"](3) == 8
    # torch's legacy (non-zip) format, which mmap cannot read
    torch.save(checkpoint(4.0), tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    assert io_.load_checkpoint(tmp_path / "legacy.ckpt", weights_only=True)["global_step"] == 4
    with pytest.raises(TypeError, match="storage_options"):
        io_.save_checkpoint(checkpoint(1.0), tmp_path / "b.ckpt", storage_options={})


MEMORY_SCRIPT = textwrap.dedent("""
    import json, re, sys
    from pathlib import Path
    import torch
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from sdze_lightning.checkpoint_io import StreamingCheckpointIO, load_weights_page_by_page

    def status(field):
        text = Path("/proc/self/status").read_text()
        return int(re.search(field + r":\\s+(\\d+)", text).group(1)) * 1024

    def reset_peak():
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return status("VmRSS")

    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.ones(50 * 2**20))  # 200 MiB
    if sys.argv[1] == "new":
        io_ = StreamingCheckpointIO()
        load_weights_page_by_page(module)
    else:
        io_ = TorchCheckpointIO()
    path = sys.argv[2]
    before = reset_peak()
    io_.save_checkpoint({"state_dict": module.state_dict()}, path)
    save = status("VmHWM") - before
    with torch.no_grad():
        module.weight.zero_()
    before = reset_peak()
    loaded = io_.load_checkpoint(path, weights_only=True)  # held, as Lightning holds it
    module.load_state_dict(loaded["state_dict"])
    load = status("VmHWM") - before
    assert bool((module.weight == 1).all())
    print(json.dumps({"save": save, "load": load}))
""")


@needs_proc
def test_save_and_load_hold_no_second_copy(tmp_path):
    """Peak RSS of saving a 200 MiB weight, and of loading it back into the module.

    Lightning's IO serialises the checkpoint into memory (save: >= 200 MiB more) and reads
    it into new tensors (load: >= 200 MiB more). The streaming IO's save holds torch.save's
    small buffers only; its load maps the file, and ``load_weights_page_by_page`` copies
    the weight 16 MiB at a time, dropping the pages copied. Bound: a quarter of the weight.
    """
    weight_bytes = 200 * 2**20
    peaks = {}
    for name in ("old", "new"):
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_SCRIPT, name, str(tmp_path / f"{name}.ckpt")],
            capture_output=True, text=True, timeout=120,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        assert out.returncode == 0, out.stderr[-3000:]
        peaks[name] = json.loads(out.stdout.splitlines()[-1])
    assert peaks["old"]["save"] >= weight_bytes and peaks["old"]["load"] >= weight_bytes
    assert peaks["new"]["save"] < weight_bytes / 4, peaks
    assert peaks["new"]["load"] < weight_bytes / 4, peaks


class Doubling(torch.nn.Linear):
    """Loads twice the stored weight (a module with its own ``_load_from_state_dict``)."""

    def _load_from_state_dict(self, state_dict, prefix, *args):
        state_dict[prefix + "weight"] = 2 * state_dict[prefix + "weight"]
        super()._load_from_state_dict(state_dict, prefix, *args)


def two_layers() -> torch.nn.Sequential:
    net = torch.nn.Sequential(torch.nn.Linear(300, 200), Doubling(200, 3))
    net[0].register_buffer("scale", torch.randn(7))
    return net


@needs_proc
def test_page_by_page_load_copies_what_load_state_dict_would(tmp_path):
    """Entries in the map are copied and replaced by the module's own tensors; the rest
    (another dtype, a module loading its own way) is left to load_state_dict."""
    torch.manual_seed(0)
    source = two_layers()
    path = tmp_path / "a.ckpt"
    StreamingCheckpointIO().save_checkpoint({"state_dict": source.state_dict()}, path)
    target = two_layers()
    target[0].bias.data = target[0].bias.data.double()  # another dtype
    load_weights_page_by_page(target)
    seen = {}  # what the children's load sees, after the parent's hook
    for child in target:
        child.register_load_state_dict_pre_hook(lambda m, state_dict, *a: seen.update(state_dict))
    state = StreamingCheckpointIO().load_checkpoint(path, weights_only=True)["state_dict"]
    target.load_state_dict(state)
    for key, tensor in [("0.weight", target[0].weight), ("0.scale", target[0].scale)]:
        assert seen[key] is not state[key] and seen[key].data_ptr() == tensor.data_ptr()
    assert seen["0.bias"] is state["0.bias"]  # another dtype
    assert seen["1.weight"].data_ptr() != target[1].weight.data_ptr()  # doubled by the module
    for key, value in source.state_dict().items():
        expected = 2 * value if key == "1.weight" else value
        assert torch.equal(target.state_dict()[key].to(value.dtype), expected), key


def make_problem(net_seed: int = 0) -> Poisson2D:
    return Poisson2D(net=MLP(2, width=12, depth=2, seed=net_seed), n_interior=32, n_boundary=8,
                     n_eval=64, estimator=TaylorEstimator(2, distribution="rademacher"),
                     method=functools.partial(torch.optim.Adam, lr=1e-2), seed=3)


class Record(L.Callback):
    """Per-step losses, whether ``watch`` is mapped at each step, the Trainer's IO."""

    def __init__(self, watch: Path | None = None) -> None:
        self.watch, self.losses, self.mapped, self.io = watch, {}, [], None

    def on_train_start(self, trainer, pl_module):
        self.io = trainer.strategy.checkpoint_io

    def on_train_batch_start(self, trainer, *args):
        if self.watch is not None and MAPS.exists():
            self.mapped.append(mapped(self.watch))

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.losses[trainer.global_step - 1] = pl_module.last_loss


def fit(steps: int, ckpt_dir: Path, record: Record, ckpt_path: Path | None = None,
        net_seed: int = 0) -> Poisson2D:
    problem = make_problem(net_seed)
    load_weights_page_by_page(problem)
    L.Trainer(
        max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, accelerator="cpu", devices=1, precision="64-true",
        plugins=[StreamingCheckpointIO()], callbacks=[
            record, ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0)],
    ).fit(problem, ckpt_path=ckpt_path)
    return problem


def count_page_by_page_copies(monkeypatch) -> list[int]:
    """Numbers of the tensors :class:`PageByPageLoad` copies, one entry per copy."""
    copies = []
    real = PageByPageLoad._copy

    def spy(self, target, source, ranges):
        copies.append(source.numel())
        return real(self, target, source, ranges)

    monkeypatch.setattr(PageByPageLoad, "_copy", spy)
    return copies


def test_trainer_fit_resumes_bit_for_bit_and_leaves_the_file_alone(tmp_path, monkeypatch):
    copies = count_page_by_page_copies(monkeypatch)
    whole = Record()
    reference = fit(6, tmp_path / "whole", whole)
    fit(3, tmp_path / "first", Record())
    resume_from = tmp_path / "resume.ckpt"
    resume_from.write_bytes((tmp_path / "first" / "last.ckpt").read_bytes())
    digest = hashlib.sha256(resume_from.read_bytes()).hexdigest()
    resumed = Record(watch=resume_from)
    problem = fit(6, tmp_path / "second", resumed, ckpt_path=resume_from, net_seed=123)
    assert isinstance(resumed.io, StreamingCheckpointIO)
    assert sum(copies) == sum(p.numel() for p in problem.parameters())  # page by page
    assert sorted(resumed.losses) == [3, 4, 5]
    assert [resumed.losses[k] for k in (3, 4, 5)] == [whole.losses[k] for k in (3, 4, 5)]
    for a, b in zip(problem.net.parameters(), reference.net.parameters(), strict=True):
        assert torch.equal(a, b)
    if MAPS.exists():
        assert resumed.mapped == [False] * 3  # nothing kept mapped while training
    assert hashlib.sha256(resume_from.read_bytes()).hexdigest() == digest  # never written


def test_sdze_train_uses_it_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    """The CLI's Trainer saves (ModelCheckpoint and Trainer.save_checkpoint) through it."""
    copies = count_page_by_page_copies(monkeypatch)
    saved = []
    real = StreamingCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        saved.append(Path(path).name)
        return real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(StreamingCheckpointIO, "save_checkpoint", spy)
    common = [
        "method=adam", "estimator=taylor", "estimator.num_directions=2",
        "estimator.distribution=rademacher", "model.width=12", "model.depth=2",
        "pde.n_interior=32", "pde.n_boundary=8", "pde.n_eval=64", "trainer.precision=64-true",
        "trainer.accelerator=cpu", "+trainer.enable_progress_bar=false", "logger=none",
        "~callbacks.progress", "~callbacks.memory", "callbacks.checkpoint.every_n_train_steps=2",
    ]

    def run(run_dir: Path, *overrides: str) -> tuple[dict, Record]:
        record = Record()
        cfg = compose_config([*common, *overrides], run_dir)
        return train(cfg, run_dir, callbacks=[record]), record

    whole, _ = run(tmp_path / "whole", "trainer.max_steps=6")
    first, record = run(tmp_path / "run", "trainer.max_steps=3")
    assert isinstance(record.io, StreamingCheckpointIO)
    assert "last.ckpt" in saved
    assert not copies
    resumed, record = run(tmp_path / "run", "trainer.max_steps=6", "ckpt_path=last")
    assert isinstance(record.io, StreamingCheckpointIO) and copies  # weights page by page
    assert sorted(record.losses) == [3, 4, 5]
    assert resumed["steps"] == whole["steps"] == 6
    assert resumed["loss"] == whole["loss"] and resumed["rel_l2"] == whole["rel_l2"]


def test_a_configured_plugin_is_left_alone():
    """``trainer.plugins`` set in the config: the CLI adds no IO (and no hook) of its own."""
    module = torch.nn.Linear(2, 2)
    assert streaming_checkpoints({"plugins": [TorchCheckpointIO()]}, module) == {}
    assert not module._load_state_dict_pre_hooks
    (plugin,) = streaming_checkpoints({"max_steps": 3}, module)["plugins"]
    assert isinstance(plugin, StreamingCheckpointIO)
    assert len(module._load_state_dict_pre_hooks) == 1


@pytest.mark.slow  # a benchmark script's smoke mode (`pytest -m slow`)
def test_checkpoint_peak_benchmark_smoke(tmp_path):
    """benchmarks/checkpoint_peak.py: three runs per configuration, the resume restores."""
    from conftest import load_benchmark

    rows = load_benchmark("checkpoint_peak").main(
        ["--smoke", "--experiments", "twobody_fused", "--io", "new", "--out", str(tmp_path)])
    assert [r["run"] for r in rows] == ["train", "save", "resume"]
    assert all(r["rc"] == 0 and r["peak_rss"] > 0 for r in rows)
    assert [r["restored"] for r in rows] == [False, False, True]
    assert rows[0]["ckpt_bytes"] is None and rows[1]["ckpt_bytes"] > 0
    result = json.loads((tmp_path / "checkpoint_peak_smoke.json").read_text())
    assert {"date", "commit", "machine", "command", "load_start", "load_end"} <= set(result)


if __name__ == "__main__":
    torch.save = save_that_stops(kill=True)
    StreamingCheckpointIO().save_checkpoint(checkpoint(2.0), sys.argv[1])


def test_a_module_with_the_page_by_page_hook_pickles_and_the_copy_loads_page_by_page():
    # the hook holds no C function pointer (ddp_spawn pickles the module with its hooks)
    import pickle

    from sdze_lightning.checkpoint_io import PageByPageLoad, load_weights_page_by_page

    net = torch.nn.Linear(3, 2)
    load_weights_page_by_page(net)
    copy = pickle.loads(pickle.dumps(net))
    hooks = list(copy._load_state_dict_pre_hooks.values())
    assert len(hooks) == 1 and isinstance(hooks[0].hook, PageByPageLoad)
    assert hooks[0].hook.madvise is not None  # Linux: the C library's madvise, looked up again
    copy.load_state_dict(net.state_dict())
    assert torch.equal(copy.weight, net.weight)
