"""What the backend keeps per parameter it takes over, and the process-wide registry of it.

The registry is keyed weakly by parameter identity, so a model that goes away takes its
states with it. A `ParamState` refers to its parameter only weakly. It holds a detached view
of the parameter's storage, which the update writes through.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING

import torch
from torch.utils.weak import WeakIdKeyDictionary

from lowrank_compile.config import LowRankConfig
from lowrank_compile.plan import ParamPlan

if TYPE_CHECKING:
    from lowrank_compile.runtime.binding import OptimizerBinding

__all__ = ["ParamState", "decided", "lookup", "register", "registry_clear"]


@dataclass(eq=False)
class ParamState:
    """The backend's side of one taken-over parameter."""

    plan: ParamPlan
    config: LowRankConfig
    param_ref: weakref.ref[torch.Tensor]
    # The parameter's storage seen as a plain tensor: the shadow optimizer updates it in place.
    view: torch.Tensor
    # Gradient accumulator (contiguous, the parameter's shape and dtype). It is meaningless while
    # `fresh` is True.
    grad: torch.Tensor
    group: int
    binding: OptimizerBinding | None = None
    # True while no gradient has arrived since the last zero_grad (eager: `.grad is None`).
    fresh: bool = True
    backward_calls: int = field(default=0)

    @classmethod
    def create(cls, p: torch.Tensor, plan: ParamPlan, config: LowRankConfig) -> ParamState:
        """Allocate the state for parameter `p` under `plan`."""
        assert plan.group is not None
        return cls(
            plan=plan,
            config=config,
            param_ref=weakref.ref(p),
            view=p.detach(),
            grad=torch.zeros(p.shape, dtype=p.dtype, device=p.device),
            group=plan.group,
        )

    @property
    def param(self) -> torch.Tensor | None:
        """The parameter, or None once it has been freed."""
        return self.param_ref()

    def accumulate(self, g: torch.Tensor) -> None:
        """Add a gradient computed outside the compiled backward (what autograd left in .grad)."""
        if self.fresh:
            self.grad.copy_(g)
        else:
            self.grad.add_(g)
        self.fresh = False

    def zero_grad(self, set_to_none: bool) -> None:
        """Eager `zero_grad` semantics: forget the gradient, or zero it when there is one."""
        if self.fresh:
            return
        if set_to_none:
            self.fresh = True
        else:
            self.grad.zero_()

    def owned_bytes(self) -> dict[str, int]:
        """Bytes of the tensors this state owns, by category."""
        return {"gradients": self.grad.numel() * self.grad.element_size()}


_STATES: WeakIdKeyDictionary = WeakIdKeyDictionary()
_DECIDED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def lookup(p: torch.Tensor) -> ParamState | None:
    """The state of a taken-over parameter, or None."""
    return _STATES.get(p)


def decided(p: torch.Tensor) -> ParamPlan | None:
    """The plan made for `p` by an earlier graph, if any (taken over or not)."""
    return _DECIDED.get(p)


def register(p: torch.Tensor, plan: ParamPlan, state: ParamState | None) -> None:
    """Record the plan for `p`, and its state when it is taken over."""
    _DECIDED[p] = plan
    if state is not None:
        _STATES[p] = state


def registry_items() -> list[tuple[torch.Tensor, ParamPlan]]:
    """Every live parameter with a plan, in no particular order."""
    return list(_DECIDED.items())


def registry_clear() -> None:
    """Forget every plan and state (used by `lowrank_compile.reset`)."""
    _STATES.clear()
    _DECIDED.clear()
