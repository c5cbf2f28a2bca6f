"""hoist-scalars: compute the update's scalar terms once per call, not once per element.

An optimizer rule mixes a few scalar terms (Adam's bias corrections `1 - beta ** step`, the step
size `lr / (1 - beta1 ** step)`, the decay factor `1 - lr * wd`) into elementwise arithmetic over
the whole state. Inductor inlines a 0-d producer into each consumer's loop body, so those terms are
evaluated inside the loop: on CPU that is two `std::pow` calls in double per vector of 8 floats
(GCC cannot hoist them: Inductor compiles with `-fmath-errno`), several times the cost of the
arithmetic that moves the data.

This pass runs on the post-grad graph of the compiled update (Inductor's
`post_grad_custom_post_pass`, where the graph is functional and decomposed). It finds the *scalar
subgraph*: nodes with one element whose inputs are all placeholders or scalar nodes (Adam's betas
arrive as one small tensor: `select` of it is a scalar),
and wraps each computed scalar that an elementwise node reads in
`lowrank::realize` (`_compat.realize_op`), an identity that Inductor lowers to a realized
buffer. The term is then computed once into that buffer, and the loop reads it with one load.
Values are unchanged bit for bit: the same ops run on the same inputs, only fewer times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from typing import ClassVar

import torch
import torch.fx

from lowrank_compile.passes.base import GraphPass

__all__ = ["HoistScalars"]


def _one_element(val: Any) -> bool:
    try:
        return isinstance(val, torch.Tensor) and int(val.numel()) == 1
    except Exception:  # a symbolic size
        return False


def _pure(node: torch.fx.Node) -> bool:
    """A functional aten op (no in-place write, no random draw)."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    schema = target._schema
    return not schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags


def _computes(node: torch.fx.Node) -> bool:
    """True when `node` does arithmetic (not a view, a copy or a dtype cast of its input)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and target.is_view:
        return False
    return target not in (
        torch.ops.prims.convert_element_type.default,
        torch.ops.aten.clone.default,
        torch.ops.aten._to_copy.default,
    )


@dataclass(frozen=True)
class HoistScalars(GraphPass):
    """Realize every computed scalar an elementwise node reads (see the module docstring)."""

    name: ClassVar[str] = "hoist-scalars"

    def transform(self, gm: torch.fx.GraphModule) -> int:
        """Wrap the frontier of the scalar subgraph; return how many nodes were wrapped."""
        scalar: set[torch.fx.Node] = set()
        for n in gm.graph.nodes:
            if not _one_element(n.meta.get("val")):
                continue
            if n.op == "placeholder" or (
                n.op == "call_function"
                and _pure(n)
                and all(a in scalar or a.op == "placeholder" for a in n.all_input_nodes)
            ):
                scalar.add(n)
        from lowrank_compile import _compat

        force = _compat.realize_op()
        rewrites = 0
        for n in list(gm.graph.nodes):
            if n not in scalar or n.op == "placeholder" or not _computes(n):
                continue
            # Readers that loop over elements: not outputs, not copies into one-element buffers
            # (a step counter's update), which are realized anyway.
            readers = [
                u
                for u in n.users
                if u not in scalar
                and u.target is not force
                and isinstance(u.meta.get("val"), torch.Tensor)
                and not _one_element(u.meta["val"])
            ]
            if not readers:
                continue
            val = n.meta["val"]
            with gm.graph.inserting_after(n):
                hoisted = gm.graph.call_function(force, (n,))
            hoisted.meta["val"] = val
            for u in readers:
                u.replace_input_with(n, hoisted)
            rewrites += 1
        return rewrites
