"""Per-batch cache of ``O(N d)`` terms that depend on the points only.

The paired evaluations of a zeroth-order step (CRNS) share their points, so a
problem's source ``f(x)`` or boundary target ``g(x)``, which cost ``O(d)`` per
point at large ``d``, are computed once per step, not once per evaluation.
:class:`BatchCache` holds them, keyed by the batch tensor and a name.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

#: Guards lookups, evictions and inserts of the caches (the prefetch thread and the main
#: thread both use them); module-level, so problems stay copyable and picklable (the
#: cache itself is left out of a pickle or copy: :meth:`BatchCache.__getstate__`).
_LOCK = threading.Lock()


@dataclass
class _Entry:
    """The terms of one batch, complete (``full``) or its first blocks (``parts``)."""

    ref: weakref.ref
    version: int
    parts: list[Tensor] = field(default_factory=list)
    full: Tensor | None = None


class BatchCache:
    """Mixin for problems whose point-only terms are computed block by block.

    A subclass defines :meth:`_blocks` (how a batch is split) and
    :meth:`_block_source` (the source of one block; :meth:`_source_of` and
    :meth:`prepare_batch` cache it), and may cache other terms with :meth:`_cached`.
    An entry is reused while ``x`` is the same unmodified tensor (same object, same
    ``_version``); only weak references to the points are kept, and entries of freed
    batches are dropped.
    An entry can be filled in two calls (``rows``: the prefetch thread's share of the
    blocks first, then the rest on the main thread), block by block as in one call,
    so the numbers do not depend on how the rows were split.
    """

    def __getstate__(self) -> dict[str, Any]:
        """The state to pickle or copy, without the cache (weak references, recomputable)."""
        state = dict(super().__getstate__())
        state.pop("_batch_cache", None)
        return state

    def _blocks(self, x: Tensor) -> tuple[Tensor, ...]:
        """Split ``x`` into the row blocks the terms are computed in."""
        raise NotImplementedError

    def _block_source(self, xb: Tensor) -> Tensor:
        """The source ``f`` at one block of :meth:`_blocks`."""
        raise NotImplementedError

    def prepare_batch(self, x: Tensor, rows: int | None = None) -> None:
        """Compute the source of ``x`` ahead, all of it or about its first ``rows`` rows.

        ``rows`` is rounded to whole blocks of :meth:`_blocks`, so the source is
        computed block by block exactly as in one call (same numbers however the rows
        are split between the prefetch thread and the main thread).
        """
        self._fill(x, "source", self._block_source, rows)

    def _source_of(self, x: Tensor) -> Tensor:
        """The source of ``x``, computed once per batch.

        The cache holds several batches (the current one and the one the prefetch
        thread prepares); each batch's entry is filled by one thread at a time: the
        prefetch thread's share of its blocks first, then (after the hand-over) the
        main thread's.
        """
        return self._cached(x, "source", self._block_source)

    def _cached(self, x: Tensor, name: str, block: Callable[[Tensor], Tensor]) -> Tensor:
        """``cat([block(xb) for xb in _blocks(x)])``, computed once per batch and ``name``.

        Args:
            x: The points.
            name: What is cached (one entry per batch and name).
            block: The terms of one block of rows.

        """
        full = self._fill(x, name, block, None)
        assert full is not None
        return full

    def _fill(self, x: Tensor, name: str, block: Callable[[Tensor], Tensor],
              rows: int | None) -> Tensor | None:
        """Compute the missing blocks of :meth:`_cached`, up to about ``rows`` rows.

        Args:
            x: The points.
            name: What is cached (one entry per batch and name).
            block: The terms of one block of rows.
            rows: Compute only about the first ``rows`` rows (rounded to whole blocks);
                ``None``: all of them.

        Returns:
            The terms of every row once all are computed, else ``None``.

        """
        entry = self._entry(x, name)
        if entry.full is None:
            blocks = self._blocks(x)
            stop = len(blocks) if rows is None else min(len(blocks),
                                                        round(rows / len(blocks[0])))
            for xb in blocks[len(entry.parts) : stop]:
                entry.parts.append(block(xb))
            if len(entry.parts) == len(blocks):
                entry.full, entry.parts = torch.cat(entry.parts), []
        return entry.full

    def _entry(self, x: Tensor, name: str) -> _Entry:
        """The entry of ``(x, name)`` (a new, empty one if ``x`` is new or was modified).

        Under a lock: an ``id`` of a freed batch can be reused by a new one, so an
        eviction of the dead entry and the insert of the new one under the same key
        must not interleave between the two threads.
        """
        with _LOCK:
            cache: dict[tuple[int, str], _Entry] = self.__dict__.setdefault("_batch_cache", {})
            key = (id(x), name)
            entry = cache.get(key)
            if entry is not None and entry.ref() is x and entry.version == x._version:
                return entry
            for old_key in [k for k, old in cache.items() if old.ref() is None]:
                del cache[old_key]
            entry = cache[key] = _Entry(weakref.ref(x), x._version)
            return entry
