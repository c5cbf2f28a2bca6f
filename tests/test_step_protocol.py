"""The training-step protocol keeps eager semantics: accumulation, zero_grad, stray .grad, closures.

float64 models: there the compiled step matches eager to ~1e-14 (see test_numerics). Any
semantic slip (a lost or doubled gradient, a skipped step) shows up far above the 1e-6 used here.
"""

from __future__ import annotations

import copy

import torch
from models import mlp
from models import mlp_batch
from models import mlp_loss

from lowrank_compile.runtime.state import lookup

OPTS = {"rank": None, "state_bits": 32, "min_dim": 4}


def _pair(opt_cls=torch.optim.AdamW, **kw):
    base = mlp().double()
    em, lm = copy.deepcopy(base), copy.deepcopy(base)
    return (em, opt_cls(em.parameters(), **kw)), (lm, opt_cls(lm.parameters(), **kw))


def _batch(i):
    x, y = mlp_batch(i)
    return x.double(), y


def _close(m1, m2, tol=1e-6):
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err <= tol, (n, err)


def _backward(model):
    def f(b):
        loss = mlp_loss(model, b)
        loss.backward()
        return loss

    return f


def test_two_backwards_accumulate_then_step():
    (em, eo), (lm, lo) = _pair(lr=1e-2)
    cb = torch.compile(_backward(lm), backend="lowrank", options=OPTS)
    eb = _backward(em)
    for step in range(3):
        for k in range(2):  # two micro-batches, no zero_grad in between
            eb(_batch(10 * step + k))
            cb(_batch(10 * step + k))
        eo.step()
        lo.step()
        eo.zero_grad()
        lo.zero_grad()
        _close(lm, em)
    assert lookup(lm[0].weight).backward_calls == 6


def test_zero_grad_without_step_discards_gradients():
    (em, eo), (lm, lo) = _pair(lr=1e-2)
    cb, eb = torch.compile(_backward(lm), backend="lowrank", options=OPTS), _backward(em)
    for b in (eb, cb):
        b(_batch(0))
    eo.zero_grad()
    lo.zero_grad()
    for b in (eb, cb):
        b(_batch(1))
    eo.step()
    lo.step()
    _close(lm, em)


def test_zero_grad_set_to_none_false_then_step_without_backward():
    # Eager: grads become zeros (not None), so the next step still moves Adam's moments and the weights.
    (em, eo), (lm, lo) = _pair(lr=1e-2, weight_decay=0.1)
    cb, eb = torch.compile(_backward(lm), backend="lowrank", options=OPTS), _backward(em)
    eb(_batch(0))
    cb(_batch(0))
    eo.step()
    lo.step()
    eo.zero_grad(set_to_none=False)
    lo.zero_grad(set_to_none=False)
    before = lm[0].weight.detach().clone()
    eo.step()
    lo.step()
    assert not torch.equal(before, lm[0].weight)
    _close(lm, em)


def test_step_without_gradient_is_a_no_op_like_eager():
    (em, eo), (lm, lo) = _pair(lr=1e-2)
    cb, eb = torch.compile(_backward(lm), backend="lowrank", options=OPTS), _backward(em)
    eb(_batch(0))
    cb(_batch(0))
    eo.step()
    lo.step()
    eo.zero_grad()
    lo.zero_grad()
    snapshot = [p.detach().clone() for p in lm.parameters()]
    eo.step()
    lo.step()  # no gradient since zero_grad: nothing moves, Adam's step count does not advance
    assert all(torch.equal(a, b) for a, b in zip(snapshot, lm.parameters()))
    _close(lm, em)


def test_gradients_from_an_uncompiled_backward_are_folded_in():
    (em, eo), (lm, lo) = _pair(lr=1e-2)
    cb, eb = torch.compile(_backward(lm), backend="lowrank", options=OPTS), _backward(em)
    eb(_batch(0))
    cb(_batch(0))  # planned gradient goes to the backend's buffer
    eb(_batch(1))
    _backward(lm)(_batch(1))  # eager backward: planned params get a .grad the backend must not lose
    assert lm[0].weight.grad is not None
    eo.step()
    lo.step()
    assert lm[0].weight.grad is None and lm[0].weight not in lo.state
    _close(lm, em)


def test_step_with_closure_returns_loss():
    (em, eo), (lm, lo) = _pair(torch.optim.SGD, lr=0.1, momentum=0.9)
    cb = torch.compile(_backward(lm), backend="lowrank", options=OPTS)
    cb(_batch(0))  # compile and plan
    lo.zero_grad()
    for i in range(3):

        def lclosure(i=i):
            lo.zero_grad()
            return cb(_batch(i))

        def eclosure(i=i):
            eo.zero_grad()
            return _backward(em)(_batch(i))

        ll = lo.step(lclosure)
        el = eo.step(eclosure)
        assert torch.allclose(ll, el)
    _close(lm, em)


def test_model_zero_grad_reaches_the_backend_buffers():
    (em, eo), (lm, lo) = _pair(lr=1e-2)
    cb, eb = torch.compile(_backward(lm), backend="lowrank", options=OPTS), _backward(em)
    for i in range(3):
        eb(_batch(i))
        cb(_batch(i))
        eo.step()
        lo.step()
        em.zero_grad()  # the module's zero_grad, not the optimizer's
        lm.zero_grad()
    assert lookup(lm[0].weight).fresh
    _close(lm, em)
