"""Activation checkpointing and the backend (issue #20): the plan sees through recomputed regions.

Dynamo hands a checkpointed block over as `tag_activation_checkpoint(body, *operands)` (for
`use_reentrant=False`, and for reentrant checkpointing too, which it turns into the same op);
transformers' `gradient_checkpointing_enable()` also graph-breaks between the decoder and the
LM head. Without looking into the body every matrix looked unused by a matmul and was kept
full-rank (measured: 0 of 14 projected). The reference for each checkpointed run is the same
model trained by the same compiled step without checkpointing: recomputation changes no value,
so the trajectories agree to fp32 rounding.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import make_step
from helpers import worst_rel_err
from models import llama
from torch import nn
from torch.utils.checkpoint import checkpoint

from lowrank_compile.passes.base import pass_counters
from lowrank_compile.runtime.state import decided
from lowrank_compile.runtime.state import lookup

OPTIONS = {"rank": 4, "min_dim": 4, "update_gap": 2}  # a refresh at updates 0 and 2
SIDE_EFFECTS_FLAG = {"skip_fwd_side_effects_in_bwd_under_checkpoint": True}


def _train(model, batches, loss_fn, options=OPTIONS):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    compiled = torch.compile(make_step(model, opt, loss_fn), backend="lowrank", options=options)
    before = pass_counters["consume-grads"]
    losses = [compiled(b).detach() for b in batches]
    fired = pass_counters["consume-grads"] - before
    projected = sorted(n for n, p in model.named_parameters() if (s := lookup(p)) is not None and s.proj)
    return losses, projected, fired


def _llama_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


# reentrant is slow (~270 s cold): the custom model's per-block case below runs torch's reentrant
# checkpoint in the default suite, and non_reentrant runs HF's own gradient_checkpointing here.
@pytest.mark.parametrize("mode", [pytest.param("reentrant", marks=pytest.mark.slow), "non_reentrant"])
def test_hf_gradient_checkpointing_projects_the_same_matrices(mode):
    import lowrank_compile

    base = llama(hidden=32, layers=2)
    base.train()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 96, (2, 12), generator=gen) for _ in range(4)]
    plain, ckpt = copy.deepcopy(base), copy.deepcopy(base)
    ref_losses, ref_proj, _ = _train(plain, batches, _llama_loss)
    lowrank_compile.reset()
    if mode == "reentrant":
        ckpt.gradient_checkpointing_enable()  # transformers' default
    else:
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers >= 5.25 wraps attention in the `kernels` package's context variable, a side
    # effect Dynamo refuses inside a checkpoint unless told to skip its replay (the flag users set;
    # test_a_checkpointed_side_effect_is_said_and_the_flag_compiles_it covers the case without).
    with warnings.catch_warnings(record=True) as caught, torch._dynamo.config.patch(SIDE_EFFECTS_FLAG):
        warnings.simplefilter("always")
        losses, proj, fired = _train(ckpt, batches, _llama_loss)
    assert ckpt.is_gradient_checkpointing
    assert len(ref_proj) == 14 and proj == ref_proj  # every attention and MLP matrix
    assert fired > 0  # the backward consumed gradients (inside the recomputed region too)
    assert not [w for w in caught if "cannot tell whether" in str(w.message)]
    assert not [w for w in caught if "no graph compiled by the backend covered" in str(w.message)]
    # fp32: both compile the same forward and backward math; the recomputed forward is
    # bit-identical to the saved one, so only Inductor's fusion order differs (measured ~1e-7).
    err, where = worst_rel_err(ckpt, plain)
    assert err <= 1e-5, (err, where)
    assert torch.allclose(torch.stack(losses), torch.stack(ref_losses), rtol=1e-5)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


def _save_matmuls(ctx, op, *args, **kwargs):
    """A selective-checkpointing policy: keep matmul outputs, recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    if op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class Net(nn.Module):
    def __init__(self, d: int = 24, blocks: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))
        self.head = nn.Linear(d, 5)
        self.ckpt: str | None = None
        self.side_effect = False  # each block sets and restores a module-level "active block"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.inp(x)))

    def body(self, h: torch.Tensor) -> torch.Tensor:
        # Its own frame, as transformers' decoder loop: a break inside runs only this eagerly.
        for blk in self.blocks:
            b = functools.partial(_marking, blk) if self.side_effect else blk
            if self.ckpt == "non_reentrant":
                h = checkpoint(b, h, use_reentrant=False)
            elif self.ckpt == "reentrant":
                h = checkpoint(b, h, use_reentrant=True)
            elif self.ckpt == "selective":
                from torch.utils.checkpoint import create_selective_checkpoint_contexts

                ctx = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)
                h = checkpoint(b, h, use_reentrant=False, context_fn=ctx)
            else:
                h = b(h)
        return h


class _Active:
    """Python state outside the checkpointed region (like `kernels`' CompileableContextVar)."""

    block: nn.Module | None = None


ACTIVE = _Active()


