"""APOLLO and APOLLO-Mini (Zhu et al., 2025): the optimizer on a projection only sets scales of G.

N is the rule's step on R = proj(G) (a seeded Gaussian projection by default). APOLLO scales the
raw gradient per kept index i by s_i = ||N_i|| / ||R_i|| (norms over the rank axis); APOLLO-Mini
uses one factor for the whole matrix, s = ||N|| / ||R||, at rank 1. Fira's norm-growth limiter
(gamma = `norm_growth_limit`) then caps the scaled gradient:

    W <- W - lr alpha limit(G diag(s))

Nothing is back-projected: the projector only serves to make R. State: the rule's on R
(APOLLO 2 n r + a step counter for Adam, Mini 2 n + 1) plus the limiter's last norm.
Differences from the reference code: s is 0 where ||R_i|| = 0 (the code adds 1e-8); the
projection is regenerated from a seed inside the graphs rather than kept dense.
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

__all__ = ["Apollo", "ApolloMini"]


@dataclass(frozen=True)
class Apollo(Defaults):
    """APOLLO's update (channel-wise scales); `gamma` is the norm-growth limit."""

    gamma: float = 1.01
    name: ClassVar[str] = "apollo"
    full_gradient: ClassVar[bool] = True
    rule_lr: ClassVar[bool] = False
    resets_states: ClassVar[bool] = False
    tensorwise: ClassVar[bool] = False

    def state_shapes(
        self, shape: tuple[int, int], side: pm.Side, rule_keys: tuple[tuple[str, bool], ...]
    ) -> tuple[StateShape, ...]:
        """See `Method.state_shapes`: the limited update's last norm."""
        return (StateShape("apollo_update_norm", (1,)),)

    def delta(self, u: Update) -> torch.Tensor:
        """See `Method.delta`."""
        g, r, d, side = u.g, u.r, u.d, u.side
        assert g is not None
        if self.tensorwise:
            scaled = g * norm_ratio(d.norm(), r.norm())
        else:
            scaled = g * along_kept(norm_ratio(rank_norms(d, side), rank_norms(r, side)), side)
        scaled = limit_growth(scaled, u.states[0], self.gamma)
        return (-(u.lr.to(g.dtype) * u.scale) * scaled).to(u.dtype)


@dataclass(frozen=True)
class ApolloMini(Apollo):
    """APOLLO-Mini: one scale per matrix (rank 1 by default, alpha = sqrt(128))."""

    name: ClassVar[str] = "apollo-mini"
    tensorwise: ClassVar[bool] = True
