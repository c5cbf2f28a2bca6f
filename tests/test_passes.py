"""The consume-grads pass on a real AOTAutograd backward graph, run without Inductor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import aot_function
from functorch.compile import make_boxed_func

from lowrank_compile.passes import PASSES
from lowrank_compile.passes import get_pass
from lowrank_compile.passes.base import PROVENANCE_KEY
from lowrank_compile.passes.base import pass_counters
from lowrank_compile.passes.consume_grads import EXTRA_INPUTS_KEY
from lowrank_compile.passes.consume_grads import ConsumeGradients
from lowrank_compile.passes.consume_grads import GradSlot


def _capture_backward():
    """An AOTAutograd backward graph of a 2-layer MLP loss, plus the inputs it was called with."""
    captured = {}

    def fw(gm, ex):
        return make_boxed_func(gm.forward)

    def bw(gm, ex):
        captured["gm"] = gm

        def run(args):
            captured["args"] = list(args)
            return gm(*args)

        run._boxed_call = True
        return run

    def loss(w1, b1, w2, x):
        return F.cross_entropy(F.linear(torch.relu(F.linear(x, w1, b1)), w2), torch.tensor([1, 0, 2]))

    torch.manual_seed(0)
    w1 = torch.randn(16, 8, requires_grad=True)
    b1 = torch.randn(16, requires_grad=True)
    w2 = torch.randn(3, 16, requires_grad=True)
    x = torch.randn(3, 8)
    f = aot_function(loss, fw_compiler=fw, bw_compiler=bw)
    f(w1, b1, w2, x).backward()
    return captured["gm"], captured["args"], (w1.grad, b1.grad, w2.grad)


def test_registry_names_match_classes():
    for name in PASSES:
        assert get_pass(name).name == name


def test_consume_grads_accumulates_with_eager_semantics():
    gm, args, (g_w1, g_b1, g_w2) = _capture_backward()
    before = pass_counters["consume-grads"]
    record = ConsumeGradients((GradSlot(0), GradSlot(2), GradSlot(3)))(gm)
    # slot 3 is x's gradient: None in the graph, so it is skipped and not counted.
    assert record.rewrites == 2 and pass_counters["consume-grads"] - before == 2
    assert gm.meta[EXTRA_INPUTS_KEY] == [(0, "fresh"), (0, "grad"), (2, "fresh"), (2, "grad")]
    created = [n for n in gm.graph.nodes if n.meta.get(PROVENANCE_KEY) == "consume-grads"]
    assert {n.name for n in created} == set(record.created) and len(created) == 10  # 4 placeholders + 6 ops
    assert all("val" in n.meta for n in created)
    assert "# <- consume-grads" in record.after and "# <- consume-grads" not in record.before

    buf1, buf2 = torch.full_like(g_w1, float("nan")), torch.full_like(g_w2, float("nan"))
    outs = gm(*args, torch.tensor(True), buf1, torch.tensor(True), buf2)
    assert outs[0] is None and outs[2] is None and outs[3] is None
    torch.testing.assert_close(outs[1], g_b1)  # untouched slot still returned
    # fresh=True: the buffer's old contents (NaN here) are ignored, as eager's `.grad = g`.
    torch.testing.assert_close(buf1, g_w1)
    torch.testing.assert_close(buf2, g_w2)
    gm(*args, torch.tensor(False), buf1, torch.tensor(False), buf2)
    # fresh=False: accumulate, as a second backward without zero_grad does.
    torch.testing.assert_close(buf1, 2 * g_w1)
    torch.testing.assert_close(buf2, 2 * g_w2)


def test_uuid_tracks_options():
    a, b = ConsumeGradients((GradSlot(0),)), ConsumeGradients((GradSlot(1),))
    assert a.uuid() != b.uuid() and a.uuid() == ConsumeGradients((GradSlot(0),)).uuid()


def test_inlined_consumers_reject_in_place_ops_inductor_cannot_lower():
    """A consumer with `clamp_` on an intermediate is refused at trace time; `copy_` into a buffer is not.

    Inductor has no lowering for `aten.clamp_` and builds a fallback, which raises when CI is set
    (the 8-bit projector's quantizer once did this: CI failed, local runs passed). Reference: the
    same functions traced by make_fx, and the op lookup in Inductor's own lowering table.
    """
    from torch._inductor.lowering import lowerings
    from torch.fx.experimental.proxy_tensor import make_fx

    from lowrank_compile.passes.consume_grads import _reject_aten_mutation

    def clamps(x):
        return (x * 2).clamp_(0, 1)

    def copies(buf, x):
        buf.copy_(x * 2)
        return buf

    x = torch.randn(4)
    gm = make_fx(clamps)(x)
    assert torch.ops.aten.clamp_.default in [n.target for n in gm.graph.nodes]
    assert torch.ops.aten.clamp_.default not in lowerings
    with pytest.raises(RuntimeError, match=r"'clamps' traced to the in-place op aten\.clamp_"):
        _reject_aten_mutation(gm.graph, clamps)
    gm2 = make_fx(copies)(torch.zeros(4), x)
    assert torch.ops.aten.copy_.default in [n.target for n in gm2.graph.nodes]
    _reject_aten_mutation(gm2.graph, copies)  # lowered by Inductor: accepted