def _marking(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Run `block` with ACTIVE.block set to it: a set-and-restore side effect, net zero."""
    prev, ACTIVE.block = ACTIVE.block, block
    try:
        return block(h)
    finally:
        ACTIVE.block = prev


def _net_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


# non_reentrant (~85 s cold) is `slow`: test_a_checkpointed_side_effect_is_said_and_the_flag_compiles_it
# trains the same Net under non-reentrant checkpointing (with the flag) against the same
# reference, with the same assertions; reentrant and selective stay in the default suite.
@pytest.mark.parametrize(
    "mode", [pytest.param("non_reentrant", marks=pytest.mark.slow), "reentrant", "selective"]
)
def test_custom_model_with_torch_checkpoint_per_block(mode):
    import lowrank_compile

    torch.manual_seed(0)
    base = Net()
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(6, 8, generator=gen), torch.randint(0, 5, (6,), generator=gen)) for _ in range(4)]
    plain = copy.deepcopy(base)
    ckpt = copy.deepcopy(base)
    ckpt.ckpt = mode
    ref_losses, ref_proj, _ = _train(plain, batches, _net_loss)
    lowrank_compile.reset()
    losses, proj, fired = _train(ckpt, batches, _net_loss)
    # inp feeds the blocks, up and down are hidden; head is the output layer (full-rank).
    assert ref_proj == sorted(
        ["inp.weight"] + [f"blocks.{i}.{n}.weight" for i in range(3) for n in ("up", "down")]
    )
    assert proj == ref_proj and fired > 0
    err, where = worst_rel_err(ckpt, plain)
    assert err <= 1e-5, (err, where)
    assert torch.allclose(torch.stack(losses), torch.stack(ref_losses), rtol=1e-5)


def test_a_graph_break_that_hides_the_output_layer_is_said_once():
    """A plain model whose step graph-breaks after a hidden layer: the plan cannot tell, and says so."""
    torch.manual_seed(0)

    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 24)
            self.b = nn.Linear(24, 5)

        def forward(self, x):
            h = self.a(x)
            torch._dynamo.graph_break()
            return self.b(torch.relu(h))

    model = Broken()
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, 8, generator=gen), torch.randint(0, 5, (6,), generator=gen)) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, proj, _ = _train(model, batches, _net_loss)
    said = [str(w.message) for w in caught if "cannot tell whether" in str(w.message)]
    # The graph holds only `a`'s parameters, so discovery names them within `a` ("weight").
    assert len(said) == 1 and "cannot tell whether weight " in said[0], said
    assert proj == []  # conservative: a stays full-rank, b is the real output layer
    assert lookup(model.a.weight) is not None and lookup(model.a.weight).proj is None


def test_a_checkpointed_side_effect_is_said_and_the_flag_compiles_it():
    """A checkpointed block that mutates outside Python state runs eagerly: said, never silent.

    Dynamo graph-breaks on the whole checkpoint region (a HOP may not mutate outside state), so
    the blocks' matrices reach no graph and torch.optim trains them at full size. The backend
    names them and the Dynamo flag; with the flag set, the region compiles and they are projected.
    """
    import lowrank_compile

    torch.manual_seed(0)
    base = Net()
    gen = torch.Generator().manual_seed(4)
    batches = [(torch.randn(6, 8, generator=gen), torch.randint(0, 5, (6,), generator=gen)) for _ in range(3)]
    plain, broken, flagged = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    for m in (broken, flagged):
        m.ckpt, m.side_effect = "non_reentrant", True
    ref_losses, ref_proj, _ = _train(plain, batches, _net_loss)
    lowrank_compile.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, proj, _ = _train(broken, batches, _net_loss)
    said = [str(w.message) for w in caught if "no graph compiled by the backend covered" in str(w.message)]
    # The graph before the break holds only `inp`: taken over, kept full-rank (it may be an
    # output layer, test_a_graph_break_that_hides_the_output_layer_is_said_once).
    assert proj == [] and lookup(broken.inp.weight) is not None
    assert len(said) == 1 and said[0].startswith("lowrank: 6 matrices"), said  # 3 blocks x (up, down)
    assert "skip_fwd_side_effects_in_bwd_under_checkpoint = True" in said[0]
    for b in broken.blocks:  # no graph planned them: torch.optim's own full-size AdamW states
        assert decided(b.up.weight) is None and decided(b.down.weight) is None
    lowrank_compile.reset()
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught, torch._dynamo.config.patch(SIDE_EFFECTS_FLAG):
        warnings.simplefilter("always")
        losses, proj, fired = _train(flagged, batches, _net_loss)
    assert proj == ref_proj and fired > 0
    assert not [w for w in caught if "no graph compiled by the backend covered" in str(w.message)]
    assert ACTIVE.block is None  # the side effect ran (once per forward) and was undone
    err, where = worst_rel_err(flagged, plain)
    assert err <= 1e-5, (err, where)  # as the per-block test: fp32, recomputation changes no value
    assert torch.allclose(torch.stack(losses), torch.stack(ref_losses), rtol=1e-5)
