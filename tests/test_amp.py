"""Mixed precision: GradScaler (fp16-style loss scaling) and bf16 autocast keep eager semantics.

SGD is used where trajectories are compared: its update is linear in the gradient, so fp32
gradient noise is not amplified (see test_numerics), and 1e-6 relative is a real bound.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import mlp
from models import mlp_batch
from models import mlp_loss

from lowrank_compile.runtime.state import lookup

FULL = {"rank": None, "state_bits": 32, "min_dim": 4}
PROJ = {"rank": 8, "update_gap": 2, "state_bits": 32, "min_dim": 4}


def _scaled_step(model, opt, scaler, poison=None):
    def step(b, bad):
        loss = mlp_loss(model, b)
        if bad:  # d/dW of (W * inf_mask).sum() * 0 is NaN on one element of W's gradient only
            loss = loss + (model[0].weight * poison).sum() * 0.0
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        return loss.detach()

    return step


def _rel(m1, m2):
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("options", [FULL, PROJ], ids=["rank-none", "projected"])
def test_planted_inf_skips_the_step_for_every_parameter(options):
    poison = torch.zeros(40, 24)
    poison[3, 5] = float("inf")
    base = mlp()
    em, lm = copy.deepcopy(base), copy.deepcopy(base)
    eo, lo = torch.optim.SGD(em.parameters(), lr=0.1), torch.optim.SGD(lm.parameters(), lr=0.1)
    es, ls = torch.amp.GradScaler("cpu", init_scale=1024.0), torch.amp.GradScaler("cpu", init_scale=1024.0)
    estep = _scaled_step(em, eo, es, poison)
    lstep = torch.compile(_scaled_step(lm, lo, ls, poison), backend="lowrank", options=options)
    for i in range(2):
        estep(mlp_batch(i), False)
        lstep(mlp_batch(i), False)
    assert lookup(lm[0].weight) is not None and lm[0].weight.grad is None  # really taken over
    snap_e = [p.detach().clone() for p in em.parameters()]
    snap_l = [p.detach().clone() for p in lm.parameters()]
    estep(mlp_batch(2), True)
    lstep(mlp_batch(2), True)
    assert es.get_scale() == ls.get_scale() == 512.0  # the scale was lowered, identically
    assert all(torch.equal(a, b) for a, b in zip(snap_e, em.parameters()))  # eager skipped everything
    assert all(torch.equal(a, b) for a, b in zip(snap_l, lm.parameters()))  # so did lowrank
    for i in range(3, 5):  # and training resumes normally
        estep(mlp_batch(i), False)
        lstep(mlp_batch(i), False)
    assert es.get_scale() == ls.get_scale()
    if options is FULL:
        assert _rel(lm, em) <= 1e-6


def test_projected_with_scaler_equals_projected_without():
    """Loss scales are powers of two, so unscaling is exact: scaled == unscaled bit for bit."""
    base = mlp()
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    o1, o2 = torch.optim.AdamW(m1.parameters(), lr=1e-2), torch.optim.AdamW(m2.parameters(), lr=1e-2)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    s1 = torch.compile(_scaled_step(m1, o1, sc), backend="lowrank", options=PROJ)

    def plain(b, bad):
        mlp_loss(m2, b).backward()
        o2.step()
        o2.zero_grad()

    s2 = torch.compile(plain, backend="lowrank", options=PROJ)
    for i in range(5):
        s1(mlp_batch(i), False)
        s2(mlp_batch(i), False)
    assert lookup(m1[0].weight).proj.refreshes == 3
    # Identical math; only the compiled backward graphs' fp32 sums may round differently.
    assert _rel(m1, m2) <= 1e-6


def test_bf16_autocast_update_equals_eager_optimizer_on_the_same_gradients():
    base = mlp()
    lm, fm = copy.deepcopy(base), copy.deepcopy(base)
    lo, fo = (
        torch.optim.SGD(lm.parameters(), lr=0.1, momentum=0.9),
        torch.optim.SGD(fm.parameters(), lr=0.1, momentum=0.9),
    )
    grads = {}

    def keep(p, name):
        if p.grad is not None:
            grads[name] = p.grad.clone()

    for n, p in lm.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, n=n: keep(p, n))

    def step(b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = mlp_loss(lm, b)
        loss.backward()
        lo.step()
        lo.zero_grad()
        return loss

    cstep = torch.compile(step, backend="lowrank", options=FULL)
    for i in range(4):
        for pf, pl in zip(fm.parameters(), lm.parameters()):
            pf.data.copy_(pl.data)
        loss = cstep(mlp_batch(i))
        assert torch.isfinite(loss)
        for n, pf in fm.named_parameters():
            st = lookup(dict(lm.named_parameters())[n])
            pf.grad = st.grad.clone() if st is not None else grads[n]
        fo.step()
        fo.zero_grad()
        assert _rel(lm, fm) <= 1e-6
