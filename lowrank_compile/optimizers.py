"""The optimizers the backend takes over, and what it must know about each.

The backend does not re-implement any update rule. It traces the optimizer's own `step` on a
virtual parameter (`runtime/rules.py`) and runs that rule on tensors it owns
(`runtime/binding.py`). A registry entry only says what tracing cannot: which settings are
supported, how many full-size states eager torch.optim would allocate (for the plan's byte
counts), and whether weight decay is decoupled (applied to W) or L2 (added to the gradient).
A later projection step needs that last fact.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["OptimizerRule", "rule_for", "supported_names"]


@dataclass(frozen=True)
class OptimizerRule:
    """What the backend needs to know about one optimizer class."""

    name: str
    # Number of full-size state tensors eager torch.optim keeps per parameter for a group.
    states_per_param: Callable[[Mapping[str, Any]], int]
    # True when weight decay multiplies W directly (AdamW, Lion), False for L2 (Adam, SGD).
    decoupled_weight_decay: Callable[[Mapping[str, Any]], bool]
    # Returns why (optimizer, param group) cannot be taken over, or None when it can.
    unsupported: Callable[[torch.optim.Optimizer, Mapping[str, Any]], str | None]
    # The weight decay the update actually applies for a group (Lion can rescale it).
    weight_decay: Callable[[torch.optim.Optimizer, Mapping[str, Any]], float] = lambda opt, g: float(
        g.get("weight_decay", 0.0)
    )
    # Instance attributes (outside param groups) the step reads; set on the instance that is traced.
    instance_attrs: tuple[str, ...] = ()
    # Whether the optimizer keeps a per-parameter step counter (a 0-d tensor) besides its states.
    step_counter: bool = False


def _adam_states(group: Mapping[str, Any]) -> int:
    return 3 if group.get("amsgrad") else 2


def _differentiable(opt: torch.optim.Optimizer, group: Mapping[str, Any]) -> str | None:
    # fused=True is supported: the rule is traced from the per-tensor path (runtime/rules.py).
    if group.get("differentiable"):
        return "differentiable=True (the update would need autograd through the step)"
    return None


_adam_unsupported = _sgd_unsupported = _differentiable


_RULES: dict[type, OptimizerRule] = {
    torch.optim.AdamW: OptimizerRule(
        name="AdamW",
        states_per_param=_adam_states,
        decoupled_weight_decay=lambda g: True,
        unsupported=_adam_unsupported,
        step_counter=True,
    ),
    torch.optim.Adam: OptimizerRule(
        name="Adam",
        states_per_param=_adam_states,
        decoupled_weight_decay=lambda g: bool(g.get("decoupled_weight_decay", False)),
        unsupported=_adam_unsupported,
        step_counter=True,
    ),
    torch.optim.SGD: OptimizerRule(
        name="SGD",
        states_per_param=lambda g: 1 if g.get("momentum", 0) else 0,
        decoupled_weight_decay=lambda g: False,
        unsupported=_sgd_unsupported,
    ),
}


def _lion_rule() -> tuple[type, OptimizerRule] | None:
    """`lion_pytorch.Lion`, a widely used third-party optimizer, when it is installed."""
    try:
        from lion_pytorch import Lion
        from lion_pytorch.lion_pytorch import update_fn
    except ImportError:
        return None

    def unsupported(opt: torch.optim.Optimizer, group: Mapping[str, Any]) -> str | None:
        if getattr(opt, "update_fn", update_fn) is not update_fn:
            return "use_triton=True (a Triton kernel replaces the traceable update)"
        return None

    def weight_decay(opt: torch.optim.Optimizer, group: Mapping[str, Any]) -> float:
        wd = float(group.get("weight_decay", 0.0))
        # Lion(decoupled_weight_decay=True) divides weight decay by the initial lr.
        return wd / float(opt._init_lr) if getattr(opt, "decoupled_wd", False) else wd  # type: ignore[attr-defined]

    return Lion, OptimizerRule(
        name="Lion",
        states_per_param=lambda g: 1,
        decoupled_weight_decay=lambda g: True,
        unsupported=unsupported,
        weight_decay=weight_decay,
        instance_attrs=("_init_lr", "decoupled_wd"),
    )


_THIRD_PARTY_LOADED = False


def _load_third_party() -> None:
    global _THIRD_PARTY_LOADED
    if _THIRD_PARTY_LOADED:
        return
    _THIRD_PARTY_LOADED = True
    lion = _lion_rule()
    if lion is not None:
        _RULES[lion[0]] = lion[1]


def rule_for(optimizer: torch.optim.Optimizer) -> OptimizerRule | None:
    """The rule for `optimizer`'s exact class, or None when the backend does not take it over.

    Subclasses are not matched: a subclass may change `step` in ways the rule does not know.
    """
    rule = _RULES.get(type(optimizer))
    if rule is None and not _THIRD_PARTY_LOADED and type(optimizer).__module__.startswith("lion_pytorch"):
        _load_third_party()
        rule = _RULES.get(type(optimizer))
    return rule


def supported_names() -> list[str]:
    """Names of the supported optimizer classes, for messages."""
    names = {r.name for r in _RULES.values()}
    names.add("lion_pytorch.Lion")
    return sorted(names - {"Lion"})
