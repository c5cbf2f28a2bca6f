"""The per-parameter plan and the discovery of owners/names (no compilation)."""

from __future__ import annotations

import torch
from torch import nn

from lowrank_compile import LowRankConfig
from lowrank_compile.discovery import find_owners
from lowrank_compile.plan import Kind
from lowrank_compile.plan import ParamInfo
from lowrank_compile.plan import make_plan


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 48)
        self.block = nn.ModuleDict({"q_proj": nn.Linear(48, 48), "norm": nn.LayerNorm(48)})
        self.conv = nn.Conv1d(48, 40, 3)
        self.tiny = nn.Linear(48, 8)
        self.frozen = nn.Linear(48, 48)
        self.frozen.requires_grad_(False)


def _plan(model, opt, roles=None, **cfg):
    owners = find_owners(list(model.parameters()))
    roles = roles or {}
    infos = [
        ParamInfo(
            owners.name_of(p, "?"), p, owners.optimizer_of(p), roles.get(owners.name_of(p, "?"), "other")
        )
        for p in model.parameters()
    ]
    return {pp.name: pp for pp in make_plan(infos, LowRankConfig(**cfg)).params}


ROLES = {
    "embed.weight": "embedding",
    "block.q_proj.weight": "matmul",
    "conv.weight": "conv",
    "tiny.weight": "output",
}


def test_default_rank_none_plan():
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plan = _plan(model, opt, rank=None, min_dim=16)
    kinds = {n: p.kind for n, p in plan.items()}
    assert kinds == {
        "embed.weight": Kind.FULL,
        "block.q_proj.weight": Kind.FULL,
        "block.q_proj.bias": Kind.TORCH,
        "block.norm.weight": Kind.TORCH,
        "block.norm.bias": Kind.TORCH,
        "conv.weight": Kind.FULL,  # 40 x (48*3): flattened trailing dims
        "conv.bias": Kind.TORCH,
        "tiny.weight": Kind.TORCH,  # short side 8 < 16
        "tiny.bias": Kind.TORCH,
        "frozen.weight": Kind.TORCH,
        "frozen.bias": Kind.TORCH,
    }
    assert plan["tiny.weight"].reason == "short side 8 < min_dim=16"
    assert plan["frozen.weight"].reason == "requires_grad=False"
    assert plan["block.q_proj.bias"].reason.startswith("1-D")
    # AdamW: two fp32 states and an fp32 step counter in torch.optim.
    assert plan["embed.weight"].eager_state_bytes == 2 * 100 * 48 * 4 + 4
    # The default state_bits=8: 4800 values >= 4096, so 19 blocks of 256 codes + 19 fp32 absmax
    # per state, and a float64 step counter.
    assert plan["embed.weight"].state_bytes == 2 * (19 * 256 + 19 * 4) + 8
    assert not any(p.surprising for p in plan.values())


def test_default_projected_plan_follows_roles():
    model = Net()
    opt = torch.optim.AdamW(model.parameters())
    plan = _plan(model, opt, roles=ROLES, rank=0.25, min_dim=4)
    assert plan["block.q_proj.weight"].kind is Kind.PROJECTED
    assert plan["block.q_proj.weight"].rank == 12 and plan["block.q_proj.weight"].side == "right"
    # states: 2 (AdamW) x 48 x 12 values, fp32 (576 < 4096 values: not quantized) + float64 step
    # counter; projector 48 x 12 fp32
    assert plan["block.q_proj.weight"].state_bytes == 2 * 48 * 12 * 4 + 8
    assert plan["block.q_proj.weight"].projector_bytes == 48 * 12 * 4
    assert plan["embed.weight"].kind is Kind.FULL and plan["embed.weight"].reason.startswith("embedding")
    assert plan["conv.weight"].kind is Kind.FULL and plan["conv.weight"].reason.startswith("conv kernel")
    assert plan["tiny.weight"].kind is Kind.FULL and plan["tiny.weight"].reason.startswith("output layer")
    plan = _plan(model, opt, roles=ROLES, rank=48, min_dim=4)  # rank >= short side: nothing to gain
    assert (
        plan["block.q_proj.weight"].kind is Kind.FULL
        and "rank 48 >= short side 48" in plan["block.q_proj.weight"].reason
    )


