"""The projector protocol: how one kind of projector is stored, refreshed and materialized.

A projected parameter's projector P is d x r (runtime/projector.py has the geometry: sides,
`project`, `project_back`). The kinds differ in three ways, which the backend reads from the
protocol's class attributes instead of from the kind's name:

- `storage`, what a parameter keeps between refreshes: "matrix" (P itself, d x r, quantizable
  under `projector_bits`), "basis" (r column indices into a d x d basis shared by every
  parameter of the same d: `shared_basis`), or "seeded" (a 32-bit key; P is `generate`d from it
  wherever it is needed, inside the compiled graphs, and never stored).
- `refresh_from`, what a refresh reads: "gradient" (the step's accumulated gradient: `choose`,
  run inside the backward, or at `opt.step()` from a full buffer), "sketch" (a range sketch
  Y = A Omega accumulated by the backward: `from_sketch`; the new P takes over after the
  update, and R is kept between steps as the next sketch's warm start), or "key" (nothing: the
  key advances, before the update's first backward call).
- `orthonormal`: P has orthonormal columns, so G splits into P R and a residual orthogonal to it
  (the clip statistics and Fira's residual rely on that).

Adding a kind touches its own file and one line of the registry (`projectors/__init__.py`).
"""

from __future__ import annotations

from typing import ClassVar
from typing import Literal
from typing import Protocol

import torch

from lowrank_compile.runtime.projector import Side

__all__ = ["Projector", "RefreshFrom", "Storage"]

Storage = Literal["matrix", "basis", "seeded"]
RefreshFrom = Literal["gradient", "sketch", "key"]


class Projector(Protocol):
    """One kind of projector (a stateless object; the registry holds one of each)."""

    name: ClassVar[str]
    storage: ClassVar[Storage]
    refresh_from: ClassVar[RefreshFrom]
    orthonormal: ClassVar[bool]
    # One line for `options` and the README: how a refresh makes P.
    summary: ClassVar[str]

    def initial(self, d: int, r: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """What a "matrix" kind holds before its first refresh (d x r), other storages an empty tensor.

        Zeros when the first refresh comes before the first use.
        """
        ...

    def choose(
        self, g: torch.Tensor, rank: int, side: Side, signs: str, basis: torch.Tensor | None
    ) -> torch.Tensor:
        """refresh_from "gradient": the new P (d x r, fp32) or, for "basis", its r sorted indices.

        Raises `torch.linalg.LinAlgError` or `RuntimeError` when it cannot (the caller keeps the
        previous projector). `signs` is the `svd_signs` option.
        """
        ...

    def from_sketch(self, y: torch.Tensor, rank: int, signs: str) -> torch.Tensor:
        """refresh_from "sketch": the new P (d x r, fp32) from the sketch Y (d x k)."""
        ...

    def sketch_width(self, rank: int, short: int) -> int:
        """refresh_from "sketch": k, the width of the sketch Y (at most `short`)."""
        ...

    def shared_basis(self, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Storage "basis": the d x d basis (cached, one per size, dtype and device)."""
        ...

    def generate(self, key: torch.Tensor, d: int, r: int, short: int, dtype: torch.dtype) -> torch.Tensor:
        """Storage "seeded": P for `key` ((1,) int64 < 2**32), traceable, the same bits on every device."""
        ...


class Unsupported:
    """Defaults for the capabilities a kind does not have: calling one is a backend bug."""

    name: ClassVar[str] = ""

    def _no(self, what: str) -> RuntimeError:
        return RuntimeError(f"lowrank: projector {self.name!r} has no {what} (a backend bug)")

    def initial(self, d: int, r: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(0, device=device, dtype=dtype)

    def choose(
        self, g: torch.Tensor, rank: int, side: Side, signs: str, basis: torch.Tensor | None
    ) -> torch.Tensor:
        raise self._no("gradient refresh")

    def from_sketch(self, y: torch.Tensor, rank: int, signs: str) -> torch.Tensor:
        raise self._no("sketch refresh")

    def sketch_width(self, rank: int, short: int) -> int:
        raise self._no("sketch")

    def shared_basis(self, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        raise self._no("shared basis")

    def generate(self, key: torch.Tensor, d: int, r: int, short: int, dtype: torch.dtype) -> torch.Tensor:
        raise self._no("seeded generator")
