"""gaussian: an approximately N(0, 1/r) seeded projector, from integers only."""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from lowrank_compile.projectors.seeded import Seeded
from lowrank_compile.projectors.seeded import element_hash

__all__ = ["Gaussian"]


class Gaussian(Seeded):
    """Each entry is approximately N(0, 1/r).

    The sum of 12 uniform bytes (Irwin-Hall; three hashes), centred and summed in integers, then
    scaled by one fp32 constant, so no transcendental function (whose last bit differs between
    libraries) is involved. Mean 0, variance 1/r; kurtosis 2.9 (a normal's is 3), the tails end at
    6 standard deviations, values on a lattice of 1/512 of a standard deviation.
    """

    name: ClassVar[str] = "gaussian"
    summary: ClassVar[str] = "seeded, approximately N(0, 1/r)"

    def generate(self, key: torch.Tensor, d: int, r: int, short: int, dtype: torch.dtype) -> torch.Tensor:
        """P for `key`: pointwise in the element index, so Inductor fuses it into its consumer."""
        total = torch.zeros(d, r, device=key.device, dtype=torch.int64)
        for stream in range(3):  # 3 hashes of 4 bytes: 12 uniform bytes v
            h = element_hash(key, d, r, stream)
            total = total + (h & 255) + ((h >> 8) & 255) + ((h >> 16) & 255) + (h >> 24)
        # u = (v + 1/2) / 256 has mean 1/2 and variance (1 - 2**-16) / 12; sum(u) - 6, times 512,
        # is this integer (|.| < 2**12), exact in fp32. One constant makes the variance 1/r.
        centred = 2 * total + 12 - 12 * 256
        scale = 1.0 / (512.0 * math.sqrt(r * (1.0 - 2.0**-16)))
        return (centred.to(torch.float32) * scale).to(dtype)