def test_include_names_projection_targets_and_exclude_leaves_alone():
    model = Net()
    opt = torch.optim.AdamW(model.parameters())
    plan = _plan(model, opt, roles=ROLES, rank=8, min_dim=16, exclude=("embed.*",))
    assert (
        plan["embed.weight"].kind is Kind.TORCH and plan["embed.weight"].reason == "matched by option exclude"
    )
    # include overrides the role: the embedding is projected, the attention matrix is not.
    plan = _plan(model, opt, roles=ROLES, rank=8, min_dim=16, include=("embed.*",))
    assert plan["embed.weight"].kind is Kind.PROJECTED and plan["embed.weight"].reason.startswith(
        "matched by option include"
    )
    assert plan["block.q_proj.weight"].kind is Kind.FULL
    assert plan["block.q_proj.weight"].reason == "not matched by option include"
    assert plan["conv.weight"].kind is Kind.FULL  # matched, but only matrices are projected: stays full-rank
    plan = _plan(model, opt, roles=ROLES, rank=8, min_dim=16, include=("conv.*",))
    assert (
        plan["conv.weight"].kind is Kind.FULL
        and plan["conv.weight"].reason == "3-D: only matrices are projected"
    )


def test_unsupported_optimizer_and_settings_are_surprising():
    model = Net()
    opt = torch.optim.RMSprop(model.parameters())
    plan = _plan(model, opt, min_dim=16)
    assert all(p.kind is Kind.TORCH for p in plan.values())
    assert plan["embed.weight"].surprising and "RMSprop is not supported" in plan["embed.weight"].reason

    model = Net()
    opt = torch.optim.Adam(model.parameters(), differentiable=True)
    plan = _plan(model, opt, min_dim=16)
    assert plan["embed.weight"].kind is Kind.TORCH and "differentiable=True" in plan["embed.weight"].reason
    # fused=True is supported (HF Trainer's default optimizer is AdamW(fused=True)).
    model = Net()
    opt = torch.optim.Adam(model.parameters(), fused=True)
    plan = _plan(model, opt, roles=ROLES, rank=8, min_dim=16)
    assert plan["embed.weight"].kind is Kind.FULL and plan["block.q_proj.weight"].kind is Kind.PROJECTED


def test_param_without_or_with_two_optimizers():
    model = Net()
    opt = torch.optim.SGD([model.embed.weight], lr=0.1)
    opt2 = torch.optim.SGD([model.embed.weight, model.block.q_proj.weight], lr=0.1)
    plan = _plan(model, opt, min_dim=16)
    assert "more than one" in plan["embed.weight"].reason and plan["embed.weight"].surprising
    assert plan["block.q_proj.weight"].kind is Kind.FULL and plan["block.q_proj.weight"].optimizer == "SGD"
    assert plan["conv.weight"].reason == "no torch.optim optimizer holds it"
    del opt, opt2


def test_names_come_from_the_outermost_holder_without_wrapper_prefix():
    inner = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    wrapper = nn.ModuleDict({"model": inner})
    owners = find_owners(list(inner.parameters()))
    # `wrapper` and `inner` hold the same parameters; the innermost such module names them.
    assert [owners.name_of(p, "?") for p in inner.parameters()] == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
    ]
    del wrapper


def test_plan_table_totals():
    model = Net()
    opt = torch.optim.AdamW(model.parameters())  # alive during the scan below
    owners = find_owners(list(model.parameters()))
    infos = [ParamInfo(owners.name_of(p, "?"), p, owners.optimizer_of(p)) for p in model.parameters()]
    plan = make_plan(infos, LowRankConfig(rank=None, state_bits=32, min_dim=16))
    ours, eager = plan.state_bytes()
    assert eager == sum(p.eager_state_bytes for p in plan.params) > 0
    # Full-rank fp32 states cost what torch.optim's do, except the step counters: 8 B each
    # (float64) in the backend, 4 B in torch.optim.
    assert ours - eager == 4 * sum(1 for p in plan.params if p.kind is Kind.FULL)
    assert (
        plan.table()
        .splitlines()[-1]
        .startswith(f"optimizer state: {ours} B under the plan vs {eager} B eager")
    )
    assert all(p.optimizer == type(opt).__name__ for p in plan.params if p.kind is Kind.FULL)
