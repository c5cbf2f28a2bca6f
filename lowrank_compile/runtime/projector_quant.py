"""Quantized storage of svd/randomized projectors (`projector_bits`), Q-GaLore's scheme.

- 16: the matrix in fp16 (its entries are at most 1 in magnitude: 11 significant bits).
- 8 / 4: group-wise asymmetric integer codes. The d x r matrix is flattened (row-major) and cut
  into groups of GROUP = 256 values (the last one zero-padded); each group keeps its minimum
  `lo` and step `scale = (max - min) / (2**bits - 1)` in fp32, and each value the nearest code
  q = round((x - lo) / scale), so x ~ lo + q * scale with an error of at most scale / 2. 4-bit
  codes are packed two per byte (low nibble first).

`dequantize` is traceable and pointwise apart from the unpacking, so the backend's backward
and update graphs dequantize inside the graph that uses the projector (nothing full-precision
is kept). Bytes per value: 2 (16), 1 + 8/256 (8), 0.5 + 8/256 (4) against 4 for fp32.
"""

from __future__ import annotations

import math

import torch

__all__ = ["BITS", "GROUP", "dequantize", "quantize", "roundtrip", "stored_bytes"]

BITS = (32, 16, 8, 4)
GROUP = 256


def _groups(numel: int) -> int:
    return max(1, math.ceil(numel / GROUP))


def stored_bytes(d: int, r: int, bits: int) -> int:
    """Bytes a d x r projector takes under `bits`."""
    n = d * r
    if bits == 32:
        return 4 * n
    if bits == 16:
        return 2 * n
    return _groups(n) * (GROUP * bits // 8 + 8)


def quantize(p: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, qparams) of the d x r matrix `p`; qparams is (groups, 2) fp32 [scale, lo] (empty for 16)."""
    if bits == 16:
        return p.to(torch.float16).contiguous(), torch.zeros(0, 2, device=p.device)
    if bits not in (8, 4):
        raise ValueError(f"projector bits must be one of {BITS}, got {bits}")
    flat = p.detach().float().reshape(-1)
    ng = _groups(flat.numel())
    x = torch.nn.functional.pad(flat, (0, ng * GROUP - flat.numel())).view(ng, GROUP)
    lo = x.amin(dim=1, keepdim=True)
    hi = x.amax(dim=1, keepdim=True)
    top = (1 << bits) - 1
    scale = (hi - lo) / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code 0
    q = torch.round((x - lo) / scale).clamp(0, top).to(torch.uint8)
    if bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    return q.contiguous(), torch.cat([scale, lo], dim=1).contiguous()


def dequantize(
    codes: torch.Tensor, qparams: torch.Tensor, bits: int, d: int, r: int, dtype: torch.dtype
) -> torch.Tensor:
    """The d x r projector stored as (codes, qparams) under `bits`, in `dtype`."""
    if bits == 16:
        return codes.to(dtype)
    q = codes
    if bits == 4:
        q = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(codes.shape[0], GROUP)
    x = q.to(torch.float32) * qparams[:, 0:1] + qparams[:, 1:2]
    return x.reshape(-1)[: d * r].view(d, r).to(dtype)


def roundtrip(p: torch.Tensor, bits: int) -> torch.Tensor:
    """`p` as it reads back after storing under `bits` (traceable: the backward's refresh uses it)."""
    codes, qparams = quantize(p, bits)
    return dequantize(codes, qparams, bits, p.shape[0], p.shape[1], p.dtype)
