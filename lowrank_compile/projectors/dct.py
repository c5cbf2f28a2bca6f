"""dct: the r columns of a shared orthonormal DCT-II basis best aligned with the gradient.

One d x d basis per size (and dtype, device) is shared by every layer; a layer keeps only the
indices of its r columns: those with the largest norms of Q^T A.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from lowrank_compile.projectors.base import RefreshFrom
from lowrank_compile.projectors.base import Storage
from lowrank_compile.projectors.base import Unsupported
from lowrank_compile.runtime.projector import Side

__all__ = ["Dct", "dct_basis", "dct_indices"]

_DCT_CACHE: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def dct_basis(d: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal DCT-II basis, d x d, columns are basis vectors; cached and shared."""
    key = (d, dtype, torch.device(device))
    q = _DCT_CACHE.get(key)
    if q is None:
        i = torch.arange(d, dtype=torch.float64).unsqueeze(1)  # sample index
        k = torch.arange(d, dtype=torch.float64).unsqueeze(0)  # frequency
        q64 = torch.cos(math.pi * (i + 0.5) * k / d) * math.sqrt(2.0 / d)
        q64[:, 0] = 1.0 / math.sqrt(d)
        q = q64.to(dtype=dtype, device=device).contiguous()
        _DCT_CACHE[key] = q
    return q


def dct_indices(g: torch.Tensor, basis: torch.Tensor, rank: int, side: Side) -> torch.Tensor:
    """Indices (sorted) of the `rank` basis columns best aligned with the gradient."""
    a = (g if side == "left" else g.t()).float()
    scores = (basis.float().t() @ a).norm(dim=1)
    return torch.topk(scores, rank).indices.sort().values


class Dct(Unsupported):
    """r indices into a shared DCT-II basis, refreshed from the gradient."""

    name: ClassVar[str] = "dct"
    storage: ClassVar[Storage] = "basis"
    refresh_from: ClassVar[RefreshFrom] = "gradient"
    orthonormal: ClassVar[bool] = True
    summary: ClassVar[str] = "the best-aligned columns of a shared DCT basis"

    def choose(
        self, g: torch.Tensor, rank: int, side: Side, signs: str, basis: torch.Tensor | None
    ) -> torch.Tensor:
        """The sorted indices of the `rank` columns of `basis` best aligned with `g`."""
        assert basis is not None
        if not torch.isfinite(g).all():
            raise RuntimeError("non-finite gradient")
        return dct_indices(g, basis, rank, side)

    def shared_basis(self, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The d x d DCT-II basis (cached)."""
        return dct_basis(d, dtype, device)
