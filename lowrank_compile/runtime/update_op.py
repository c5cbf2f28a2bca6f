"""`lowrank::update_in_backward`: one parameter's optimizer update, run inside the backward graph.

With `update_in_backward=True`, consume-grads' consumers do not accumulate into the backend's
buffers: they compute what the update reads (the gradient itself for a full-rank parameter, R =
proj(G) for a projected one, plus the refresh sketch Y or the new projector on a refresh step) as
graph temporaries and hand them to this op, which runs the parameter's compiled update
(`OptimizerBinding.update_now`) right there. Nothing the backward made for the parameter outlives
the op, so no gradient buffer of the parameter exists between steps.

The op is opaque to Inductor (an extern call). Its schema says it mutates `anchors`: the backward
graph's inputs that are the parameter itself (`primals_k`). The pass places the op after the last
node that reads one of them, and Inductor keeps every earlier read of a mutated buffer before the
mutation, so no part of the backward reads a weight its own update has already changed.
`BackwardWithState` checks, on each variant's first call, that no other input of the graph
shares the parameter's storage (a saved view of the weight would be read unordered).

`token` (a 0-d int64 CPU tensor, fed by the runtime) names the parameter's state (`token_of`), so
the compiled graph holds no per-process number and Inductor's FX graph cache stays correct.
`mode` says which values arrive: MODES[mode].
"""

from __future__ import annotations

import collections
import itertools
import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lowrank_compile.runtime.state import ParamState

__all__ = ["CALLS", "MODES", "second_gradient_error", "token_of", "update_in_backward"]

# "full": [G]; "project": [R]; "sketch": [R, Y] (randomized refresh); "refresh": [R, P_new]
# (svd/dct refresh: the new projector, or dct's column indices).
MODES = ("full", "project", "sketch", "refresh")

_TOKENS: dict[int, weakref.ref[ParamState]] = {}
# Updates run by the op, by parameter name (what tests read to prove the op ran).
CALLS: collections.Counter[str] = collections.Counter()
_next = itertools.count(1)


def second_gradient_error(name: str) -> Exception:
    """The error for a gradient that arrives after the parameter's update already ran this step."""
    from lowrank_compile.config import LowRankOptionError

    return LowRankOptionError(
        f"lowrank option 'update_in_backward': {name} received a second gradient before opt.step() (a "
        "second backward, gradient accumulation, or a parameter whose gradient comes from two compiled "
        "graphs, e.g. a weight tied across a graph break); its update already ran in the first backward. "
        "Call opt.step() after every backward, or use update_in_backward=False"
    )


def token_of(st: ParamState) -> int:
    """The number that names `st` to the op (given on first use, kept for the state's life)."""
    if st.token == 0:
        st.token = next(_next)
        _TOKENS[st.token] = weakref.ref(st)
    return st.token


@torch.library.custom_op("lowrank::update_in_backward", mutates_args=("anchors",))
def update_in_backward(
    token: torch.Tensor, values: list[torch.Tensor], anchors: list[torch.Tensor], mode: int
) -> None:
    """The op the backward graph calls; see the module docstring."""
    ref = _TOKENS.get(int(token.item()))
    st = ref() if ref is not None else None
    if st is None or st.binding is None:
        raise RuntimeError("lowrank: update_in_backward ran for a parameter the backend no longer trains")
    st.binding.update_now(st, list(values), MODES[mode])
    CALLS[st.plan.name] += 1


@update_in_backward.register_fake
def _(token, values, anchors, mode):  # noqa: ANN001, ANN202 (the op's signature)
    return None
