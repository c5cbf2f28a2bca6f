"""Triton kernels against their pure-torch references, under TRITON_INTERPRET=1 on CPU.

Run by tests/test_kernels.py in a subprocess (the variable must be set before triton is
imported). Shapes are odd on purpose: not multiples of the block size, so masks are exercised.
"""

from __future__ import annotations

import os

import pytest
import torch

from lowrank_compile.runtime import quant
from lowrank_compile.runtime.kernels.adamw8bit import adamw8bit_applicable
from lowrank_compile.runtime.kernels.adamw8bit import adamw8bit_reference
from lowrank_compile.runtime.kernels.adamw8bit import adamw8bit_update

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_kernels.py"

# (dtype, atol, rtol) for the parameter. fp32: same formula, same order of operations; one ulp
# of difference remains where fp32 division/sqrt round differently between the interpreter
# (numpy) and ATen. bf16: a one-ulp fp32 difference occasionally flips a bf16 rounding (one bf16
# ulp, 2^-7 relative). Each step starts from the rounded parameter, so over the 4 steps here it
# can reach two bf16 ulps (measured: 0.0039 at |p| ~ 0.5, 1.5% relative, in 0.3% of elements).
DTYPES = [(torch.float32, 1e-7, 1e-6), (torch.bfloat16, 4e-3, 1.6e-2)]
SHAPES = [(1,), (37, 129), (4097,), (300, 17), (2, 256, 3)]
HP = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_adamw8bit_kernel_matches_reference(shape, dtype, atol, rtol):
    g = torch.Generator().manual_seed(sum(shape))
    p0 = (torch.randn(shape, generator=g) * 0.1).to(dtype)
    pk, pr = p0.clone(), p0.clone()
    states = [quant.QState.zeros(shape, s, "cpu", sqrt=not s) for s in (True, False, True, False)]
    mk, vk, mr, vr = states
    # Sparse gradients over six decades: elements without gradient exercise the settle rule,
    # tiny second moments the floor (quant's module docstring).
    scale = 10.0 ** (-6 * torch.rand(shape, generator=g))
    for step in range(1, 5):
        grad = torch.randn(shape, generator=g) * 0.01 * scale
        grad = (grad * (torch.rand(shape, generator=g) < 0.6)).to(dtype)
        assert adamw8bit_applicable(pk, grad, mk, vk)
        adamw8bit_update(pk, grad, mk, vk, step=step, salt=step, **HP)
        adamw8bit_reference(pr, grad, mr, vr, step=step, salt=step, **HP)
        torch.testing.assert_close(pk, pr, atol=atol, rtol=rtol)
        # m's codes and absmax match exactly. v is stored as a square root, and the kernel's fp32
        # v differs from torch's by up to 2 ulps (measured 1.8e-7 relative): rtol 4e-7 is 3 ulps,
        # and a value within those ulps of a rounding threshold takes the neighbouring code
        # (measured: at most 2 values of a few thousand in a step, bf16 gradients only).
        assert torch.equal(mk.codes, mr.codes) and torch.equal(mk.absmax, mr.absmax)
        vdiff = (vk.codes.int() - vr.codes.int()).abs()
        assert vdiff.max() <= 1 and int((vdiff > 0).sum()) <= max(2, vdiff.numel() // 500)
        torch.testing.assert_close(vk.absmax, vr.absmax, rtol=4e-7, atol=0)
    assert pk.dtype == dtype and not torch.equal(pk, p0)


def test_checker_refuses_what_the_kernel_cannot_do():
    p = torch.randn(10, 10)
    g = torch.randn(10, 10)
    m, v = quant.QState.zeros((10, 10), True, "cpu"), quant.QState.zeros((10, 10), False, "cpu", sqrt=True)
    assert adamw8bit_applicable(p, g, m, v)
    assert not adamw8bit_applicable(p, g, m, quant.QState.zeros((10, 10), False, "cpu"))  # v not as sqrt
    assert not adamw8bit_applicable(p.t(), g, m, v)  # not contiguous
    assert not adamw8bit_applicable(p.double(), g.double(), m, v)  # dtype
    assert not adamw8bit_applicable(p, g, v, m)  # signed/unsigned swapped
    assert not adamw8bit_applicable(p, g, m, p)  # fp32 state
    with pytest.raises(ValueError, match="does not apply"):
        adamw8bit_update(p.double(), g.double(), m, v, step=1, **HP)


# (dtype, atol, rtol) for W after one fused update. fp32: tl.dot and torch's matmul sum k products
# in another order (k <= 37 here: a few ulp). bf16: the same fp32 result rounded to bf16 on both
# sides, one bf16 ulp at most.
GEMM_DTYPES = [(torch.float32, 1e-6, 1e-5), (torch.bfloat16, 1e-2, 8e-3)]


@pytest.mark.parametrize("dtype, atol, rtol", GEMM_DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("m, n, r", [(37, 53, 7), (64, 33, 16), (5, 129, 37), (1, 1, 1)])
@pytest.mark.parametrize("side", ["left", "right"])
def test_galore_update_kernel_matches_reference(m, n, r, side, dtype, atol, rtol):
    from lowrank_compile.runtime.kernels.galore_update import galore_update
    from lowrank_compile.runtime.kernels.galore_update import galore_update_reference

    g = torch.Generator().manual_seed(m * n + r)
    w0 = (torch.randn(m, n, generator=g) * 0.1).to(dtype)
    if side == "left":  # W += P N: P is m x r, N is r x n
        a, b = torch.randn(m, r, generator=g).to(dtype), torch.randn(r, n, generator=g) * 1e-3
    else:  # W += N P^T: N is m x r, P is n x r (passed as a transposed view)
        a, p = torch.randn(m, r, generator=g) * 1e-3, torch.randn(n, r, generator=g).to(dtype)
        b = p.t()
    wk, wr = w0.clone(), w0.clone()
    galore_update(wk, a, b, decay=1 - 1e-3 * 0.1, scale=0.25)
    galore_update_reference(wr, a, b, decay=1 - 1e-3 * 0.1, scale=0.25)
    torch.testing.assert_close(wk, wr, atol=atol, rtol=rtol)
    # In bf16 a tiny update can be below the weight's resolution: both sides then leave W alone.
    assert torch.equal(wk, w0) == torch.equal(wr, w0)
    if dtype == torch.float32:
        assert not torch.equal(wk, w0)


def test_galore_update_checker():
    from lowrank_compile.runtime.kernels.galore_update import galore_update
    from lowrank_compile.runtime.kernels.galore_update import galore_update_applicable

    w, a, b = torch.zeros(4, 6), torch.zeros(4, 3), torch.zeros(3, 6)
    assert galore_update_applicable(w, a, b)
    assert not galore_update_applicable(w, a, b.t())  # shapes
    assert not galore_update_applicable(w.long(), a, b)  # dtype
    with pytest.raises(ValueError, match="does not apply"):
        galore_update(w, a, torch.zeros(3, 5), decay=1.0, scale=1.0)
