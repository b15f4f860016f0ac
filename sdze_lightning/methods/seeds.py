"""Counter-based seeding of the methods' own random numbers.

A method never draws from the global RNG. Its random numbers (directions,
subspace bases) come from generators seeded by hashing the method's ``seed``
with counters (step, query, layer, ...). The same counters give the same
numbers on every rank and after a resume, so no generator state needs to be
stored or synchronised.
"""

from __future__ import annotations

import torch

_MASK64 = 0xFFFFFFFFFFFFFFFF


def mix(*parts: int) -> int:
    """Hash integers into one 63-bit seed (splitmix64 finaliser per part)."""
    h = 0x2545F4914F6CDD1D
    for p in parts:
        h = (h ^ (int(p) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def generator(device: torch.device | str, *parts: int) -> torch.Generator:
    """A fresh generator on ``device`` seeded with ``mix(*parts)``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(mix(*parts))
    return gen
