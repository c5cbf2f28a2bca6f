"""FRUGAL (Zmushko et al., 2025): Adam on the projected part, a state-free rule on the rest.

g_full = R = proj(G) gets the optimizer's rule (states of R's size); g_free = G - back(R) gets
signSGD (or SGD, `frugal_free_rule`) at lr * lambda_free (`frugal_free_scale`). The update is
the sum:

    W <- W - lr (alpha back(N) + lambda_free sign(G - back(R)))

The rule's states restart when the projector changes (the paper's default), unless
`rotate_states=True` carries them over. alpha (`scale`) defaults to 1: FRUGAL does not scale
the state-full part. No states of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowrank_compile.methods.base import Defaults
from lowrank_compile.methods.base import Update
from lowrank_compile.runtime import projector as pm

__all__ = ["Frugal"]


@dataclass(frozen=True)
class Frugal(Defaults):
    """FRUGAL's update; `free_scale` is lambda_free, `free_rule` "signsgd" or "sgd"."""

    free_scale: float = 1.0
    free_rule: str = "signsgd"
    name: ClassVar[str] = "frugal"
    full_gradient: ClassVar[bool] = True
    rule_lr: ClassVar[bool] = False
    resets_states: ClassVar[bool] = True

    def delta(self, u: Update) -> torch.Tensor:
        """See `Method.delta`."""
        g, side = u.g, u.side
        assert g is not None
        p = u.pmat.to(g.dtype)
        free = g - pm.project_back(u.r, p, side)
        if self.free_rule == "signsgd":
            free = free.sign()
        lr = u.lr.to(g.dtype)
        return (lr * (pm.project_back(u.d * u.scale, p, side) - self.free_scale * free)).to(u.dtype)
