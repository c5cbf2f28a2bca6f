"""Issue 19: schedulers that change betas, momentum or weight decay every step recompile nothing.

float64 models, as in test_scheduler.py: this is about hyper-parameter plumbing, and in float64
the compiled update is eager-exact (derived constants such as 1 - beta1 are computed in float64
and rounded once, as eager's Python doubles are).
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import mlp
from models import mlp_batch
from models import mlp_loss
from torch._dynamo.utils import counters

from lowrank_compile.runtime.state import lookup

FULL = {"rank": None, "state_bits": 32, "min_dim": 4}
PROJECTED = {"rank": 8, "update_gap": 3, "state_bits": 32, "min_dim": 4}
STEPS = 12


def _onecycle(opt):
    # cycle_momentum=True (the default): betas[0] moves between 0.85 and 0.95 every step.
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=STEPS + 1)


def _cyclic(opt):
    # cycle_momentum=True (the default): SGD's momentum moves between 0.8 and 0.9 every step.
    return torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-3, max_lr=1e-2, step_size_up=4)


class _WeightDecaySchedule:
    """A per-step weight-decay schedule, as LLM and ViT recipes use (cosine from 0.1 to 0.01)."""

    def __init__(self, opt):
        self.opt, self.t = opt, 0

    def step(self):
        import math

        self.t += 1
        for g in self.opt.param_groups:
            g["weight_decay"] = 0.01 + 0.045 * (1 + math.cos(math.pi * self.t / STEPS))


CASES = {
    "onecycle-adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.05), _onecycle),
    "onecycle-adam-amsgrad": (lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True), _onecycle),
    "cyclic-sgd-momentum-dampening": (
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01),
        _cyclic,
    ),
    "cyclic-sgd-nesterov": (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True), _cyclic),
    "wd-adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1), _WeightDecaySchedule),
    "wd-adam-l2": (lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.1), _WeightDecaySchedule),
    # maximize: torch negates the gradient, then adds the L2 decay (it still pulls towards 0).
    "wd-adam-l2-maximize": (
        lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=0.1, maximize=True),
        _WeightDecaySchedule,
    ),
    "wd-sgd-l2": (lambda ps: torch.optim.SGD(ps, lr=1e-2, weight_decay=0.1), _WeightDecaySchedule),
}


def _run(model, case, options):
    make_opt, make_sched = CASES[case]
    opt = make_opt(model.parameters())
    sched = make_sched(opt)

    def step(b):
        mlp_loss(model, b).backward()
        opt.step()
        opt.zero_grad()

    fn = step if options is None else torch.compile(step, backend="lowrank", options=options)
    seen, hps = [], []
    for i in range(STEPS):
        x, y = mlp_batch(i)
        fn((x.double(), y))
        sched.step()
        seen.append((counters["stats"]["unique_graphs"], counters["frames"]["total"]))
        g = opt.param_groups[0]
        hps.append((g.get("betas"), g.get("momentum"), g["weight_decay"]))
    return seen, hps


@pytest.mark.parametrize("case", list(CASES))
def test_hyper_parameter_schedule_recompiles_nothing_and_matches_eager(case):
    base = mlp().double()
    eager = copy.deepcopy(base)
    _, eager_hps = _run(eager, case, None)
    counters.clear()
    model = copy.deepcopy(base)
    seen, hps = _run(model, case, FULL)
    assert hps == eager_hps and all(a != b for a, b in zip(hps, hps[1:]))  # changed every step
    assert lookup(model[0].weight) is not None
    # After warm-up nothing compiles again. Warm-up is the first step (forward/backward graph and
    # update), and for SGD with dampening the second: its first update differs from a step on zero
    # states (the buffer starts as a copy of the gradient), so the steady update compiles then.
    warm = 2 if "dampening" in case else 1
    assert all(s == seen[warm - 1] for s in seen[warm:]), f"recompiled after warm-up: {seen}"
    # Eager-exact in float64 (bound: 1e-12 relative; the update is the optimizer's own code).
    for (n, pe), (_, pl) in zip(eager.named_parameters(), model.named_parameters()):
        err = ((pl - pe).abs().max() / pe.abs().max()).item()
        assert err <= 1e-12, (n, err)


def test_projected_onecycle_recompiles_nothing():
    """Projected parameters, refreshes included: OneCycleLR's betas and lr changes never recompile."""
    counters.clear()
    model = mlp().double()
    seen, _ = _run(model, "onecycle-adamw", PROJECTED)
    pj = lookup(model[0].weight).proj
    assert pj is not None and pj.refreshes == 4
    assert all(s == seen[0] for s in seen[1:]), f"recompiled after step 1: {seen}"


def test_structural_changes_retrace_once_and_are_reported():
    """weight_decay -> 0 and back is structural for full-rank SGD (0 * inf would be NaN); nesterov
    is a bool. Each change traces once, `binding.retraces` (what `lowrank-compile inspect`
    prints) names it; value changes in between record nothing."""
    from lowrank_compile.cli import inspect_report
    from lowrank_compile.runtime.binding import binding_of

    model = mlp().double()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)

    @torch.compile(backend="lowrank", options=FULL)
    def step(b):
        mlp_loss(model, b).backward()
        opt.step()
        opt.zero_grad()

    for i in range(6):
        if i == 2:
            opt.param_groups[0]["nesterov"] = True
        opt.param_groups[0]["momentum"] = 0.9 - 0.01 * i  # lifted: never a retrace
        x, y = mlp_batch(i)
        step((x.double(), y))
    retraces = binding_of(opt).retraces
    assert [r["update"] for r in retraces] == [2], retraces
    assert retraces[0]["changes"] == [("nesterov", False, True)]
    assert inspect_report(6)["hyper_parameter_retraces"][0]["changes"] == [("nesterov", False, True)]


def test_fp32_lifted_betas_round_derived_constants_once():
    """fp32 AdamW with beta1 = 0.9 lifted: 1 - beta1 is computed in float64 and rounded once.

    torch.optim's tensor path casts beta1 to float32 first: fp32(1 - fp32(0.9)) = 0.10000002 against
    eager's fp32(1 - 0.9) = 0.10000000. The rewrite must have fired (no cast feeds the
    subtraction), and the rule must match eager AdamW given the same gradients: measured within
    one fp32 ulp per step (the decomposed addcmul/addcdiv round on their own); bound 1e-6 relative.
    """
    from lowrank_compile.runtime import rules

    group = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    rule = rules.trace_rule(torch.optim.AdamW, group, {}, {}, torch.float32)
    assert rule.hp_keys == (("betas", 0), ("betas", 1), ("eps", None))
    for gm in (rule.first, rule.step):
        for n in gm.graph.nodes:
            if n.target is torch.ops.aten.rsub.Scalar:
                assert n.args[0].target is not torch.ops.aten._to_copy.default, gm.code
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(4096, generator=gen)
    eager = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([eager], foreach=False, **group)
    p, states = p0.clone(), None
    lr = torch.tensor(group["lr"], dtype=torch.float64)
    hps = [torch.tensor(v, dtype=torch.float64) for v in rule.hp_values(group)]
    for _ in range(4):
        g = torch.randn(4096, generator=gen)
        eager.grad = g.clone()
        opt.step()
        if states is None:
            states = list(rule.first(p, g.clone(), lr, *hps))
        else:
            rule.step(p, g.clone(), lr, *hps, *states)
    err = ((p - eager.detach()).abs().max() / eager.detach().abs().max()).item()
    assert err <= 1e-6, err
