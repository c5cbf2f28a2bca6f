"""svd: the top-r singular vectors of the accumulated gradient (GaLore's projector)."""

from __future__ import annotations

from typing import ClassVar

import torch

from lowrank_compile.projectors.base import RefreshFrom
from lowrank_compile.projectors.base import Storage
from lowrank_compile.projectors.base import Unsupported
from lowrank_compile.runtime.projector import Side
from lowrank_compile.runtime.projector import canonical_signs

__all__ = ["Svd", "svd_projector"]


def svd_projector(g: torch.Tensor, rank: int, side: Side, signs: str = "canonical") -> torch.Tensor:
    """The top-`rank` singular vectors of `g` on `side` (fp32). Raises on failure or non-finite output.

    Taken from one `svd(G)`, as GaLore does (left: U[:, :r], right: Vh[:r]^T), not from an SVD of G^T.
    `signs`: "lapack" keeps the signs torch.linalg.svd returns (GaLore's, bit for bit on one
    machine); "canonical" applies `canonical_signs`, so the projector does not depend on
    rounding (thread counts, data-parallel averaging).
    """
    u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
    p = (u[:, :rank] if side == "left" else vh[:rank].t()).contiguous()
    if signs == "canonical":
        p = canonical_signs(p).contiguous()
    if not torch.isfinite(p).all():
        raise torch.linalg.LinAlgError("SVD produced non-finite singular vectors")
    return p


class Svd(Unsupported):
    """A stored d x r matrix, refreshed from the gradient by an exact SVD in fp32."""

    name: ClassVar[str] = "svd"
    storage: ClassVar[Storage] = "matrix"
    refresh_from: ClassVar[RefreshFrom] = "gradient"
    orthonormal: ClassVar[bool] = True
    summary: ClassVar[str] = "exact SVD of the gradient"

    def initial(self, d: int, r: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Zeros: the first update refreshes first."""
        return torch.zeros(d, r, device=device, dtype=dtype)

    def choose(
        self, g: torch.Tensor, rank: int, side: Side, signs: str, basis: torch.Tensor | None
    ) -> torch.Tensor:
        """The top-r singular vectors of `g` on `side`."""
        return svd_projector(g, rank, side, signs)
