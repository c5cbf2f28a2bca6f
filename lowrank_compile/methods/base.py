"""The method protocol: what one GaLore-family method does with a projected parameter's gradient.

Every method shares the backward (the gradient is consumed into R = proj(G), or kept whole
when `full_gradient`) and the optimizer's traced rule on R (runtime/rules.py), whose output is
handed to the method as `d`. A method then says how W changes. The compiled update
(runtime/binding.py `_update_one`) calls `delta` inside its graph, so Inductor fuses the
method's arithmetic with the rule's.

Shapes (G is m x n, P is d x r, see runtime/projector.py): R and `d` are r x n ("left") or
m x r ("right"); "kept" is the side that is not reduced (n for left, m for right). Per-column
quantities of the papers are per index of the kept side, reduced over the rank axis.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar
from typing import NamedTuple
from typing import Protocol

import torch

from lowrank_compile.runtime import projector as pm

__all__ = [
    "Defaults",
    "Method",
    "StateShape",
    "Update",
    "along_kept",
    "limit_growth",
    "norm_ratio",
    "rank_norms",
]


class StateShape(NamedTuple):
    """One of a method's own states: its key, shape, and whether it is a float64 step counter."""

    key: str
    shape: tuple[int, ...]
    counter: bool = False


class Update(NamedTuple):
    """What `Method.delta` sees of one parameter's update (inside the compiled graph).

    Tensors are in the compute dtype (fp32 for bf16/fp16 weights) unless said otherwise.
    """

    g: torch.Tensor | None  # the full gradient (None unless `full_gradient`), an L2 decay added
    r: torch.Tensor  # the rule's input (R, or `rule_input`'s), an L2 decay added
    d: torch.Tensor  # the rule's output on a zero parameter (see `Method.rule_lr`)
    w: torch.Tensor  # W before this update's decay
    pmat: torch.Tensor  # the d x r projector, in W's dtype
    side: pm.Side
    lr: torch.Tensor  # 0-d float64: the group's lr
    keep: torch.Tensor  # 0-d: 1 - lr wd under a decoupled decay (applied to W by the caller), else 1
    scale: float  # the `scale` option (alpha)
    states: list[torch.Tensor]  # the method's own states (`state_shapes`), updated in place
    dtype: torch.dtype  # what the returned change is in
    # The optimizer's traced rule at the group's lr and hyper-parameters on a 1-D tensor:
    # rule_step(p, grad, rule_states) updates p and the states in place (GradNormLoRP's magnitude).
    rule_step: Callable[[torch.Tensor, torch.Tensor, list[torch.Tensor]], None]


class Method(Protocol):
    """One method (a frozen dataclass: its fields are its hyper-parameters, part of the update's key)."""

    name: ClassVar[str]
    # The update reads the full gradient G besides R: the backward keeps G whole until the update
    # (one full-size buffer per matrix), or the update runs inside the backward (`update_in_backward`).
    full_gradient: ClassVar[bool]
    # The rule runs with the group's lr, and `d` = -lr N (GaLore). Otherwise it runs with lr = 1,
    # `d` = -N, and the method applies lr itself (it needs N's norms whatever lr is, 0 included).
    rule_lr: ClassVar[bool]
    # The rule's states restart (zeros, step 0) when the projector changes (FRUGAL).
    resets_states: ClassVar[bool]

    def state_shapes(
        self, shape: tuple[int, int], side: pm.Side, rule_keys: tuple[tuple[str, bool], ...]
    ) -> tuple[StateShape, ...]:
        """The method's own states beside the rule's: compute dtype (counters float64), never quantized.

        `shape` is W's (m, n); `rule_keys` the rule's states as (key, is a step counter).
        """
        ...

    def refresh_source(self, g: torch.Tensor, w: torch.Tensor, states: list[torch.Tensor]) -> torch.Tensor:
        """What an svd/dct refresh decomposes (eager, at the update that refreshes): G by default."""
        ...

    def rule_input(
        self,
        g: torch.Tensor | None,
        r: torch.Tensor,
        w: torch.Tensor,
        pmat: torch.Tensor,
        side: pm.Side,
        states: list[torch.Tensor],
    ) -> torch.Tensor:
        """What the rule steps on (R-shaped, compute dtype, in the graph): R by default."""
        ...

    def delta(self, u: Update) -> torch.Tensor:
        """The m x n change of W, added after the caller applies the decoupled decay; in `u.dtype`."""
        ...


class Defaults:
    """The protocol's defaults: no own states, refresh from G, the rule steps on R."""

    def state_shapes(
        self, shape: tuple[int, int], side: pm.Side, rule_keys: tuple[tuple[str, bool], ...]
    ) -> tuple[StateShape, ...]:
        """See `Method.state_shapes`."""
        return ()

    def refresh_source(self, g: torch.Tensor, w: torch.Tensor, states: list[torch.Tensor]) -> torch.Tensor:
        """See `Method.refresh_source`."""
        return g

    def rule_input(
        self,
        g: torch.Tensor | None,
        r: torch.Tensor,
        w: torch.Tensor,
        pmat: torch.Tensor,
        side: pm.Side,
        states: list[torch.Tensor],
    ) -> torch.Tensor:
        """See `Method.rule_input`."""
        return r


def rank_norms(t: torch.Tensor, side: pm.Side) -> torch.Tensor:
    """2-norms over the rank axis of an R-shaped tensor: one per index of the kept side."""
    return t.norm(dim=0) if side == "left" else t.norm(dim=1)


def along_kept(v: torch.Tensor, side: pm.Side) -> torch.Tensor:
    """A per-kept-index vector shaped to broadcast over an m x n tensor."""
    return v.view(1, -1) if side == "left" else v.view(-1, 1)


def norm_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """Num / den, 0 where den is 0 (a column with no gradient gets no scale, not inf or NaN).

    The papers divide by ||R|| as is; their code adds 1e-8 to it. An exact 0 is the only case
    where the two differ by more than rounding, and there neither is meaningful.
    """
    return torch.where(den > 0, num / torch.where(den > 0, den, 1), 0)


def limit_growth(u: torch.Tensor, prev: torch.Tensor, gamma: float) -> torch.Tensor:
    """Fira's norm-growth limiter on the update `u`; `prev` (1,) holds the last step's norm.

    If ||u|| > gamma * prev, u is scaled to norm gamma * prev. The kept norm is the limited one.
    prev = 0 (no step yet) limits nothing.
    """
    norm = u.norm()
    cap = gamma * prev.view(())
    factor = torch.where((cap > 0) & (norm > cap), cap / torch.where(norm > 0, norm, 1), 1)
    prev.copy_((norm * factor).view(1))
    return u * factor
