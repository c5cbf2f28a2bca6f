"""sparse: the very sparse random projection (Li, Hastie and Church 2006; FastRP), seeded."""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from lowrank_compile.projectors.seeded import Seeded
from lowrank_compile.projectors.seeded import element_hash

__all__ = ["Sparse", "sparse_density"]


def sparse_density(short: int) -> float:
    """The very sparse projection's s for a matrix whose short side is `short`: sqrt(short), at least 1."""
    return max(1.0, math.sqrt(short))


class Sparse(Seeded):
    """Each entry is +sqrt(s/r) or -sqrt(s/r) with probability 1/(2s) each (to 2**-24), else 0.

    s = sqrt(short), the gradient's short side.
    """

    name: ClassVar[str] = "sparse"
    summary: ClassVar[str] = "seeded, entries +-sqrt(s/r) with probability 1/(2s) each, s = sqrt(short side)"

    def generate(self, key: torch.Tensor, d: int, r: int, short: int, dtype: torch.dtype) -> torch.Tensor:
        """P for `key`: pointwise in the element index, so Inductor fuses it into its consumer."""
        h = element_hash(key, d, r)
        s = sparse_density(short)
        hit = (h >> 8) < int((1 << 24) / s)
        mag = math.sqrt(s / r)
        val = torch.where((h & 1) == 1, mag, -mag)
        return torch.where(hit, val, 0.0).to(dtype)
