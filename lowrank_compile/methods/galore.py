"""GaLore (Zhao et al., 2024): the rule's output on R, back-projected and scaled by alpha.

W <- W + back(alpha * d), with d = -lr N the rule's update of a zero parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowrank_compile.methods.base import Defaults
from lowrank_compile.methods.base import Update
from lowrank_compile.runtime import projector as pm

__all__ = ["GaLore"]


@dataclass(frozen=True)
class GaLore(Defaults):
    """GaLore's update: the back-projected low-rank step, nothing more."""

    name: ClassVar[str] = "galore"
    full_gradient: ClassVar[bool] = False
    rule_lr: ClassVar[bool] = True
    resets_states: ClassVar[bool] = False

    def delta(self, u: Update) -> torch.Tensor:
        """See `Method.delta`."""
        # Scale the small R-shaped tensor, not through `alpha`: Inductor's add(mm) <-> addmm
        # rewrites drop alpha (pytorch/pytorch#167313, open on 2.13; measured here).
        return pm.project_back((u.d * u.scale).to(u.dtype), u.pmat.to(u.dtype), u.side)
