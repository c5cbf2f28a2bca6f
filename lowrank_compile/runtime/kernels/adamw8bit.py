"""Fused AdamW update on block-wise 8-bit states: dequantize -> AdamW -> requantize, one kernel.

One program handles one block of BLOCK = 256 values: it loads the parameter, the gradient, the
two moments' codes and absmax, dequantizes through the 256-entry maps in registers, applies
torch.optim.AdamW's formula in fp32, takes the block's new absmax, and writes the nearest codes
(the same 8-step search over the same thresholds as `quant.nearest_code`) with the storage
rules of `quant.encode_blocks`: v stored as sqrt(v) with a floor at the smallest positive
code, and m of elements without gradient rounded stochastically when it would stick (the same
hash as `quant.uniform_hash`). No fp32 copy of a state ever leaves registers.

    p   <- p * (1 - lr * wd)
    m   <- beta1 * m + (1 - beta1) * g           (torch: lerp)
    v   <- beta2 * v + (1 - beta2) * g^2
    p   <- p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)

bc1 = 1 - beta1^t and bc2 = 1 - beta2^t come from the host in float64, as eager torch.optim
computes them. The reference `adamw8bit_reference` is the same computation in plain torch, on
`runtime.quant`. The tests run the kernel under TRITON_INTERPRET=1 on CPU against it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowrank_compile.runtime import quant

__all__ = ["adamw8bit_applicable", "adamw8bit_reference", "adamw8bit_update"]


def _triton() -> Any:
    import triton
    import triton.language as tl

    return triton, tl


_KERNEL: Any = None


def _kernel() -> Any:
    """Build the @triton.jit kernel on first use (importing triton only then)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    triton, tl = _triton()

    # Triton makes an int argument equal to 1 a constexpr (a Python int, with no .to()): salt is
    # 1 at the first update, so it is never specialised (seen on the GPU machine, triton 3.6).
    @triton.jit(do_not_specialize=["salt"])
    def _adamw8bit_kernel(
        p_ptr,
        g_ptr,
        m_codes_ptr,
        m_absmax_ptr,
        v_codes_ptr,
        v_absmax_ptr,
        smap_ptr,
        umap_ptr,
        sthr_ptr,
        uthr_ptr,
        n_elements,
        lr,
        beta1,
        beta2,
        eps,
        decay,
        step_size,
        bc2_sqrt,
        salt,
        BLOCK: tl.constexpr,  # type: ignore[name-defined]
    ):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mc = tl.load(m_codes_ptr + offs).to(tl.int32)
        vc = tl.load(v_codes_ptr + offs).to(tl.int32)
        m_old = tl.load(smap_ptr + mc) * tl.load(m_absmax_ptr + pid)
        v_root = tl.load(umap_ptr + vc) * tl.load(v_absmax_ptr + pid)
        v = v_root * v_root  # second moments are stored as sqrt(v)
        m = tl.where(mask, m_old + (1.0 - beta1) * (g - m_old), 0.0)
        v = tl.where(mask, beta2 * v + (1.0 - beta2) * g * g, 0.0)
        p = p * decay
        p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
        # requantize both moments: block absmax, then the nearest code by binary search
        v = tl.sqrt(v)
        m_abs = tl.max(tl.abs(m), axis=0)
        v_abs = tl.max(tl.abs(v), axis=0)
        mn = m / tl.where(m_abs > 0, m_abs, 1.0)
        vn = v / tl.where(v_abs > 0, v_abs, 1.0)
        mq = tl.zeros([BLOCK], dtype=tl.int32)
        vq = tl.zeros([BLOCK], dtype=tl.int32)
        for k in tl.static_range(8):
            stride = 128 >> k
            mq = tl.where(tl.load(sthr_ptr + mq + stride - 1) < mn, mq + stride, mq)
            vq = tl.where(tl.load(uthr_ptr + vq + stride - 1) < vn, vq + stride, vq)
        vq = tl.where(vn > 0, tl.maximum(vq, 1), vq)  # floor: a positive v is never 0
        # settle: no gradient, the magnitude fell, but the nearest code keeps the old one; then
        # stochastic rounding between the neighbours, from quant.uniform_hash's hash
        lower = tl.where(mq > 127, mq - 1, tl.where(mq < 127, mq + 1, mq))
        above = tl.abs(tl.load(smap_ptr + mq)) * m_abs
        below = tl.abs(tl.load(smap_ptr + lower)) * m_abs
        stalled = (g == 0.0) & (tl.abs(m) < tl.abs(m_old)) & (above >= tl.abs(m_old))
        p_down = (above - tl.abs(m)) / tl.maximum(above - below, 1.1754943508222875e-38)
        h = (offs.to(tl.int64) * 0x9E3779B1 + salt.to(tl.int64) * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFF
        h = h ^ (h >> 15)
        h = (h * 0x2C1B3C6D) & 0xFFFFFFFF
        h = h ^ (h >> 12)
        h = (h * 0x297A2D39) & 0xFFFFFFFF
        h = h ^ (h >> 15)
        u = (h >> 8).to(tl.float32) * (1.0 / 16777216.0)
        mq = tl.where(stalled & (u < p_down), lower, mq)
        tl.store(m_codes_ptr + offs, mq.to(tl.uint8))
        tl.store(v_codes_ptr + offs, vq.to(tl.uint8))
        tl.store(m_absmax_ptr + pid, m_abs)
        tl.store(v_absmax_ptr + pid, v_abs)

    _KERNEL = _adamw8bit_kernel
    return _KERNEL


def _host_scalars(
    step: int, lr: float, beta1: float, beta2: float, weight_decay: float
) -> tuple[float, float, float]:
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    return 1 - lr * weight_decay, lr / bc1, math.sqrt(bc2)


def adamw8bit_applicable(param: torch.Tensor, grad: torch.Tensor, m: Any, v: Any) -> bool:
    """True when the fused kernel may run.

    It needs CUDA (or the Triton interpreter), contiguous fp32/bf16 tensors, and 8-bit moments of
    the parameter's size: m signed, v unsigned and stored as sqrt(v).
    """
    import os

    on_device = param.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return (
        on_device
        and isinstance(m, quant.QState)
        and isinstance(v, quant.QState)
        and m.signed
        and not m.sqrt
        and not v.signed
        and v.sqrt
        and param.dtype in (torch.float32, torch.bfloat16)
        and grad.dtype == param.dtype
        and param.is_contiguous()
        and grad.is_contiguous()
        and m.numel == param.numel() == v.numel
    )


def adamw8bit_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    m: quant.QState,
    v: quant.QState,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    salt: int = 0,
) -> None:
    """Launch the fused kernel: updates `param`, `m` and `v` in place. `step` counts this update.

    `salt` seeds the settle rule's stochastic rounding (the parameter's update counter).
    """
    if not adamw8bit_applicable(param, grad, m, v):
        raise ValueError("adamw8bit_update: the fused path does not apply (see adamw8bit_applicable)")
    triton, _ = _triton()
    n = param.numel()
    decay, step_size, bc2_sqrt = _host_scalars(step, lr, beta1, beta2, weight_decay)
    dev = param.device
    grid = (m.absmax.numel(),)
    _kernel()[grid](
        param,
        grad,
        m.codes,
        m.absmax,
        v.codes,
        v.absmax,
        quant.dynamic_map(True, dev),
        quant.dynamic_map(False, dev),
        quant.map_thresholds(True, dev),
        quant.map_thresholds(False, dev),
        n,
        lr,
        beta1,
        beta2,
        eps,
        decay,
        step_size,
        bc2_sqrt,
        salt,
        BLOCK=quant.BLOCK,
    )


def adamw8bit_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    m: quant.QState,
    v: quant.QState,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    salt: int = 0,
) -> None:
    """The same update in plain torch (materialises fp32 states; for tests and debugging)."""
    decay, step_size, bc2_sqrt = _host_scalars(step, lr, beta1, beta2, weight_decay)
    n = param.numel()
    g = grad.reshape(-1).float()
    m_old = quant.decode_blockwise(m.codes, m.absmax, True, n)
    vf = quant.decode_blockwise(v.codes, v.absmax, False, n, sqrt=True)
    mf = m_old + (1.0 - beta1) * (g - m_old)
    vf = beta2 * vf + (1.0 - beta2) * g * g
    p = param.reshape(-1).float() * decay
    p = p - step_size * mf / (vf.sqrt() / bc2_sqrt + eps)
    param.copy_(p.view_as(param).to(param.dtype))
    for q, x, old in ((m, mf, m_old), (v, vf, None)):
        settle = g == 0 if old is not None else None
        codes, absmax = quant.encode_blockwise(x, q.signed, q.sqrt, old, settle, torch.tensor([salt]))
        q.codes.copy_(codes)
        q.absmax.copy_(absmax)
