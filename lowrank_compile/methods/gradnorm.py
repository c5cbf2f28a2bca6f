"""GradNormLoRP (Huang et al., AAAI 2025): weight normalization with a GaLore-projected direction.

Each projected W (m x n) is read as W = g * V / ||V|| per output row j (g: one magnitude per
row, V: the direction), without changing the model: both gradients follow from G = dL/dW,

    dL/dg_j = <G_j, v_j>,  dL/dV_j = (g_j / ||V_j||) (G_j - <G_j, v_j> v_j),  v_j = V_j / ||V_j||.

The magnitude gets the optimizer's full rule (one value per row, its states persist); the
direction's gradient is projected as in GaLore (the projector refreshes from it) and the rule on
that projection gives N_V; then

    g <- rule(g, dL/dg),  V <- V - lr alpha back(N_V),  W <- g * V / ||V||

with a decoupled decay applied to both g and V (AdamW on every tensor). V is not stored: since
W_j = g_j v_j, V_j = W_j ||V_j|| / g_j, so the method keeps only g and ||V|| (2 m values) besides
the rules' states. At the first update V = W and g = ||W_j||. A row of W that is exactly zero
has no direction: its gradients are taken as 0 and it stays 0.

Differences from the released code, which runs GaLore on PEFT DoRA factors and resets g to ||V||
at every step: here, as in the paper, the learned magnitude persists across steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowrank_compile.methods.base import Defaults
from lowrank_compile.methods.base import StateShape
from lowrank_compile.methods.base import Update
from lowrank_compile.runtime import projector as pm

__all__ = ["GradNorm"]


def _effective(w: torch.Tensor, states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, ||V||) per row; rows not yet set (||V|| = 0: before the first update) start from W."""
    wn = w.norm(dim=1)
    if not states:  # the storage does not exist yet (a refresh before the first update)
        return wn, wn
    mag, vnorm = states[0].to(w.dtype), states[1].to(w.dtype)
    fresh = vnorm == 0
    return torch.where(fresh, wn, mag), torch.where(fresh, wn, vnorm)


def _gradients(
    g: torch.Tensor, w: torch.Tensor, mag: torch.Tensor, vnorm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dg, the unit directions v, dL/dV) from G, W and the magnitudes."""
    vhat = torch.where(mag[:, None] != 0, w / torch.where(mag != 0, mag, 1)[:, None], 0)
    dmag = (g * vhat).sum(dim=1)
    c = torch.where(vnorm > 0, mag / torch.where(vnorm > 0, vnorm, 1), 0)
    dv = c[:, None] * (g - dmag[:, None] * vhat)
    return dmag, vhat, dv


@dataclass(frozen=True)
class GradNorm(Defaults):
    """GradNormLoRP's update."""

    name: ClassVar[str] = "gradnorm"
    full_gradient: ClassVar[bool] = True
    rule_lr: ClassVar[bool] = False
    resets_states: ClassVar[bool] = False

    def state_shapes(
        self, shape: tuple[int, int], side: pm.Side, rule_keys: tuple[tuple[str, bool], ...]
    ) -> tuple[StateShape, ...]:
        """See `Method.state_shapes`: g and ||V|| per row, then the rule's states for g."""
        m = shape[0]
        own = [StateShape("gradnorm_magnitude", (m,)), StateShape("gradnorm_direction_norm", (m,))]
        own += [StateShape(f"gradnorm_{k}", (1,) if counter else (m,), counter) for k, counter in rule_keys]
        return tuple(own)

    def refresh_source(self, g: torch.Tensor, w: torch.Tensor, states: list[torch.Tensor]) -> torch.Tensor:
        """See `Method.refresh_source`: the direction's gradient dL/dV."""
        mag, vnorm = _effective(w.to(g.dtype), states)
        return _gradients(g, w.to(g.dtype), mag, vnorm)[2]

    def rule_input(
        self,
        g: torch.Tensor | None,
        r: torch.Tensor,
        w: torch.Tensor,
        pmat: torch.Tensor,
        side: pm.Side,
        states: list[torch.Tensor],
    ) -> torch.Tensor:
        """See `Method.rule_input`: the projection of dL/dV."""
        assert g is not None
        mag, vnorm = _effective(w, states)
        return pm.project(_gradients(g, w, mag, vnorm)[2], pmat.to(g.dtype), side)

    def delta(self, u: Update) -> torch.Tensor:
        """See `Method.delta`."""
        g, w = u.g, u.w
        assert g is not None
        mag, vnorm = _effective(w, u.states)
        dmag, vhat, _ = _gradients(g, w, mag, vnorm)
        keep = u.keep.to(w.dtype)
        new_mag = mag * keep
        u.rule_step(new_mag, dmag, u.states[2:])  # the optimizer's rule on the magnitudes, at lr
        v = vhat * vnorm[:, None] * keep + (u.lr.to(w.dtype) * u.scale) * pm.project_back(
            u.d, u.pmat.to(w.dtype), u.side
        )
        new_vnorm = v.norm(dim=1)
        new_w = new_mag[:, None] * v / torch.where(new_vnorm > 0, new_vnorm, 1)[:, None]
        u.states[0].copy_(new_mag)
        u.states[1].copy_(new_vnorm)
        return (new_w - keep * w).to(u.dtype)
