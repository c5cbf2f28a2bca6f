"""The pass driver: which passes run on which graph, in order, and why there.

Forward graphs are handed to Inductor untouched: the backend changes nothing a forward pass
computes. Only the backward graph and the optimizer update are rewritten.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.fx

from lowrank_compile.passes.base import PassRecord
from lowrank_compile.passes.consume_grads import ConsumeGradients
from lowrank_compile.passes.consume_grads import GradSlot
from lowrank_compile.passes.hoist_scalars import HoistScalars

__all__ = ["backward_passes", "update_post_grad_pass"]


def backward_passes(gm: torch.fx.GraphModule, slots: Sequence[GradSlot]) -> list[PassRecord]:
    """Rewrite an AOTAutograd backward graph in place; return what each pass did.

    The graph arrives after AOTAutograd partitioned it and after Inductor's joint-graph passes,
    and before Inductor's post-grad passes and lowering (this runs as Inductor's inner compile).
    """
    records: list[PassRecord] = []
    # 1. consume-grads. It runs on the partitioned graph, where each gradient output's producer
    #    is final, so the gradient is consumed right after it is made and its output becomes
    #    None. Inductor then frees the full-size gradient at that point.
    records.append(ConsumeGradients(tuple(slots))(gm))
    return records


def update_post_grad_pass(user_pass: Any = None) -> Any:
    """The passes on the compiled optimizer update's graph, as Inductor's post-grad custom pass.

    `user_pass`: a post-grad pass the user gave in the `inductor` option; it runs after ours.
    """
    from lowrank_compile import _compat

    # 1. hoist-scalars. It needs the post-grad graph: functional (a hoisted scalar may be read
    #    anywhere below it) and decomposed (Adam's lerp and addcdiv are plain arithmetic, so
    #    every scalar term is a node of its own). It must run before lowering, where Inductor
    #    decides what to inline into each loop.
    return _compat.post_grad_pass(HoistScalars(), then=user_pass)
