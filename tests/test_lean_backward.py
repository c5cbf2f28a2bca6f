"""clip_stats="auto": after a step that no clip preceded, the backward skips what only clipping reads.

The "lean" variant of a backward graph accumulates R = proj(G) without sum(G^2), max|G| or the
clip sketch, and makes R from the factors of G = dY^T X (two thin GEMMs) instead of forming G.
References: `_project` on the formed G (unit test), the same training run with
clip_stats="always" (every step forms G, as before), and an eager copy of the model for the norm
a clip reads once the statistics are back.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import mlp40
from models import mlp40_batch
from models import mlp_loss

import lowrank_compile
from lowrank_compile import LowRankOptionError
from lowrank_compile import pipeline
from lowrank_compile.backend import all_backends
from lowrank_compile.config import parse_options
from lowrank_compile.passes.consume_grads import _project
from lowrank_compile.passes.consume_grads import _project_factors
from lowrank_compile.runtime.clip import LowRankClipError
from lowrank_compile.runtime.state import lookup


# The two paths multiply the same three matrices in a different order: float rounding only.
@pytest.mark.parametrize(
    ("dtype", "atol", "rtol"),
    [(torch.float32, 1e-5, 1e-5), (torch.float64, 1e-12, 1e-12), (torch.bfloat16, 0.1, 0.05)],
)
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
def test_project_factors_is_projecting_the_product(dtype, atol, rtol, left, transposed):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(24, 13, generator=gen, dtype=torch.float64).to(dtype)  # an odd token count
    b = torch.randn(13, 40, generator=gen, dtype=torch.float64).to(dtype)
    g = (a @ b).t() if transposed else a @ b
    d = g.shape[0] if left else g.shape[1]
    p = torch.linalg.qr(torch.randn(d, 5, generator=gen, dtype=torch.float64)).Q.to(dtype)
    ref = _project(g.double(), p.double(), left, torch.float64)  # the formed G, in float64
    got = _project_factors(a, b, p, left, transposed, torch.float32 if dtype == torch.bfloat16 else dtype)
    torch.testing.assert_close(got.double(), ref, atol=atol, rtol=rtol)


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return mlp40_batch(i, base=700)


def _variant_calls() -> dict[str, int]:
    calls: dict[str, int] = {}
    for be in all_backends():
        for g in be.graphs:
            for name, n in g.variant_calls.items():
                calls[name] = calls.get(name, 0) + n
    return calls


def _run(options, steps, clip_at=(), on_clip=None):
    """Train `steps` steps; clip_grad_norm_(1.0) before opt.step() at the steps in `clip_at`."""
    lowrank_compile.reset()
    torch._dynamo.reset()
    model = mlp40()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    @torch.compile(backend="lowrank", options={"rank": 8, "update_gap": 3, "min_dim": 32, **options})
    def fwd_bwd(b):
        loss = mlp_loss(model, b)
        loss.backward()
        return loss

    norms = []
    for i in range(steps):
        fwd_bwd(_batch(i))
        if i in clip_at:
            if on_clip is not None:
                on_clip(i, model)
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())
        opt.step()
        opt.zero_grad()
    return model, norms


@pytest.fixture
def graphs(monkeypatch):
    """The backward graphs as the passes leave them, with their slots, per variant compiled."""
    seen = []
    real = pipeline.backward_passes

    def spy(gm, slots):
        records = real(gm, slots)
        seen.append((gm, list(slots)))
        return records

    monkeypatch.setattr(pipeline, "backward_passes", spy)
    return seen


def _full_gradient_mms(gm: torch.fx.GraphModule, shapes: set[tuple[int, ...]]) -> int:
    """mm nodes whose result has the shape of a projected weight (or its transpose): a formed G."""
    return sum(
        1
        for n in gm.graph.nodes
        if n.target is torch.ops.aten.mm.default and tuple(n.meta["val"].shape) in shapes
    )


def test_lean_after_a_step_without_clip(graphs) -> None:
    # update_gap=3, 7 steps: refresh steps 1, 4, 7 (svd: they need G), lean steps between.
    ref, _ = _run({"clip_stats": "always"}, 7)
    assert _variant_calls() == {"refresh": 3, "steady": 4}
    graphs.clear()
    got, _ = _run({}, 7)
    assert _variant_calls() == {"refresh": 3, "lean": 4}
    shapes = {s for p in got.parameters() if (st := lookup(p)) and st.proj for s in (p.shape, p.shape[::-1])}
    assert len(shapes) == 4  # two projected matrices
    lean = [(gm, s) for gm, s in graphs if any(x.direct for x in s)]
    assert len(lean) == 1 and len(graphs) == 2  # compiled at first use: refresh at step 1, lean at 2
    gm, slots = lean[0]
    assert all(not x.stats and x.clip_k == 0 for x in slots if x.mode == "project")
    assert _full_gradient_mms(gm, shapes) == 0  # no G formed for the projected matrices
    assert _full_gradient_mms(graphs[0][0], shapes) == 2  # the refresh variant forms both
    # Same three matrices multiplied in another order, then 7 AdamW steps: rounding only
    # (measured 2.5e-7 on weights of size ~0.1).
    for (n, a), b in zip(got.named_parameters(), ref.parameters()):
        assert (a - b).abs().max().item() <= 1e-5, n


def test_clip_on_the_first_step_keeps_the_statistics() -> None:
    # update_gap=3, 4 steps: refresh steps 1 and 4, steady (never lean) between.
    _, norms = _run({}, 4, clip_at=range(4))
    assert _variant_calls() == {"refresh": 2, "steady": 2}
    _, ref = _run({"clip_stats": "always"}, 4, clip_at=range(4))
    assert norms == ref  # the same graphs on the same data


def test_clip_after_lean_steps_raises_then_recovers() -> None:
    # Steps 1 and 2 without clip (step 2 is lean), then a clip on step 3 (lean too): refused,
    # nothing scaled. From step 4 on the statistics are back and the clip reads the exact norm.
    lowrank_compile.reset()
    torch._dynamo.reset()
    model = mlp40()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    @torch.compile(backend="lowrank", options={"rank": 8, "update_gap": 10, "min_dim": 32})
    def fwd_bwd(b):
        mlp_loss(model, b).backward()

    for i in range(2):
        fwd_bwd(_batch(i))
        opt.step()
        opt.zero_grad()
    fwd_bwd(_batch(2))
    states = [st for p in model.parameters() if (st := lookup(p)) is not None and st.proj is not None]
    assert len(states) == 2 and all(st.no_stats for st in states)
    before = [st.proj.r_acc.clone() for st in states]
    with pytest.raises(LowRankClipError, match="clip_stats"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert all(torch.equal(b, st.proj.r_acc) for b, st in zip(before, states))  # nothing was scaled
    opt.step()
    opt.zero_grad()
    eager = copy.deepcopy(model)
    fwd_bwd(_batch(3))
    assert _variant_calls() == {"refresh": 1, "lean": 2, "steady": 1}
    mlp_loss(eager, _batch(3)).backward()
    exact = torch.nn.utils.get_total_norm([p.grad for p in eager.parameters()]).item()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
    # One backward call: sum(G^2) is exact; the compiled and eager gradients differ by rounding.
    assert norm == pytest.approx(exact, rel=1e-5)


def test_clip_stats_option_is_checked() -> None:
    with pytest.raises(LowRankOptionError, match="'clip_stats'.*auto.*always"):
        parse_options({"clip_stats": "never"})
