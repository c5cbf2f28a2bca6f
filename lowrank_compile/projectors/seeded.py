"""What the seeded projectors (sparse, gaussian) share: keys and the integer hash they draw from.

A seeded projector is a d x r random matrix that is a pure function of a 32-bit key (the
parameter's name and refresh count, `seed_key`). It is regenerated wherever it is needed
(inside the compiled backward and update, by integer hashing of the element index) and never
stored. Entries have variance 1/r, as FLORA's and APOLLO's projections: E[P P^T] = I, so
back(proj(G)) is an unbiased sketch of G rather than an orthogonal projection, and the
back-projected update is about sqrt(d / r) times larger than with an orthonormal P.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lowrank_compile.projectors.base import RefreshFrom
from lowrank_compile.projectors.base import Storage
from lowrank_compile.projectors.base import Unsupported

__all__ = ["Seeded", "element_hash", "mix32", "seed_key"]

MASK32 = 0xFFFFFFFF


def mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser on int64 values below 2**32 (xorshift-multiply rounds).

    Every product stays below 2**63 (multiplier < 2**27), so nothing overflows and the same bits
    come out of eager torch, Inductor's C++ and Triton, on any device.
    """
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & MASK32
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & MASK32
    return h ^ (h >> 16)


def seed_key(base: int, refresh: int) -> int:
    """The 32-bit key of a parameter's seeded projector after `refresh` refreshes.

    `base` comes from the parameter's name (the same in every process and after a resume).
    """
    h = (base * 0x9E3779B1 + refresh * 0x85EBCA77 + 0x165667B1) & MASK32
    for _ in range(2):
        h = ((h ^ (h >> 16)) * 0x45D9F3B) & MASK32
    return h ^ (h >> 16)


def element_hash(key: torch.Tensor, d: int, r: int, stream: int = 0) -> torch.Tensor:
    """D x r int64 hashes (< 2**32) of each element's index under `key`, one independent `stream` each.

    Each stream hashes the index itself (chaining streams through the first hash made Inductor's
    compile of the kernel 4x slower per stream).
    """
    k = key.view(())
    # + (k ^ k): a zero read from a tensor, so the index is not a pure iota (_compat.HASH_INDEX_NOTE)
    idx = (torch.arange(d * r, device=key.device, dtype=torch.int64) + (k ^ k)).view(d, r)
    return mix32(((idx * 0x9E3779B1 + stream * 0x632BE5AB) & MASK32) ^ key.view(()))


class Seeded(Unsupported):
    """A key, advanced at each refresh; P is generated from it and never stored."""

    storage: ClassVar[Storage] = "seeded"
    refresh_from: ClassVar[RefreshFrom] = "key"
    orthonormal: ClassVar[bool] = False
