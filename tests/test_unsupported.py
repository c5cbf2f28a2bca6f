"""Acceptance 4: unsupported optimizers are left alone with one warning; bad options raise clearly."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from helpers import make_step
from models import mlp
from models import mlp_batch
from models import mlp_loss

import lowrank_compile
from lowrank_compile.backend import LowRankWarning
from lowrank_compile.runtime.binding import binding_of


def test_rmsprop_compiles_warns_once_and_matches_eager():
    base = mlp().double()
    em, lm = copy.deepcopy(base), copy.deepcopy(base)
    eo = torch.optim.RMSprop(em.parameters(), lr=1e-3, momentum=0.5)
    lo = torch.optim.RMSprop(lm.parameters(), lr=1e-3, momentum=0.5)
    estep = make_step(em, eo, mlp_loss)
    lstep = torch.compile(
        make_step(lm, lo, mlp_loss), backend="lowrank", options={"rank": None, "min_dim": 4}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(4):
            x, y = mlp_batch(i)
            estep((x.double(), y))
            lstep((x.double(), y))
    ours = [w for w in caught if issubclass(w.category, LowRankWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    msg = str(ours[0].message)
    assert "RMSprop is not supported" in msg and "0.weight" in msg and "AdamW" in msg
    assert binding_of(lo) is None  # nothing of RMSprop's was touched
    assert all(pp.kind.value == "torch" for pp in lowrank_compile.current_plan().params)
    # float64: the Inductor-compiled RMSprop step is eager-exact to rounding.
    for (n, pe), (_, pl) in zip(em.named_parameters(), lm.named_parameters()):
        assert torch.allclose(pl, pe, rtol=1e-9, atol=1e-12), n


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"rank": -1}, "lowrank option 'rank': got -1; accepted values: int >= 1, float in (0, 1], or None"),
        ({"rank": 1.5}, "option 'rank': got 1.5"),
        ({"rank": "big"}, "option 'rank': got 'big'"),
        ({"state_bits": 4}, "option 'state_bits': got 4; accepted values: 32 | 8"),
        ({"proj_type": "diagonal"}, "accepted values: std | reverse_std | left | right"),
        ({"projector": "qr"}, "accepted values: svd | randomized | dct"),
        ({"update_gap": 0}, "option 'update_gap': got 0"),
        ({"scale": float("nan")}, "option 'scale': got nan"),
        ({"min_dim": True}, "option 'min_dim': got True"),
        ({"include": [3]}, "option 'include': got [3]"),
        (
            {"rnak": 8},
            # The message names every accepted option (the README's table order), the
            # option the user most likely meant first in the hint.
            "unknown lowrank option 'rnak' (did you mean 'rank'?); accepted options: method, rank, "
            "update_gap, scale,",
        ),
    ],
)
def test_bad_option_raises_documented_error_through_torch_compile(options, needle):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters())
    step = torch.compile(make_step(model, opt, mlp_loss), backend="lowrank", options=options)
    with pytest.raises(lowrank_compile.LowRankOptionError) as info:
        step(mlp_batch(0))
    assert needle in str(info.value)
    if "unknown lowrank option" in needle:
        from lowrank_compile.config import LowRankConfig

        listed = str(info.value).split("accepted options: ", 1)[1].splitlines()[0]
        accepted = listed.split(", ")
        assert sorted(accepted) == sorted(f.name for f in dataclasses.fields(LowRankConfig))
    # Dynamo did not wrap it: the user sees our error, not BackendCompilerFailed.
    assert "BackendCompilerFailed" not in type(info.value).__name__
    assert isinstance(info.value, ValueError)
