"""Checkpoint IO that neither saves nor loads through a second copy of the parameters.

Lightning's :class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` serialises the whole
checkpoint into an in-memory buffer before it writes the file, and reads a checkpoint back
into freshly allocated tensors; at large ``d`` either holds a second copy of the input
layer. :class:`StreamingCheckpointIO` ``torch.save``-s straight into a temporary file next
to the target and renames it onto the target once it is on disk (a crash mid-write leaves
the previous checkpoint in place), and ``torch.load``-s with ``mmap=True``: the module's
weights are then read from the file's pages. ``load_state_dict`` copies them into the
parameters; :func:`load_weights_page_by_page` makes that copy drop each page of the file
once copied (Linux), so that the pages read do not add up in the process's memory either.
``sdze-train`` uses both; with ``lightning.Trainer`` pass
``plugins=[StreamingCheckpointIO()]`` and call ``load_weights_page_by_page(module)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import mmap
import os
import sys
import uuid
from collections.abc import Callable, Mapping, MutableMapping, MutableSequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "PageByPageLoad", "StreamingCheckpointIO", "atomic_save", "load_weights_page_by_page",
    "streaming_checkpoints",
]

#: The first bytes of a zip archive: the format ``torch.save`` writes since torch 1.6, the
#: only one ``torch.load(mmap=True)`` reads.
_ZIP_MAGIC = b"PK\x03\x04"
#: The part of a Lightning checkpoint that ``load_state_dict`` copies into the module.
_MODULE_STATE = "state_dict"
_FILE_URL = "file://"
#: Checkpoint files :class:`StreamingCheckpointIO` has loaded memory-mapped (resolved
#: paths): the only maps whose pages :class:`PageByPageLoad` drops.
_MAPPED_FILES: set[str] = set()
#: ``madvise``'s advice that drops pages from a map (Linux): a clean page of a private file
#: map is read from the file again on the next access.
_MADV_DONTNEED = 4
#: Bytes copied between two page drops.
CHUNK_BYTES = 16 * 2**20


def _local_path(path: str | os.PathLike) -> Path | None:
    """``path`` as a local file (a ``file://`` prefix removed); ``None`` for other URLs."""
    text = os.fspath(path)
    if text.startswith(_FILE_URL):
        return Path(text[len(_FILE_URL):])
    return None if "://" in text else Path(text)


def _fsync_directory(directory: Path) -> None:
    """Flush ``directory``'s entries to disk where the platform can (POSIX).

    A rename into the directory then survives a power loss.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows opens no directory
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` into ``path`` through a temporary file in the same directory.

    The object is serialised straight into the temporary file (no in-memory buffer), which
    is flushed and fsync-ed, then renamed onto ``path`` with :func:`os.replace` (atomic on
    one filesystem). Until then ``path`` keeps its previous content; if anything fails the
    temporary file is removed and the error propagates. The file gets the permissions of
    a plainly created one (``0o666`` less the umask).

    Args:
        obj: What ``torch.save`` accepts.
        path: The target file on the local filesystem; its directory is created.

    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_directory(path.parent)


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC


def _own_memory(value: Any, clones: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """``value`` with every CPU tensor in it cloned (the clone leaves the file's memory map).

    Dicts and lists are updated in place, tuples (named ones too) rebuilt; a container with
    no tensor below it is returned as it is, other objects are not looked into. A tensor
    met twice is cloned once (``clones``: by ``id``), so shared state stays shared.
    """
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            return value
        if id(value) not in clones:  # the original kept with it: its id stays its own
            clones[id(value)] = (value, value.clone())
        return clones[id(value)][1]
    if isinstance(value, MutableMapping):
        for key, item in value.items():
            owned = _own_memory(item, clones)
            if owned is not item:
                value[key] = owned
    elif isinstance(value, MutableSequence):
        for i, item in enumerate(value):
            owned = _own_memory(item, clones)
            if owned is not item:
                value[i] = owned
    elif isinstance(value, tuple):
        items = [_own_memory(item, clones) for item in value]
        if any(a is not b for a, b in zip(items, value, strict=True)):
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


class StreamingCheckpointIO(TorchCheckpointIO):
    """:class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` without the second copy.

    Saving: :func:`atomic_save` (``torch.save`` into a temporary file in the target's
    directory, flush, fsync, :func:`os.replace`). Loading: ``torch.load(mmap=True)``, the
    tensors read from the file's pages as they are used. The module's weights
    (``checkpoint["state_dict"]``) stay backed by the file: Lightning copies them into
    the parameters and drops the checkpoint once the run is restored. Every other CPU
    tensor (optimizer state, callback state) is cloned while loading, because optimizers
    keep the loaded tensors as their state (``torch.optim.Optimizer.load_state_dict``
    copies only to change dtype or device): a resumed run neither keeps the file mapped
    nor writes into its pages (the map is private, copy-on-write, in any case). Tensors
    inside objects other than dicts, lists and tuples (a pickled object of your own under
    ``weights_only=False``) are not cloned and keep the map alive as long as they live.

    Remote paths (``s3://`` & co.) and checkpoints in torch's legacy (non-zip) format go
    through :class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` unchanged. Under DDP
    the strategy calls :meth:`save_checkpoint` on rank 0 only.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(plugins=[StreamingCheckpointIO()])  # doctest: +SKIP

    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically without serialising it in memory.

        Args:
            checkpoint: The checkpoint dict (module and trainer state).
            path: The target file; its directory is created.
            storage_options: Not supported (as in ``TorchCheckpointIO``).

        Raises:
            TypeError: If ``storage_options`` is given.

        """
        local = _local_path(path)
        if local is None or storage_options is not None:  # the latter raises Lightning's error
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        atomic_save(checkpoint, local)

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Callable | Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load the checkpoint at ``path`` memory-mapped (see the class docs).

        Args:
            path: The checkpoint file.
            map_location: ``torch.load``'s argument (default: the storages as saved, on the CPU).
            weights_only: ``torch.load``'s argument (``None``: torch's default).

        Returns:
            The checkpoint dict; ``checkpoint["state_dict"]``'s CPU tensors read from the file
            (once :class:`PageByPageLoad` has copied one and dropped its pages, reading it
            again reads the file again: an in-place change made to it before is lost there,
            not in the parameter it was copied into).

        Raises:
            FileNotFoundError: If ``path`` does not exist.

        """
        local = _local_path(path)
        if local is None:
            return super().load_checkpoint(path, map_location=map_location,
                                           weights_only=weights_only)
        if not local.exists():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        if not local.is_file() or not _is_zip(local):  # legacy format: no mmap
            return super().load_checkpoint(path, map_location=map_location,
                                           weights_only=weights_only)
        checkpoint = torch.load(local, map_location=map_location, weights_only=weights_only,
                                mmap=True)
        _MAPPED_FILES.add(str(local.resolve()))
        clones: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if not isinstance(checkpoint, dict):
            return _own_memory(checkpoint, clones)
        for key, value in checkpoint.items():
            if key != _MODULE_STATE:
                checkpoint[key] = _own_memory(value, clones)
        return checkpoint


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    """The C library's ``madvise`` (Linux), else ``None``.

    Looked up once per process and kept out of the hook's state, so that a module holding
    the hook stays picklable.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc.madvise


def _mapped_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's private maps of the files in ``_MAPPED_FILES``."""
    ranges: list[tuple[int, int]] = []
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return ranges
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[1].endswith("p"):
            continue
        name = fields[5].removesuffix(" (deleted)")
        if name in _MAPPED_FILES:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if ranges and ranges[-1][1] == lo:  # the kernel may split one map in two
                ranges[-1] = (ranges[-1][0], hi)
            else:
                ranges.append((lo, hi))
    return ranges


class PageByPageLoad:
    """A ``load_state_dict`` pre-hook: mapped checkpoint weights copied page by page.

    For each entry of the state dict that lies in a private map of a checkpoint loaded by
    :class:`StreamingCheckpointIO` and matches its parameter or buffer in shape and dtype
    (both contiguous), the hook copies it into that tensor ``CHUNK_BYTES`` at a time, drops
    the pages copied (``madvise(MADV_DONTNEED)``; clean pages of a private file map, read
    again from the file if touched again), and replaces the entry with the tensor itself,
    whose copy onto itself ``load_state_dict`` then skips. Every other entry, modules that
    override ``_load_from_state_dict`` and ``assign=True`` loads are left to
    ``load_state_dict``. Does nothing where ``madvise`` or ``/proc/self/maps`` is missing.
    """

    @property
    def madvise(self) -> Callable[[int, int, int], int] | None:
        """The C library's ``madvise``, or ``None`` where there is none."""
        return _madvise()

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                 local_metadata: dict[str, Any], *args: Any) -> None:
        """Copy the eligible entries of ``state_dict`` in place (see the class docs)."""
        if (self.madvise is None or not _MAPPED_FILES
                or local_metadata.get("assign_to_params_buffers")):
            return
        ranges = _mapped_ranges()
        if not ranges:
            return
        for key, target in self._targets(module, prefix).items():
            source = state_dict.get(key)
            if isinstance(source, Tensor) and self._eligible(source, target, ranges):
                with torch.no_grad():
                    self._copy(target.detach(), source, ranges)
                state_dict[key] = target.detach()

    @staticmethod
    def _targets(module: nn.Module, prefix: str) -> dict[str, Tensor]:
        """The parameters and buffers ``load_state_dict`` copies into, by state-dict key."""
        targets = {}
        for name, sub in module.named_modules():
            if type(sub)._load_from_state_dict is not nn.Module._load_from_state_dict:
                continue
            head = f"{prefix}{name}." if name else prefix
            for attr, tensor in [*sub.named_parameters(recurse=False),
                                 *sub.named_buffers(recurse=False)]:
                targets[head + attr] = tensor
        return targets

    @staticmethod
    def _eligible(source: Tensor, target: Tensor, ranges: list[tuple[int, int]]) -> bool:
        if (source.device.type != "cpu" or source.dtype != target.dtype
                or source.shape != target.shape or not source.is_contiguous()
                or not target.is_contiguous() or source.numel() == 0):
            return False
        lo = source.data_ptr()
        hi = lo + source.numel() * source.element_size()
        return any(start <= lo and hi <= end for start, end in ranges)

    def _copy(self, target: Tensor, source: Tensor, ranges: list[tuple[int, int]]) -> None:
        flat_target, flat_source = target.view(-1), source.view(-1)
        size = source.element_size()
        step = max(1, CHUNK_BYTES // size)
        page = mmap.PAGESIZE
        for start in range(0, source.numel(), step):
            stop = min(source.numel(), start + step)
            flat_target[start:stop].copy_(flat_source[start:stop])
            lo = -(-(flat_source.data_ptr() + start * size) // page) * page  # pages inside
            hi = (flat_source.data_ptr() + stop * size) // page * page
            if hi > lo:
                self.madvise(lo, hi - lo, _MADV_DONTNEED)


def load_weights_page_by_page(module: nn.Module) -> RemovableHandle:
    """Register :class:`PageByPageLoad` on ``module`` (its top-level ``load_state_dict``).

    Args:
        module: The module a checkpoint loaded by :class:`StreamingCheckpointIO` is loaded
            into (a ``LightningModule``: Lightning's resume calls its ``load_state_dict``).

    Returns:
        The hook's handle (``.remove()`` unregisters it).

    """
    return module.register_load_state_dict_pre_hook(PageByPageLoad())


def streaming_checkpoints(trainer_cfg: Mapping[str, Any], module: nn.Module) -> dict[str, Any]:
    """The Trainer's ``plugins`` argument: a :class:`StreamingCheckpointIO`.

    Also registers :func:`load_weights_page_by_page` on ``module``. Empty (and nothing
    registered) where the trainer config sets ``plugins`` itself: it then chooses the IO.

    Args:
        trainer_cfg: The ``trainer`` node of the run's config.
        module: The module the Trainer fits.

    Returns:
        ``{"plugins": [StreamingCheckpointIO()]}`` or ``{}``.

    """
    if trainer_cfg.get("plugins") is not None:
        return {}
    load_weights_page_by_page(module)
    return {"plugins": [StreamingCheckpointIO()]}
