"""What each parameter does in a Dynamo graph: hidden matmul weight, output layer, embedding, conv.

The default plan projects hidden matmul weights (attention and MLP projections), and keeps
embeddings, the output layer and conv kernels full-rank. Roles come from the graph, not from
module names, so plain `nn.Sequential` models and functional code are classified too:

- "matmul": the parameter (through views/transposes) is the weight of a linear/matmul.
- "output": a matmul weight whose result reaches the graph's outputs without passing through
  another parameter-weighted matmul (the LM head, a classifier).
- "embedding": used by an embedding lookup (a tied LM head counts as embedding).
- "conv": used as a convolution kernel.
- "other": anything else (norm scales, biases, unrecognised uses).

Higher-order ops with a subgraph body are looked into: activation checkpointing reaches the
backend as `tag_activation_checkpoint(body, *operands)` (non-reentrant, and reentrant too, which
Dynamo turns into the same op), and `wrap`-style ops carry bodies the same way. `_flatten` inlines
every body into one analysis graph, its placeholders bound to the op's operands and the op's
results (and their `getitem`s) to the body's outputs, so a checkpointed block's matmuls are
classified as if the block were written inline.

A graph break inside a model can make a hidden layer look like an output layer. That only
makes the plan more conservative: the layer stays full-rank.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

__all__ = ["computes_scalar", "param_roles", "subgraph_call"]

_MATMUL = {
    torch._C._nn.linear,
    F.linear,
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.addmm,
    operator.matmul,
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.linear.default,
}
_MATMUL_METHODS = {"matmul", "mm", "__matmul__", "bmm"}
_EMBEDDING = {F.embedding, torch.embedding, torch.ops.aten.embedding.default}
_CONV = {
    F.conv1d,
    F.conv2d,
    F.conv3d,
    torch.conv1d,
    torch.conv2d,
    torch.conv3d,
    torch.ops.aten.convolution.default,
}
_VIEW_METHODS = {"t", "transpose", "permute", "view", "reshape", "contiguous", "to", "float", "type_as", "T"}
_VIEW_FNS = {torch.t, torch.transpose, torch.permute, torch.reshape}


def _is_view(n: torch.fx.Node) -> bool:
    if n.op == "call_method" and n.target in _VIEW_METHODS:
        return True
    if n.op == "call_function" and n.target in _VIEW_FNS:
        return True
    return n.op == "call_function" and n.target is getattr and n.args[1] in ("T", "mT")


def _is_matmul(n: torch.fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _MATMUL) or (
        n.op == "call_method" and n.target in _MATMUL_METHODS
    )


def subgraph_call(
    gm: torch.fx.GraphModule, n: torch.fx.Node
) -> tuple[torch.fx.GraphModule, list[Any]] | None:
    """(body, operands) when `n` calls a higher-order op on a subgraph of `gm`, else None.

    The body is the first argument that names a GraphModule attribute; the operands are the
    arguments after it, in the order of the body's placeholders.
    """
    if n.op != "call_function" or not isinstance(n.target, torch._ops.HigherOrderOperator):
        return None
    for k, a in enumerate(n.args):
        if isinstance(a, torch.fx.Node) and a.op == "get_attr":
            body = getattr(gm, str(a.target), None)
            if isinstance(body, torch.fx.GraphModule):
                return body, list(n.args[k + 1 :])
    return None


def _flatten(gm: torch.fx.GraphModule) -> torch.fx.Graph:
    """A copy of gm's graph with every higher-order op's body inlined (for analysis, not execution)."""
    out = torch.fx.Graph()

    def copy(module: torch.fx.GraphModule, env: dict[torch.fx.Node, Any], top: bool) -> Any:
        for n in module.graph.nodes:
            if n.op == "placeholder" and not top:
                continue  # bound by the caller
            if n.op == "output":
                return torch.fx.map_arg(n.args[0], lambda a: env[a])
            call = subgraph_call(module, n)
            if call is not None:
                body, operands = call
                phs = [b for b in body.graph.nodes if b.op == "placeholder"]
                inner = {b: (env[a] if isinstance(a, torch.fx.Node) else a) for b, a in zip(phs, operands)}
                env[n] = copy(body, inner, top=False)
                continue
            if (
                n.op == "call_function"
                and n.target is operator.getitem
                and isinstance(n.args[0], torch.fx.Node)
                and isinstance(env.get(n.args[0]), (tuple, list))
            ):
                env[n] = env[n.args[0]][n.args[1]]  # a result of an inlined body
                continue
            env[n] = out.node_copy(n, lambda a: env[a])
        return None

    copy(gm, {}, top=True)
    return out


def param_roles(gm: torch.fx.GraphModule, param_indices: Sequence[int]) -> dict[int, str]:
    """Role of each parameter placeholder (by graph input index) in a Dynamo graph."""
    graph = _flatten(gm) if any(subgraph_call(gm, n) for n in gm.graph.nodes) else gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    wanted = {placeholders[i]: i for i in param_indices if i < len(placeholders)}
    # Which parameter (if any) each node is a view of.
    view_of: dict[torch.fx.Node, int] = {}
    for n in graph.nodes:
        if n in wanted:
            view_of[n] = wanted[n]
        elif _is_view(n) and isinstance(n.args[0], torch.fx.Node) and n.args[0] in view_of:
            view_of[n] = view_of[n.args[0]]
    uses: dict[int, set[str]] = {i: set() for i in wanted.values()}
    param_matmuls: dict[torch.fx.Node, int] = {}
    for n in graph.nodes:
        if n.op not in ("call_function", "call_method"):
            continue
        args = [a for a in n.args if isinstance(a, torch.fx.Node)]
        args += [a for a in n.kwargs.values() if isinstance(a, torch.fx.Node)]
        touched = {view_of[a] for a in args if a in view_of}
        if not touched or (_is_view(n) and n in view_of):
            continue
        if n.target in _EMBEDDING:
            kind = "embedding"
        elif n.target in _CONV:
            kind = "conv"
        elif _is_matmul(n):
            # The weight is the second operand (linear(x, w), x @ w, mm(x, w)); a parameter used
            # as the first operand is an unusual use, counted as "other".
            weight_pos = 2 if n.target in (torch.addmm, torch.ops.aten.addmm.default) else 1
            w = n.args[weight_pos] if len(n.args) > weight_pos else n.kwargs.get("weight")
            if isinstance(w, torch.fx.Node) and w in view_of:
                param_matmuls[n] = view_of[w]
                uses[view_of[w]].add("matmul")
                touched = touched - {view_of[w]}
            kind = "other"
        else:
            kind = "other"
        for i in touched:
            uses[i].add(kind)
    # Matmuls with another parameter-weighted matmul downstream are hidden layers.
    feeds_param_matmul: dict[torch.fx.Node, bool] = {}
    for n in reversed(list(graph.nodes)):
        feeds_param_matmul[n] = any(u in param_matmuls or feeds_param_matmul.get(u, False) for u in n.users)
    hidden = {i for n, i in param_matmuls.items() if feeds_param_matmul[n]}
    roles: dict[int, str] = {}
    for i, kinds in uses.items():
        if "embedding" in kinds:
            roles[i] = "embedding"
        elif "conv" in kinds:
            roles[i] = "conv"
        elif "matmul" in kinds and kinds <= {"matmul", "other"} and "other" not in kinds:
            roles[i] = "matmul" if i in hidden else "output"
        else:
            roles[i] = "other"
    return roles


def computes_scalar(gm: torch.fx.GraphModule) -> bool:
    """True when one of the graph's outputs is a 0-d tensor (a loss), from Dynamo's example values."""
    for n in gm.graph.nodes:
        if n.op != "output":
            continue
        found = False

        def visit(a: torch.fx.Node) -> torch.fx.Node:
            nonlocal found
            v = a.meta.get("example_value", a.meta.get("val"))
            if isinstance(v, torch.Tensor) and v.dim() == 0:
                found = True
            return a

        torch.fx.map_arg(n.args, visit)
        return found
    return False
