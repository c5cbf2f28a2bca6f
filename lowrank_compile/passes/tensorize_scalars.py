"""tensorize-scalars: scalar arguments that were read out of tensors become tensor arithmetic.

Tracing an optimizer's step turns `param.addcdiv_(m, d, value=-step_size)` with a tensor
step_size into a `_local_scalar_dense` (an `.item()`) feeding `value=`. Inside a compiled update
that would be a data-dependent graph break. This pass rewrites each such use into plain tensor
ops, in the operand order of the fused ATen kernel (value * t1 / t2, value * t1 * t2):

    s = aten._local_scalar_dense(t)                      x = aten.mul(t, m)           # <- tensorize-scalars
    aten.addcdiv_(p, m, d, value=s)          ->          y = aten.div(x, d)
                                                         aten.add_(p, y)

Handled uses: addcdiv(_) / addcmul(_) `value=`, add(_) / sub(_) `alpha=`, and mul(_) / div(_) /
add(_) / sub(_) with the scalar as second operand. Any other use is left alone; the compiled
update then breaks the graph there, which is slower but still correct.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from lowrank_compile.passes.base import GraphPass

__all__ = ["TensorizeScalars"]

aten = torch.ops.aten

_INPLACE = {
    aten.addcdiv_.default: True,
    aten.addcdiv.default: False,
    aten.addcmul_.default: True,
    aten.addcmul.default: False,
    aten.add_.Tensor: True,
    aten.add.Tensor: False,
    aten.sub_.Tensor: True,
    aten.sub.Tensor: False,
}
_SCALAR_OPS = {
    aten.mul_.Scalar: aten.mul_.Tensor,
    aten.mul.Scalar: aten.mul.Tensor,
    aten.div_.Scalar: aten.div_.Tensor,
    aten.div.Scalar: aten.div.Tensor,
    aten.add_.Scalar: aten.add_.Tensor,
    aten.add.Scalar: aten.add.Tensor,
    aten.sub_.Scalar: aten.sub_.Tensor,
    aten.sub.Scalar: aten.sub.Tensor,
}


@dataclass(frozen=True)
class TensorizeScalars(GraphPass):
    """Replace `.item()`-derived scalar arguments with tensor arithmetic."""

    name = "tensorize-scalars"

    def transform(self, gm: torch.fx.GraphModule) -> int:
        """Rewrite every supported use of `aten._local_scalar_dense`; return how many."""
        graph = gm.graph
        rewrites = 0
        for item in [n for n in graph.nodes if n.target is aten._local_scalar_dense.default]:
            t = item.args[0]
            for user in list(item.users):
                if self._rewrite(graph, user, item, t):
                    rewrites += 1
            if not item.users:
                graph.erase_node(item)
        graph.eliminate_dead_code()
        return rewrites

    def _rewrite(self, graph: torch.fx.Graph, user: torch.fx.Node, item: torch.fx.Node, t: Any) -> bool:
        target = user.target
        with graph.inserting_before(user):
            if target in (
                aten.addcdiv_.default,
                aten.addcdiv.default,
                aten.addcmul_.default,
                aten.addcmul.default,
            ):
                if user.kwargs.get("value") is not item:
                    return False
                self_, t1, t2 = user.args[:3]
                scaled = graph.call_function(aten.mul.Tensor, (t, t1))
                is_div = target in (aten.addcdiv_.default, aten.addcdiv.default)
                term = graph.call_function(aten.div.Tensor if is_div else aten.mul.Tensor, (scaled, t2))
                new = graph.call_function(
                    aten.add_.Tensor if _INPLACE[target] else aten.add.Tensor, (self_, term)
                )
            elif target in (aten.add_.Tensor, aten.add.Tensor, aten.sub_.Tensor, aten.sub.Tensor):
                if user.kwargs.get("alpha") is not item:
                    return False
                self_, other = user.args[:2]
                term = graph.call_function(aten.mul.Tensor, (other, t))
                new = graph.call_function(target, (self_, term))
            elif target in _SCALAR_OPS and len(user.args) >= 2 and user.args[1] is item:
                new = graph.call_function(_SCALAR_OPS[target], (user.args[0], t))
            else:
                return False
        user.replace_all_uses_with(new)
        graph.erase_node(user)
        return True
