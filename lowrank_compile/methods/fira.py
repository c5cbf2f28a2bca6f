"""Fira (Chen et al., 2024-2025): GaLore plus the residual it drops, scaled and norm-growth limited.

N is the rule's step on R. The residual S = G - P R (the part of G outside the subspace) is
scaled per kept index i by phi_i = ||N_i|| / ||R_i|| (norms over the rank axis), so it borrows
the adaptive optimizer's scaling of the low-rank part; then the norm-growth limiter
(`base.limit_growth`, gamma = `norm_growth_limit`) caps its growth from one step to the next.

    W <- W - lr (alpha back(N) + limit(phi * S))

Differences from the reference code: the residual is G - P R as in the paper (the code forms
G - alpha P R); phi is 0 where ||R_i|| = 0 (the code adds 1e-8 to the denominator).
State: one value (the limited residual's last norm) besides the rule's states on R.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowrank_compile.methods.base import Defaults
from lowrank_compile.methods.base import StateShape
from lowrank_compile.methods.base import Update
from lowrank_compile.methods.base import along_kept
from lowrank_compile.methods.base import limit_growth
from lowrank_compile.methods.base import norm_ratio
from lowrank_compile.methods.base import rank_norms
from lowrank_compile.runtime import projector as pm

__all__ = ["Fira"]


@dataclass(frozen=True)
class Fira(Defaults):
    """Fira's update; `gamma` is the norm-growth limit."""

    gamma: float = 1.01
    name: ClassVar[str] = "fira"
    full_gradient: ClassVar[bool] = True
    rule_lr: ClassVar[bool] = False
    resets_states: ClassVar[bool] = False

    def state_shapes(
        self, shape: tuple[int, int], side: pm.Side, rule_keys: tuple[tuple[str, bool], ...]
    ) -> tuple[StateShape, ...]:
        """See `Method.state_shapes`: the limited residual's last norm."""
        return (StateShape("fira_residual_norm", (1,)),)

    def delta(self, u: Update) -> torch.Tensor:
        """See `Method.delta`."""
        g, r, d, side = u.g, u.r, u.d, u.side
        assert g is not None
        p = u.pmat.to(g.dtype)
        phi = norm_ratio(rank_norms(d, side), rank_norms(r, side))  # ||N_i|| / ||R_i|| (d = -N)
        residual = (g - pm.project_back(r, p, side)) * along_kept(phi, side)
        residual = limit_growth(residual, u.states[0], self.gamma)
        lr = u.lr.to(g.dtype)
        return (lr * (pm.project_back(d * u.scale, p, side) - residual)).to(u.dtype)
