"""Projector geometry: which side is projected, projecting and back-projecting, sign conventions.

Notation: gradient G is m x n. A projector P is d x r, with orthonormal columns except for the
seeded kinds.
- side "left":  P is m x r, R = P^T G (r x n), back-projection P N (m x n).
- side "right": P is n x r, R = G P (m x r), back-projection N P^T (m x n).

How each kind of projector is stored and refreshed (the `projector` option) is in
lowrank_compile/projectors/, one file per kind behind the protocol of `projectors.base`.

All functions are pure torch and are used both at refresh time and by the tests.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = [
    "Side",
    "canonical_signs",
    "choose_side",
    "energy_captured",
    "project",
    "project_back",
]

Side = Literal["left", "right"]


def choose_side(shape: tuple[int, int], proj_type: str) -> Side:
    """The side GaLore projects for `proj_type` (std keeps the larger dimension)."""
    m, n = shape
    if proj_type == "left":
        return "left"
    if proj_type == "right":
        return "right"
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    raise ValueError(f"unknown proj_type {proj_type!r}")


def project(g: torch.Tensor, p: torch.Tensor, side: Side) -> torch.Tensor:
    """R = P^T G (left) or G P (right)."""
    return p.t() @ g if side == "left" else g @ p


def project_back(n: torch.Tensor, p: torch.Tensor, side: Side) -> torch.Tensor:
    """P N (left) or N P^T (right)."""
    return p @ n if side == "left" else n @ p.t()


def _as_a(g: torch.Tensor, side: Side) -> torch.Tensor:
    return g if side == "left" else g.t()


def canonical_signs(p: torch.Tensor) -> torch.Tensor:
    """`p` with each column's sign chosen so that its largest-magnitude entry is positive.

    LAPACK's signs are not a continuous function of the matrix: on a 512 x 512 gradient of
    rank 64, averaging it over 2 ranks instead of computing it from the joint batch (a 1e-7
    relative change) flipped 7 of 16 columns, and so did changing the thread count. GaLore does
    not rotate states at a refresh, so a flip changes the trajectory. The largest entry's sign
    only changes when two entries' magnitudes tie.
    """
    idx = p.abs().argmax(dim=0, keepdim=True)
    s = torch.sign(p.gather(0, idx))
    return p * torch.where(s == 0, torch.ones_like(s), s)


def energy_captured(g: torch.Tensor, p: torch.Tensor, side: Side) -> float:
    """||P^T A||^2 / ||A||^2: the fraction of the gradient's energy inside the projector's span."""
    a = _as_a(g, side).double()
    return float((p.double().t() @ a).norm() ** 2 / a.norm() ** 2)
