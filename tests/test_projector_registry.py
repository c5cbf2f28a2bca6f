"""The projector protocol (lowrank_compile/projectors): the registry, each kind's capabilities,
and a new kind plugged in through its file and one registry line, trained end to end.

The plug-in test is the protocol's contract: a kind the backend has never heard of, registered
beside the others, must be what the compiled step refreshes and projects with. It is checked
against the eager GaLore reference (tests/galore_reference.py) fed the same kind's projectors,
and by counting the kind's own refresh calls.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from helpers import train_beside_galore_reference

from lowrank_compile import config
from lowrank_compile import projectors
from lowrank_compile.projectors.base import Unsupported
from lowrank_compile.runtime import projector as pm
from lowrank_compile.runtime.state import lookup

PROJECTED = ["0.weight", "2.weight"]  # the MLP's hidden matmul weights


def test_registry_lists_the_option_values_in_order():
    # config.PROJECTORS is the option's accepted values and the checkpoint's encoding (by index).
    assert projectors.names() == config.PROJECTORS
    for name in config.PROJECTORS:
        assert projectors.get(name).name == name


def test_an_unknown_kind_is_named_with_the_known_ones():
    with pytest.raises(KeyError, match="unknown projector 'qr'.*svd, randomized, dct, sparse, gaussian"):
        projectors.get("qr")


@pytest.mark.parametrize("name", config.PROJECTORS)
@pytest.mark.parametrize("shape, side", [((37, 20), "left"), ((20, 37), "right")])
def test_each_kind_does_what_its_attributes_say(name, shape, side):
    kind = projectors.get(name)
    d, r = (shape[0] if side == "left" else shape[1]), 5
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    init = kind.initial(d, r, 11, torch.device("cpu"), torch.float32)
    assert init.shape == ((d, r) if kind.storage == "matrix" else (0,))
    if kind.refresh_from == "gradient":
        basis = kind.shared_basis(d, torch.float32, torch.device("cpu")) if kind.storage == "basis" else None
        new = kind.choose(g, r, side, "canonical", basis)
        if kind.storage == "basis":
            assert new.dtype == torch.int64 and new.shape == (r,) and torch.equal(new, new.sort().values)
            p = basis.index_select(1, new)
        else:
            p = new
    elif kind.refresh_from == "sketch":
        k = kind.sketch_width(r, d)
        assert r <= k <= d
        omega = torch.randn(shape[1] if side == "left" else shape[0], k, dtype=torch.float64)
        p = kind.from_sketch((g if side == "left" else g.t()) @ omega, r, "canonical")
    else:
        assert kind.storage == "seeded"
        key = torch.tensor([1234], dtype=torch.int64)
        p = kind.generate(key, d, r, min(shape), torch.float64)
        assert torch.equal(p, kind.generate(key.clone(), d, r, min(shape), torch.float64))  # a pure function
    assert p.shape == (d, r)
    gram = p.double().t() @ p.double()
    if kind.orthonormal:
        assert torch.allclose(gram, torch.eye(r, dtype=torch.float64), atol=1e-5)  # fp32 columns
    else:
        assert not torch.allclose(gram, torch.eye(r, dtype=torch.float64), atol=1e-2)
    # Capabilities a kind lacks are refused loudly, not run.
    if kind.storage != "seeded":
        with pytest.raises(RuntimeError, match="has no seeded generator"):
            kind.generate(torch.tensor([1]), d, r, min(shape), torch.float32)


def test_stored_bytes_follow_the_storage():
    assert projectors.stored_bytes("svd", 64, 8, 2) == 64 * 8 * 2
    assert projectors.stored_bytes("dct", 64, 8, 2) == 8 * 8  # int64 column indices
    assert projectors.stored_bytes("gaussian", 64, 8, 2) == 0
    assert projectors.stored_bytes("randomized", 64, 8, 4, bits=8) < 64 * 8 * 4


class _RangeFromGradient(Unsupported):
    """A new kind: a stored matrix, refreshed from the full gradient by QR of A Omega (fixed Omega)."""

    name: ClassVar[str] = "qr_range"
    storage: ClassVar = "matrix"
    refresh_from: ClassVar = "gradient"
    orthonormal: ClassVar[bool] = True
    summary: ClassVar[str] = "test kind"
    calls: ClassVar[list[tuple[int, ...]]] = []

    def initial(self, d, r, seed, device, dtype):
        return torch.zeros(d, r, device=device, dtype=dtype)

    def choose(self, g, rank, side, signs, basis):
        type(self).calls.append(tuple(g.shape))
        return qr_range(g, rank, side)


def qr_range(g: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    a = (g if side == "left" else g.t()).double()
    omega = torch.randn(a.shape[1], rank, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    q = torch.linalg.qr(a @ omega).Q
    return pm.canonical_signs(q).to(g.dtype).contiguous()


def test_a_new_kind_plugs_in_through_the_registry(monkeypatch):
    kind = _RangeFromGradient()
    kind.calls.clear()
    monkeypatch.setitem(projectors._REGISTRY, kind.name, kind)
    monkeypatch.setattr(config, "PROJECTORS", (*config.PROJECTORS, kind.name))

    def basis(name, g, side, k):
        return qr_range(g, 8, side)

    # float64 end to end, the same QR on both sides: only summation order differs (1e-12).
    cm = train_beside_galore_reference(
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0),
        "adamw",
        basis,
        {"projector": kind.name},
        PROJECTED,
        tol=1e-12,
    )
    # Refreshes at updates 0, 3, 6 for each projected matrix, from its full gradient.
    assert sorted(kind.calls) == sorted([(40, 24)] * 3 + [(40, 40)] * 3)
    for n, p in cm.named_parameters():
        st = lookup(p)
        if n in PROJECTED:
            assert st.proj.method == kind.name and st.proj.kind is kind
            assert st.proj.refreshes == 3 and st.owned_bytes()["projectors"] == 8 * st.proj.reduced * 8
