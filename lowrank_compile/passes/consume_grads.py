"""consume-grads: planned gradients are consumed in the backward graph, where they are made.

Before (an AOTAutograd backward graph; output i is the gradient of forward input i):

    mm_2 = aten.mm(permute_6, primals_3)
    permute_8 = aten.permute(mm_2, [1, 0])
    return (permute_8, view_1, None)

After `ConsumeGradients(slots=(GradSlot(0),))`:

    lowrank_fresh_0 = placeholder()               # 0-d bool: no gradient since zero_grad
    lowrank_grad_0 = placeholder()                # the backend's buffer for parameter 0
    mm_2 = aten.mm(permute_6, primals_3)
    permute_8 = aten.permute(mm_2, [1, 0])
    add = aten.add(lowrank_grad_0, permute_8)     # <- consume-grads
    where = aten.where(lowrank_fresh_0, permute_8, add)
    copy_ = aten.copy_(lowrank_grad_0, where)
    return (None, view_1, None)

The full gradient dies inside the graph, right after the node that made it. The output slot
becomes None, so autograd never sets `.grad` and torch.optim never allocates state for it.
The new placeholders go after the existing ones. `gm.meta["lowrank_extra_inputs"]` lists
them as (output index, role), for the runtime to feed on each call. The `copy_` into an input
is the only kind of mutation Inductor allows in such a graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from typing import cast

import torch
import torch.fx

from lowrank_compile.passes.base import GraphPass

__all__ = ["EXTRA_INPUTS_KEY", "ConsumeGradients", "GradSlot"]

EXTRA_INPUTS_KEY = "lowrank_extra_inputs"
aten = torch.ops.aten


@dataclass(frozen=True)
class GradSlot:
    """One planned gradient: the backward output at `output_index`."""

    output_index: int


@dataclass(frozen=True)
class ConsumeGradients(GraphPass):
    """Accumulate the listed gradient outputs into backend buffers; output None instead."""

    name = "consume-grads"
    slots: tuple[GradSlot, ...]

    def transform(self, gm: torch.fx.GraphModule) -> int:
        """Rewrite every slot whose output is a tensor; return how many were rewritten."""
        graph = gm.graph
        out_node = graph.output_node()
        outputs = list(cast(Sequence[Any], out_node.args[0]))
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        fake_mode = torch._guards.detect_fake_mode([n.meta.get("val") for n in placeholders])
        if fake_mode is None:
            raise RuntimeError("consume-grads needs a graph with fake-tensor metadata (meta['val'])")
        extra: list[tuple[int, str]] = list(gm.meta.get(EXTRA_INPUTS_KEY, []))
        last_placeholder = placeholders[-1]
        rewrites = 0
        for slot in self.slots:
            grad = outputs[slot.output_index]
            if not isinstance(grad, torch.fx.Node):
                continue  # this graph makes no gradient for the parameter
            val = grad.meta["val"]
            with fake_mode:
                fresh_val = torch.empty((), dtype=torch.bool, device=val.device)
                buf_val = torch.empty(val.shape, dtype=val.dtype, device=val.device)
            with graph.inserting_after(last_placeholder):
                fresh = graph.placeholder(f"lowrank_fresh_{slot.output_index}")
            with graph.inserting_after(fresh):
                buf = graph.placeholder(f"lowrank_grad_{slot.output_index}")
            last_placeholder = buf
            fresh.meta["val"], buf.meta["val"] = fresh_val, buf_val
            extra += [(slot.output_index, "fresh"), (slot.output_index, "grad")]

            with fake_mode:
                add_val = buf_val + val
                where_val = torch.where(fresh_val, val, add_val)
            with graph.inserting_after(grad):
                add = graph.call_function(aten.add.Tensor, (buf, grad))
            with graph.inserting_after(add):
                where = graph.call_function(aten.where.self, (fresh, grad, add))
            with graph.inserting_after(where):
                copy = graph.call_function(aten.copy_.default, (buf, where))
            add.meta["val"], where.meta["val"], copy.meta["val"] = add_val, where_val, buf_val
            outputs[slot.output_index] = None
            rewrites += 1
        out_node.args = (tuple(outputs),)
        # compile_fx_backward listed the visible outputs before this pass ran; refresh the list.
        if "user_visible_output_idxs" in out_node.meta:
            out_node.meta["user_visible_output_idxs"] = [
                i for i, o in enumerate(outputs) if isinstance(o, torch.fx.Node)
            ]
        gm.meta[EXTRA_INPUTS_KEY] = extra
        return rewrites
