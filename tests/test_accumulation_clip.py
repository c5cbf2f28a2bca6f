"""clip_grad_norm_ after gradient accumulation, with the default options (no full-size buffers).

The backend estimates the 2-norm of a projected gradient summed over several backward calls
(runtime/clip.py `residual_estimate`): the projected part and each call's residual energy are
exact; the cross terms between calls' residuals come from a k-column random sketch. These tests
hold the estimate to the exact norm of the same accumulated gradient, which an eager copy of the
model computes on the same weights and micro-batches.
"""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
from helpers import projected_names
from models import llama
from models import mlp_loss
from models import wide_mlp

import lowrank_compile
from lowrank_compile.passes.consume_grads import consume_project
from lowrank_compile.runtime.clip import LowRankClipError
from lowrank_compile.runtime.clip import residual_estimate


def _sketch_buffers(grads, p, k, gen, dtype):
    """Run the backward's consumer eagerly over `grads` (left side): the buffers clip reads."""
    d, e = grads[0].shape
    r = p.shape[1]
    rbuf = torch.zeros(r, e, dtype=dtype)
    sq, amax, sq_r = (torch.zeros((), dtype=dtype) for _ in range(3))
    omega = (torch.randint(0, 2, (e, k), generator=gen) * 2 - 1).to(dtype)
    y, diag = torch.zeros(d, k, dtype=dtype), torch.zeros(k, dtype=dtype)
    for i, g in enumerate(grads):
        fresh = torch.tensor(i == 0)
        consume_project(g, fresh, p, rbuf, sq, amax, omega, y, diag, sq_r, left=True, clip=True)
    return rbuf, sq, sq_r, y, diag


def _micro_grads(gen, dtype, calls=4, d=24, e=40):
    """Micro-batch gradients with a shared low-rank signal and independent noise, as in training."""
    signal = torch.randn(d, 3, generator=gen, dtype=dtype) @ torch.randn(3, e, generator=gen, dtype=dtype)
    return [signal + 3.0 * torch.randn(d, e, generator=gen, dtype=dtype) for _ in range(calls)]


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_one_call_is_exact(dtype, rtol):
    # With one backward call the cross terms are 0: every column's t_c is a difference of two
    # equal sums (rounding only), so the estimate is ||R||^2 + (sq - sq_r) = ||G||^2 to rounding.
    gen = torch.Generator().manual_seed(0)
    (g,) = _micro_grads(gen, dtype, calls=1)
    p = torch.linalg.svd(g).U[:, :6]
    est, _ = residual_estimate(*_sketch_buffers([g], p, 16, gen, dtype), p)
    assert est.item() == pytest.approx(g.pow(2).sum().item(), rel=rtol)


def test_estimate_is_unbiased_and_its_variance_is_estimated():
    # 400 independent sketches of the same accumulated gradient (float64, so only the sketch
    # varies). The mean of the estimates must be within 4 standard errors of the truth
    # (a false alarm has probability ~6e-5), and the mean of the reported variances within 25%
    # of the variance observed across the sketches (the spread of 400 draws is itself known to
    # ~7%, and the per-sketch estimate of the variance from 16 columns is unbiased).
    gen = torch.Generator().manual_seed(1)
    grads = _micro_grads(gen, torch.float64)
    p = torch.linalg.svd(grads[0]).U[:, :6]  # from the first micro-batch, as an svd refresh does
    total = sum(grads)
    truth = total.pow(2).sum().item()
    residual = (total - p @ (p.t() @ total)).pow(2).sum().item()
    assert residual > 0.25 * truth  # the estimated part is a large share of the norm
    ests, variances = [], []
    for _ in range(400):
        est, var = residual_estimate(*_sketch_buffers(grads, p, 16, gen, torch.float64), p)
        ests.append(est.item())
        variances.append(var.item())
    mean, spread = statistics.fmean(ests), statistics.stdev(ests)
    assert abs(mean - truth) < 4 * spread / 20  # standard error of the mean of 400
    assert statistics.fmean(variances) == pytest.approx(spread**2, rel=0.25)
    assert spread / truth < 0.05  # a sketch of 16 columns is already a tight estimate here


def _gpt2():
    from transformers import GPT2Config
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=96,
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


MODELS = {"llama": lambda: llama(layers=1, hidden=32), "gpt2": _gpt2}  # one block: >= 4 projected matrices


def _llm_batch(gen):
    x = torch.randint(0, 96, (2, 12), generator=gen)
    return x, x


def _llm_loss(model, batch):
    return model(input_ids=batch[0], labels=batch[1]).loss


def _mlp_batch(gen):
    return torch.randn(12, 24, generator=gen), torch.randint(0, 10, (12,), generator=gen)


