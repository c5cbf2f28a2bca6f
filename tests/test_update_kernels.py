"""The compiled optimizer update: static shapes, vectorized loops, scalar terms computed once.

The update of a model with several parameter shapes used to become dynamic-shaped at its second
shape (Dynamo's automatic dynamic shapes), and Inductor then emitted scalar CPU loops; its scalar
terms (Adam's bias corrections) were evaluated once per vector of elements. These tests read the
C++ that Inductor generates for the update and count what was compiled.
"""

from __future__ import annotations

import re
from unittest import mock

import pytest
import torch

import lowrank_compile
from lowrank_compile.passes.base import PROVENANCE_KEY
from lowrank_compile.passes.base import pass_counters
from lowrank_compile.passes.hoist_scalars import HoistScalars
from lowrank_compile.runtime.binding import binding_of


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Three matrix shapes the backend takes over, (64, 48), (64, 64), (40, 64); the two biases
    # (1-D) stay with torch.optim.
    return torch.nn.Sequential(
        torch.nn.Linear(48, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 40)
    )


def _compiled_code(fn) -> list[str]:
    """The Python+C++ source of every graph Inductor compiles while `fn()` runs.

    (`torch._inductor.utils.run_and_get_code` would reset Dynamo first: every graph recompiles.)
    """
    from torch._inductor.graph import GraphLowering

    codes: list[str] = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        fn()
    return codes


def _loops(code: str) -> list[str]:
    """The bodies of the outermost `#pragma omp for` loops of every C++ kernel in `code`."""
    return [chunk.split("#pragma omp single")[0] for chunk in code.split("#pragma omp for")[1:]]


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.Adam])
def test_update_kernels_are_static_vectorized_and_hoisted(opt_cls):
    lowrank_compile.reset()
    model = _model()
    opt = opt_cls(model.parameters(), lr=1e-2, weight_decay=0.1)
    fwbw = torch.compile(
        lambda x: model(x).square().mean().backward(),
        backend="lowrank",
        options={"rank": None, "state_bits": 32},
    )
    x = torch.randn(6, 48)
    fwbw(x)
    binding = binding_of(opt)
    assert binding is not None and len(binding.states) == 3  # every matrix taken over
    hoisted = pass_counters["hoist-scalars"]

    # The first update compiles one graph per shape; Inductor's FX graph cache off, so the passes
    # run here and their counters count.
    with torch._inductor.config.patch(fx_graph_cache=False):
        codes = _compiled_code(opt.step)
    assert len(codes) == 3, [c[:200] for c in codes]
    # The scalar terms were realized once per update graph (bias corrections, step size, decay).
    assert pass_counters["hoist-scalars"] - hoisted >= 3 * 2
    for code in codes:
        # Static: no symbolic size arguments (ks0, ...) in any kernel signature.
        assert not re.search(r"\bks\d+\b", code), code
        loops = _loops(code)
        big = [body for body in loops if "Vectorized<float>::loadu" in body]
        assert big, code  # the elementwise update is a vectorized loop
        for body in big:
            # ... and no scalar term is recomputed inside it (Adam's pow(beta, step)).
            assert "std::pow" not in body, body

    # Later updates compile nothing: each (kind, shape) compiled once, no recompiles.
    opt.zero_grad()
    fwbw(x)
    assert _compiled_code(opt.step) == []
    assert len(binding._compiled) == 3

    # The update equals torch.optim's on the same gradients (same model copy, eager).
    ref_model = _model()
    ref_opt = opt_cls(ref_model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        ref_opt.zero_grad()
        ref_model(x).square().mean().backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        # fp32 rounding only: the rule is torch.optim's own, traced; Inductor may reassociate.
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_hoist_scalars_wraps_only_scalar_terms_read_by_elementwise_nodes():
    from torch.fx.experimental.proxy_tensor import make_fx

    def update(p, m, g, step, beta):
        bc = 1 - beta**step  # scalar subgraph: one term an elementwise node reads
        m2 = m * beta + (1 - beta) * g
        return p - 0.1 * m2 / bc, step + 1

    args = (torch.randn(64), torch.randn(64), torch.randn(64), torch.tensor(3.0), torch.tensor(0.9))
    gm = make_fx(update, tracing_mode="fake")(*args)
    expected = gm(*args)
    record = HoistScalars()(gm)
    made = [n for n in gm.graph.nodes if n.meta.get(PROVENANCE_KEY) == "hoist-scalars"]
    # `1 - beta ** step` (read by the division) and `1 - beta` (read by the multiply) are
    # wrapped; `step + 1` only reaches the output, and vector nodes are never wrapped.
    assert record.rewrites == 2 == len(made)
    for node in made:
        (src,) = node.all_input_nodes
        assert src.meta["val"].numel() == 1
    for got, want in zip(gm(*args), expected):
        assert torch.equal(got, want)  # an identity: values unchanged bit for bit
