"""8-bit states on sparse gradients: rows that get a gradient only now and then (the 8-bit issue #18).

The defect these tests catch: in a block of 256 values shared by a rarely-updated element and
frequently-updated ones, the rare element's second moment fell below the block's smallest code
and was stored as 0 while its first moment was not, so Adam's update became m / eps (embedding
elements moved by 20-40 in 20 steps at lr 1e-3). A first moment without gradient could also
stick at a code and never decay. See runtime/quant.py for the storage rules that fix both.

1. Property (hypothesis): gradients whose rows are active with random frequencies and scales
   spanning six decades; no element's per-step change exceeds what the rule itself can do
   (Adam's exact worst-case step, Lion's lr, SGD's momentum envelope), with 8-bit states, for
   AdamW, Adam, Lion and SGD (momentum, dampening, Nesterov).
2. Compiled vs reference: the backend's compiled 8-bit update against torch.optim's own step on
   the dequantized states followed by the eager reference encoder, step by step.
3. A state without gradient decays to exactly zero.
4. The issue's run: a byte-level HF Llama on the stdlib's sources, 20 steps, against eager fp32
   AdamW, with bitsandbytes' AdamW8bit beside it.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz import One
from test_fuzz import _budget
from torch import nn

import lowrank_compile
from lowrank_compile.backend import get_backend
from lowrank_compile.config import parse_options
from lowrank_compile.plan import ParamInfo
from lowrank_compile.runtime import quant
from lowrank_compile.runtime.state import lookup

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PRINT_RATIOS = bool(os.environ.get("LOWRANK_PRINT_RATIOS"))


def _lion(ps, **kw):
    from lion_pytorch import Lion

    return Lion(ps, **kw)


# name -> (factory, hyper-parameters); betas and momenta are the common defaults.
RULES = {
    "adamw": (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.01}),
    "adam": (torch.optim.Adam, {"lr": 1e-3, "weight_decay": 1e-3}),
    "lion": (_lion, {"lr": 1e-4, "weight_decay": 0.01}),
    "sgd": (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}),
    "sgd_nesterov": (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    "sgd_dampening": (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "dampening": 0.5}),
}


def _sparse_gradients(gen, rows, cols, steps, dense_rows):
    """Per row: an activity frequency (10^-2..1) and a scale (10^-6..1); a few rows always on at scale 1.

    That is the embedding pattern: blocks of 256 values mix rows seen every step with rows seen
    once in a while, and gradient sizes across rows span six decades.
    """
    freq = 10.0 ** (-2 * torch.rand(rows, generator=gen))
    scale = 10.0 ** (-6 * torch.rand(rows, generator=gen))
    hot = torch.randperm(rows, generator=gen)[:dense_rows]
    freq[hot], scale[hot] = 1.0, 1.0
    out = []
    for _ in range(steps):
        active = (torch.rand(rows, generator=gen) < freq).float()
        out.append((active * scale).unsqueeze(1) * torch.randn(rows, cols, generator=gen))
    return out


def _take_over(w: torch.Tensor, opt: torch.optim.Optimizer, bits: int):
    model = One(w)
    config = parse_options({"rank": None, "state_bits": bits, "min_dim": 1, "include": ["w"]})
    st_ = get_backend(config).take_over_late(model.w, ParamInfo("w", model.w, [(opt, 0)], role="matmul"))
    assert st_ is not None
    return model, st_


def adam_worst_step(betas: tuple[float, float], t: int) -> float:
    """The largest |m_hat / sqrt(v_hat)| any gradient sequence gives at step t (eps = 0).

    m_hat = sum_j a_j g_{t-j}, v_hat = sum_j b_j g_{t-j}^2 with a_j = (1-b1) b1^j / (1-b1^t),
    b_j = (1-b2) b2^j / (1-b2^t); by Cauchy-Schwarz the supremum is sqrt(sum_j a_j^2 / b_j),
    attained. With the defaults it is 1 at t = 1 and grows toward ~2.3 by t = 25.
    """
    b1, b2 = betas
    s = 0.0
    for j in range(t):
        a = (1 - b1) * b1**j / (1 - b1**t)
        b = (1 - b2) * b2**j / (1 - b2**t)
        s += a * a / b
    return math.sqrt(s)


# Slack of 8-bit states over the exact bound. Per step, nearest rounding on the dynamic map is
# off by at most 2x for |m| (a value just above half the smallest code rounds up to it) and by
# at most 1.7x downward for sqrt(v) (3.25e-7 chosen for values just below 5.5e-7); 2 x 1.7 = 3.4.
# SGD has no sqrt(v); its factor 2 on |m| compounds with stochastic settling (see _sgd_envelope).
# Measured worst ratio over 40 random examples (LOWRANK_FUZZ_EXAMPLES=40): Adam 2.8, AdamW 1.4,
# SGD 2.9, Lion 1.0. Before the storage rules Adam reached 52 at step 2 of the first CI example.
SLACK = 4.0


def _check_bound(name, hp, w_prev, w_new, env, t):
    """Assert the step w_prev -> w_new is one the rule could take; returns the worst ratio to the bound."""
    lr, wd = hp["lr"], hp.get("weight_decay", 0.0)
    delta = (w_new - w_prev).double()
    if name in ("adamw", "lion"):  # decoupled decay first, then the normalised step
        delta = delta + lr * wd * w_prev.double()
    if name.startswith("adam"):
        bound = torch.tensor(lr * adam_worst_step(hp.get("betas", (0.9, 0.999)), t))
        slack = SLACK
    elif name == "lion":  # sign(.) * lr, exactly
        bound, slack = torch.tensor(lr), 1.0
    else:  # SGD: the largest momentum the gradients so far allow (see _sgd_envelope)
        bound, slack = lr * env, SLACK
    # The weight itself is fp32: the decay and the step each round w to its ulp (Lion at lr 1e-4
    # on |w| ~ 0.02 is off by 5.6e-9, 2 ulps); 4 ulps of the larger of |w| before and after cover it.
    rounding = 4 * torch.finfo(torch.float32).eps * torch.maximum(w_prev.abs(), w_new.abs()).double()
    excess = (delta.abs() - slack * bound - rounding).max().item()
    ratio = (delta.abs() / (bound + 1e-30)).max().item()
    assert excess <= 0, (name, t, ratio)
    return ratio


def _sgd_envelope(hp, env, peak, g, w_prev):
    """(|buf| bound, its running max, |step| / lr bound); buf = mu * buf + (1 - dampening) * g_eff.

    The bound is the running max of the envelope, not the envelope itself: a stalled decay of
    an 8-bit state without gradient is rounded stochastically (unbiased, runtime/quant.py), so
    one element's stored momentum can stay at a code for some steps while the exact one decays;
    it never exceeds what it held before, which the envelope bounded then.
    """
    mu, damp = hp.get("momentum", 0.0), hp.get("dampening", 0.0)
    g_eff = (g + hp.get("weight_decay", 0.0) * w_prev).abs().double()
    buf = g_eff if env is None else mu * env + (1 - damp) * g_eff
    peak = buf if peak is None else torch.maximum(peak, buf)
    return buf, peak, (g_eff + mu * peak if hp.get("nesterov") else peak)


# 6 examples in CI: each one is a new parameter shape, so a new compile of the 8-bit update
# (the cost of a cold CI run); LOWRANK_FUZZ_EXAMPLES=40 gives the measured run above.
@_budget(ci_examples=6)
@given(
    name=st.sampled_from(sorted(RULES)),
    rows=st.integers(48, 96),
    cols=st.sampled_from([100, 128, 256]),  # 100: sizes that are not whole blocks (padded path)
    dense_rows=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_8bit_steps_on_sparse_rows_stay_within_the_rules_bound(name, rows, cols, dense_rows, seed):
    lowrank_compile.reset()
    make, hp = RULES[name]
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.02
    opt = make([w], **hp)
    model, st_ = _take_over(w, opt, 8)
    grads = _sparse_gradients(gen, rows, cols, 25, dense_rows)
    buf = peak = step_env = None
    worst = 0.0
    for t, g in enumerate(grads, start=1):
        w_prev = model.w.detach().clone()
        st_.accumulate(g)
        opt.step()
        opt.zero_grad()
        if name.startswith("sgd"):
            buf, peak, step_env = _sgd_envelope(hp, buf, peak, g, w_prev)
        worst = max(worst, _check_bound(name, hp, w_prev, model.w.detach(), step_env, t))
    if PRINT_RATIOS:
        print(f"RATIO {name} {worst:.3f}")
    # The 8-bit path really ran: every state of this parameter is block-wise 8-bit.
    assert st_.ostate and all(isinstance(v, quant.QState) for k, v in st_.ostate.items() if k != "step")


# ---------------------------------------------------------------------------- compiled vs reference
@pytest.mark.parametrize(
    "name,shape,sparse",
    [(n, s, True) for n in ("adamw", "adam", "lion", "sgd_nesterov") for s in ((64, 128), (47, 100))]
    # Dense gradients (no element without one): the update skips the settle rule there.
    + [("adamw", (64, 128), False), ("lion", (47, 100), False)],
)  # whole blocks, and a padded last block
def test_compiled_8bit_update_matches_torch_optim_and_reference_encoder(name, shape, sparse):
    """Each step, both sides start from the same weights and the same (dequantized 8-bit) states.

    The reference is torch.optim's own step in fp32 on those states, then the eager encoder
    (`quant.encode_blockwise`, with the settle rule on the elements without gradient); the
    backend runs its compiled (Inductor) update, which traces the settle rule only for a
    gradient with an exact zero (the `settles` flag, the 10th field of each compiled update's signature).
    """
    make, hp = RULES[name]
    gen = torch.Generator().manual_seed(7)
    w0 = torch.randn(*shape, generator=gen) * 0.02
    w = w0.clone()
    opt = make([w], **hp)
    model, st_ = _take_over(w, opt, 8)
    p_ref = nn.Parameter(w0.clone())
    ref_opt = make([p_ref], **hp)
    if sparse:
        grads = _sparse_gradients(gen, shape[0], shape[1], 12, 4)
    else:
        grads = [torch.randn(*shape, generator=gen) * 1e-2 for _ in range(12)]
        assert all(bool(g.all()) for g in grads)
    mismatched = compared = 0
    for t, g in enumerate(grads):
        with torch.no_grad():
            p_ref.copy_(model.w)
        old = {}
        if t > 0:
            state = {}
            for k, v in st_.ostate.items():
                state[k] = v.dequantize().clone() if isinstance(v, quant.QState) else v.clone().reshape(())
            ref_opt.state[p_ref] = state
            old = {k: v.clone() for k, v in state.items() if v.dim() > 0}
        p_ref.grad = g.clone()
        ref_opt.step()
        st_.accumulate(g)
        opt.step()
        opt.zero_grad()
        assert st_.rounds == t + 1
        if t == 0:
            continue
        # fp32 rounding of a fused kernel against eager torch is ~1e-10 here; a step is ~lr.
        assert torch.allclose(model.w.detach(), p_ref.detach(), rtol=1e-5, atol=1e-8), (name, t)
        for k, o in old.items():
            q = st_.ostate[k]
            assert isinstance(q, quant.QState)
            salt = torch.tensor([t])  # the update counter the backend seeded this update's rounding with
            codes, absmax = quant.encode_blockwise(ref_opt.state[p_ref][k], q.signed, q.sqrt, o, g == 0, salt)
            assert torch.allclose(q.absmax, absmax, rtol=1e-5, atol=0), (name, t, k)
            # Codes equal, but for values that land on a rounding threshold after that fp32 noise.
            mismatched += int((q.codes != codes).sum())
            compared += codes.numel()
    assert compared > 0 and mismatched <= 1e-4 * compared, (mismatched, compared)
    assert st_.binding is not None
    settles = {sig[9] for sig, _ in st_.binding._compiled}  # _update_one's sig: (..., settles, sr)
    assert settles == {sparse}, settles


# ---------------------------------------------------------------------------- decay to zero
@pytest.mark.parametrize("name", ["adamw", "lion", "sgd"])
def test_first_moment_without_gradient_decays_to_zero(name):
    """A row that got a gradient once, in a block whose absmax another row holds, must decay to 0.

    With nearest rounding alone its momentum stuck at a code (the code below is more than
    1 - beta away) and it moved forever; torch.optim in fp32 decays it geometrically.
    """
    make, hp = RULES[name]
    w = torch.zeros(64, 128)
    opt = make([w], **{**hp, "weight_decay": 0.0})
    model, st_ = _take_over(w, opt, 8)
    key = "momentum_buffer" if name.startswith("sgd") else "exp_avg"
    # beta 0.9 (Adam's first moment, SGD's momentum) and Lion's 0.99: fp32 decays 1e-3 by 1e-12
    # of the block's absmax in ~200 and ~2000 steps; stochastic settling follows that rate.
    for t in range(400 if name != "lion" else 4000):
        g = torch.zeros(64, 128)
        g[0] = 1.0  # row 0 every step: it holds the absmax of its block (rows 0 and 1)
        if t == 0:
            g[1] = 1e-3  # row 1 once
        st_.accumulate(g)
        opt.step()
        opt.zero_grad()
    m = st_.ostate[key].dequantize()
    assert isinstance(st_.ostate[key], quant.QState)
    assert m[1].abs().max().item() == 0.0, m[1].abs().max().item()
    before = model.w.detach()[1].clone()
    st_.accumulate(torch.zeros(64, 128).index_fill_(0, torch.tensor([0]), 1.0))
    opt.step()
    opt.zero_grad()
    assert torch.equal(model.w.detach()[1], before)  # the decayed row no longer moves


# ---------------------------------------------------------------------------- the issue's run
def _embedding_run(kind: str, base, data, options=None):
    m = copy.deepcopy(base)
    if kind == "bnb":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(m.parameters(), lr=1e-3)
    else:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

    def step(ids):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    if kind == "lowrank":
        lowrank_compile.reset()
        step = torch.compile(step, backend="lowrank", options=options)
    for ids in data:
        step(ids)
    return m, opt


@pytest.mark.slow  # five trainings of a 2-layer hidden-128 Llama; the rules are held above, per step
def test_issue_run_embedding_tracks_fp32_like_bitsandbytes():
    """The issue's run: HF Llama (hidden 128, 2 layers, bytes), batch 4x64 of stdlib sources, 20 steps.

    Measured max |w - w_fp32| of the embedding (RESULTS.md): bitsandbytes AdamW8bit 3.9e-3;
    before the fix lowrank rank=None 44, defaults 88; after it 6.6e-3 and 3.7e-3. The defaults
    project the hidden matrices (GaLore), so their reference is the same configuration with
    32-bit states (the 8-bit defect is what differs), not eager AdamW: against eager AdamW even
    32-bit GaLore differs by 2e-2, the algorithm's own difference. Bound: 2x bitsandbytes'.
    """
    sys.path.insert(0, str(EXAMPLES))
    from train_llama import batches
    from train_llama import build_model
    from train_llama import load_corpus

    train, _ = load_corpus(2_000_000)
    torch.manual_seed(0)
    base = build_model(layers=2, hidden=128, seq=64)
    it = batches(train, 4, 64, seed=0)
    data = [next(it) for _ in range(20)]

    def emb(m):
        return m.model.embed_tokens.weight.detach()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32, _ = _embedding_run("eager", base, data)
        bnb_m, _ = _embedding_run("bnb", base, data)
        full8, opt = _embedding_run("lowrank", base, data, {"rank": None})
        # The embedding really has 8-bit states in the lowrank run.
        assert isinstance(lookup(full8.model.embed_tokens.weight).ostate["exp_avg_sq"], quant.QState)
        defaults8, _ = _embedding_run("lowrank", base, data, {})
        assert lookup(defaults8.model.layers[0].mlp.up_proj.weight).proj is not None  # projected
        galore32, _ = _embedding_run("lowrank", base, data, {"state_bits": 32})
    bnb_err = (emb(bnb_m) - emb(fp32)).abs().max().item()
    full_err = (emb(full8) - emb(fp32)).abs().max().item()
    default_err = (emb(defaults8) - emb(galore32)).abs().max().item()
    assert full_err <= 2 * bnb_err, (full_err, bnb_err)
    assert default_err <= 2 * bnb_err, (default_err, bnb_err)