def _loop(
    build,
    steps,
    accum,
    options,
    *,
    dtype=torch.float32,
    autocast=True,
    scaler=None,
    max_norm=0.5,
    batch=_llm_batch,
    loss_fn=_llm_loss,
    probe=None,
):
    """nanoGPT-style: the model alone compiled, `accum` micro-batches, clip_grad_norm_(max_norm).

    Returns (norms the compiled loop's clip returned, exact norms, the model). The exact norm
    is that of the same accumulated gradient: an eager copy of the model, given the compiled
    model's weights before each step, runs the same micro-batches. `probe(model)` runs before
    the clip of the second step.
    """
    model = build().to(dtype)
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    cmodel = torch.compile(model, backend="lowrank", options=options)
    gen = torch.Generator().manual_seed(7)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else torch.enable_grad
    norms, exact = [], []
    for step in range(steps):
        batches = [batch(gen) for _ in range(accum)]
        batches = [tuple(t.to(dtype) if t.is_floating_point() else t for t in b) for b in batches]
        ref.load_state_dict(model.state_dict())
        ref.zero_grad(set_to_none=True)
        for b in batches:
            with ctx():
                loss = loss_fn(ref, b) / accum
            loss.backward()
        exact.append(torch.nn.utils.get_total_norm([q.grad for q in ref.parameters()]).item())
        for b in batches:
            with ctx():
                loss = loss_fn(cmodel, b) / accum
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        if probe is not None and step == 1:
            probe(model)
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item())
        scaler.step(opt) if scaler else opt.step()
        if scaler:
            scaler.update()
        opt.zero_grad(set_to_none=True)
    return norms, exact, model


def _mlp():
    return wide_mlp()  # 24 -> 512 -> 64 -> 10: two projected matrices at rank 16


MLP = {"batch": _mlp_batch, "loss_fn": mlp_loss}
MLP_OPTIONS = {"rank": 16, "min_dim": 16}


def _refuses_other_norms(model):
    with pytest.raises(LowRankClipError, match="only the 2-norm"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, norm_type=float("inf"))


# GPT-2 is slow (~190 s cold): the same loop and bounds run on Llama in the default suite.
@pytest.mark.parametrize(
    "arch", [pytest.param(a, marks=pytest.mark.slow) if a == "gpt2" else a for a in sorted(MODELS)]
)
def test_nanogpt_loop_clip_norm_is_within_the_stated_error(arch):
    # bf16 autocast, 4 micro-batches, clip_grad_norm_ with the default options, 50 steps.
    norms, exact, model = _loop(MODELS[arch], steps=50, accum=4, options=None, probe=_refuses_other_norms)
    assert len(projected_names(model)) >= 4  # GaLore took over the hidden matrices
    report = lowrank_compile.clip_report()
    assert report is not None and len(report.estimated) == len(projected_names(model))  # the estimate ran
    errs = [abs(a / b - 1) for a, b in zip(norms, exact)]
    # Bounds of the issue: median <= 1%, max <= 3%. Measured here (50 steps): Llama median
    # 0.14%, max 1.20%; GPT-2 median 0.10%, max 0.38%. The sketch reports a relative standard
    # error of 0.1-0.3% per step, and bf16 autocast alone makes the compiled and eager
    # gradients' norms differ by ~0.04%.
    assert statistics.median(errs) <= 0.01, errs
    assert max(errs) <= 0.03, errs
    assert all(b > 0.5 for b in exact[:5])  # the clip binds, so the norm decides the update


def test_full_accumulation_is_exact():
    # grad_accumulation="full" keeps eager-size buffers: the norm is computed from the summed
    # gradient itself. float64; measured 7.6e-9 (HF's RMSNorm computes in fp32, and Inductor's
    # fused kernel rounds that part differently from eager), bound of the issue 1e-6.
    norms, exact, model = _loop(
        MODELS["llama"],
        steps=3,
        accum=4,
        options={"grad_accumulation": "full"},
        dtype=torch.float64,
        autocast=False,
    )
    assert projected_names(model)
    report = lowrank_compile.clip_report()
    assert report is not None and report.estimated == ()
    for a, b in zip(norms, exact):
        assert a == pytest.approx(b, rel=1e-6)


def test_grad_scaler_unscales_the_sketch():
    # GradScaler multiplies the loss by 2^12: the linear buffers must be divided by the scale and
    # the sums of squares by its square, or the estimate is off by orders of magnitude.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    norms, exact, model = _loop(
        _mlp, steps=6, accum=3, options=MLP_OPTIONS, autocast=False, scaler=scaler, **MLP
    )
    assert len(projected_names(model)) == 2
    report = lowrank_compile.clip_report()
    assert report is not None and len(report.estimated) == 2
    errs = [abs(a / b - 1) for a, b in zip(norms, exact)]
    assert max(errs) <= 0.03, errs  # the bound of the nanoGPT test


def test_clip_sketch_off_refuses_with_a_clear_error():
    with pytest.raises(LowRankClipError, match="clip_sketch=0"):
        _loop(_mlp, steps=1, accum=2, options={**MLP_OPTIONS, "clip_sketch": 0}, autocast=False, **MLP)
