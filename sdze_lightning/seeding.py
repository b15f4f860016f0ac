"""Counter-based seeding: one hash, one list of streams.

No part of the library draws from the global RNG. Every random number comes
from a generator seeded by hashing a :class:`Stream` (what the numbers are
for) with a seed and counters (step, noise key, query, layer, ...). The same
inputs give the same numbers on every rank, on either thread and after a
resume, so no generator state is stored or synchronised.

Every use names its stream, always hashed last, after the seed and counters:
two uses with different streams draw from generators with different seeds
(up to a 2**-63 coincidence of the hash), whatever their seeds and counters,
and the streams in use are the members of one :class:`enum.IntEnum`, kept
distinct by :func:`enum.unique`.
"""

from __future__ import annotations

import enum

import torch

_MASK64 = 0xFFFFFFFFFFFFFFFF
_MASK63 = (1 << 63) - 1

#: First noise key of measurement probes (SDZE's ``probe``, the variance monitor):
#: far above the keys a training step uses (``0`` and ``1 .. 2 q``), so a probe never
#: reuses a step's collocation points or estimator directions.
PROBE_KEY_BASE = 1 << 40


@enum.unique
class Stream(enum.IntEnum):
    """What a generator's numbers are used for (the last input of :func:`mix`)."""

    #: Interior collocation points of a step and noise key (``PINNProblem``).
    INTERIOR = 1
    #: Boundary/initial points of a step and noise key.
    BOUNDARY = 2
    #: Spatial estimator directions of a step and noise key.
    ESTIMATOR = 3
    #: Held-out evaluation points.
    EVAL = 4
    #: A problem's own draws through ``PINNProblem.generator(*parts)``.
    USER = 5
    #: SDZE subspace bases, left and right factors, per window and layer.
    SUBSPACE_LEFT = 11
    SUBSPACE_RIGHT = 12
    #: SDZE step directions, per step.
    SDZE_DIRECTIONS = 21
    #: SDZE measurement-probe directions, per step.
    SDZE_PROBES = 22
    #: MeZO directions, per step, query and parameter.
    MEZO_DIRECTIONS = 31
    #: Variance monitor: estimator seeds, probe points, fallback probe directions.
    VARIANCE_SPATIAL = 41
    VARIANCE_POINTS = 42
    VARIANCE_DIRECTIONS = 43
    #: Solution plot: points that find the plotting bounds.
    PLOT_BOUNDS = 51


def mix(stream: Stream, *parts: int) -> int:
    """Hash integers and then the stream into one 63-bit seed (splitmix64 finaliser per part).

    Args:
        stream: What the numbers are for.
        *parts: Seed and counters (step, noise key, window, layer, ...).

    """
    if not isinstance(stream, Stream):
        raise TypeError(f"mix() needs a Stream as its stream, got {stream!r}.")
    h = 0x9E3779B97F4A7C15
    for p in (*parts, int(stream)):
        h = (h ^ (int(p) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h & _MASK63


def generator(device: torch.device | str, stream: Stream, *parts: int) -> torch.Generator:
    """A fresh generator on ``device`` seeded with ``mix(stream, *parts)``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(mix(stream, *parts))
    return gen
