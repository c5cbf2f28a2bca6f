"""Quantized projectors (`projector_bits` = 16 | 8 | 4): Q-GaLore's group-wise asymmetric codes.

The quantizer is checked against its own error bound (half a step per group) and its byte
count; the compiled training step against the eager GaLore reference whose projector is the
SVD's, stored and read back the same way; and the backward and update really read codes.
"""

from __future__ import annotations

import pytest
import torch
from galore_reference import svd_basis
from helpers import input_roles
from helpers import train_beside_galore_reference

import lowrank_compile
from lowrank_compile import LowRankOptionError
from lowrank_compile.runtime import projector_quant as pq
from lowrank_compile.runtime.state import lookup

PROJECTED = ["0.weight", "2.weight"]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("d, r", [(512, 128), (40, 10), (37, 5)])  # whole groups, a padded last one
def test_codes_are_within_half_a_step_of_the_matrix(bits, d, r):
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(d)))
    codes, qparams = pq.quantize(q, bits)
    back = pq.dequantize(codes, qparams, bits, d, r, torch.float32)
    flat = torch.nn.functional.pad(q.reshape(-1), (0, qparams.shape[0] * pq.GROUP - d * r))
    step = qparams[:, 0:1].expand(-1, pq.GROUP).reshape(-1)[: d * r].view(d, r)
    # Half a step, plus fp32 rounding of lo + q * scale (a few ulps of the group's range).
    assert ((back - q).abs() <= step / 2 + 4e-7).all()
    assert flat.numel() % pq.GROUP == 0 and codes.dtype == torch.uint8
    assert codes.numel() == qparams.shape[0] * pq.GROUP * bits // 8  # 4-bit: two codes per byte
    assert pq.stored_bytes(d, r, bits) == codes.numel() + qparams.numel() * 4


def test_four_bit_bytes_are_under_15_percent_of_fp32():
    d, r = 512, 128
    assert pq.stored_bytes(d, r, 4) / (4 * d * r) <= 0.15  # 0.5 + 8/256 bytes per value: 13.3%
    assert pq.stored_bytes(d, r, 16) == 2 * d * r


def test_sixteen_bit_is_fp16():
    q = torch.randn(33, 7) / 10
    codes, _ = pq.quantize(q, 16)
    assert codes.dtype == torch.float16
    assert torch.equal(pq.dequantize(codes, _, 16, 33, 7, torch.float32), q.half().float())


@pytest.mark.parametrize("bits", [8, 4])
def test_training_matches_the_galore_reference_with_the_stored_projector(bits, monkeypatch):
    roles = input_roles(monkeypatch)

    def make(ps):
        return torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))

    def basis(name, g, side, k):  # GaLore's SVD projector, as it reads back from its codes
        return pq.roundtrip(svd_basis(g, 8, side), bits).to(g.dtype)

    # float64 model; the codes come from the same SVD on both sides (measured <= 1.3e-15).
    cm = train_beside_galore_reference(make, "adamw", basis, {"projector_bits": bits}, PROJECTED, tol=1e-12)
    for n in PROJECTED:
        st = lookup(dict(cm.named_parameters())[n])
        assert st.proj.pcodes is not None and st.proj.p.numel() == 0 and st.proj.refreshes == 3
        assert st.owned_bytes()["projectors"] == pq.stored_bytes(st.proj.reduced, 8, bits)
    # The steady backward read codes; refresh steps ran the refresh op.
    assert {"pcodes", "pqparams", "refresh_code"} <= roles and "proj" not in roles
    est = lowrank_compile.explain()
    assert est.projectors == sum(
        pq.stored_bytes(lookup(p).proj.reduced, 8, bits) for n, p in cm.named_parameters() if n in PROJECTED
    )


@pytest.mark.parametrize("projector", ["dct", "sparse"])
def test_projector_bits_needs_a_stored_matrix(projector):
    with pytest.raises(LowRankOptionError, match="projector_bits.*accepted values"):
        lowrank_compile.LowRankConfig(projector=projector, projector_bits=4)


@pytest.mark.parametrize("bad", [2, 3, 32.0, "4", True])
def test_bad_projector_bits_are_refused(bad):
    with pytest.raises(LowRankOptionError, match="'projector_bits'.*32 \\| 16 \\| 8 \\| 4"):
        lowrank_compile.LowRankConfig(projector_bits=bad)
