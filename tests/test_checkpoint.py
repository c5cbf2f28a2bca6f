"""Checkpoints: `opt.state_dict()` / `load_state_dict()` carry the backend's state, as in eager.

The resume tests run in fresh interpreters (tests/ckpt_worker.py): one uninterrupted run that
saves at step 7, one that loads that file with `weights_only=True` and continues to step 15.
The same compiled kernels on the same inputs give the same bits, so the bar is bit identity.
"""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import mlp
from models import mlp_batch
from models import mlp_loss
from models import wide_mlp

from lowrank_compile.runtime import quant
from lowrank_compile.runtime.state import lookup

HERE = Path(__file__).parent
FULL32 = {"rank": None, "state_bits": 32, "min_dim": 4}
PROJ8 = {"rank": 16, "update_gap": 3, "state_bits": 8, "min_dim": 4}


def _worker(options: dict, out: Path, mode: str) -> dict:
    subprocess.run(
        [sys.executable, str(HERE / "ckpt_worker.py"), json.dumps(options), str(out), mode],
        check=True,
        cwd=HERE,
        timeout=600,
    )
    return torch.load(out / f"{mode}.pt", weights_only=True)


@pytest.mark.parametrize(
    "options,kinds",
    [
        (FULL32, {"0.weight": "full/Tensor+Tensor+Tensor"}),
        # svd refreshes at updates 0, 3, 6, 9, 12: the resumed run refreshes twice after loading.
        (PROJ8, {"0.weight": "projected/Tensor+QState+QState", "2.weight": "projected/Tensor+QState+QState"}),
        (
            {**PROJ8, "projector": "randomized"},  # the sketch's seed and the lagged projector resume
            {"2.weight": "projected/Tensor+QState+QState"},
        ),
        (
            # Nothing stored: the resumed process regenerates the projector from name + refresh count.
            {**PROJ8, "projector": "sparse"},
            {"0.weight": "projected/Tensor+QState+QState", "2.weight": "projected/Tensor+QState+QState"},
        ),
        (  # 4-bit projector codes travel raw: the resumed run reads the same codes
            {**PROJ8, "projector_bits": 4},
            {"0.weight": "projected/Tensor+QState+QState", "2.weight": "projected/Tensor+QState+QState"},
        ),
        # The methods (lowrank_compile/methods): their own states resume too (Fira's and APOLLO's
        # limiter norm); FRUGAL restarts its states at the refreshes after the resume.
        # ~60 s each: slow (CI time); GradNormLoRP's case runs the same method-state paths.
        pytest.param(
            {**PROJ8, "method": "fira"},
            {"0.weight": "projected/Tensor+QState+QState+fira_residual_norm"},
            marks=pytest.mark.slow,
        ),
        pytest.param(
            {**PROJ8, "method": "frugal"},
            {"0.weight": "projected/Tensor+QState+QState"},
            marks=pytest.mark.slow,
        ),
        pytest.param(
            {**PROJ8, "method": "apollo"},
            {"0.weight": "projected/Tensor+QState+QState+apollo_update_norm"},
            marks=pytest.mark.slow,
        ),
        pytest.param(  # rank 1: 512-value moments stay 32-bit
            {**PROJ8, "method": "apollo-mini", "rank": 1},
            {"0.weight": "projected/Tensor+Tensor+Tensor+apollo_update_norm"},
            marks=pytest.mark.slow,
        ),
        (  # the learned magnitudes, ||V|| and the magnitudes' own AdamW states resume
            {**PROJ8, "method": "gradnorm"},
            {
                "0.weight": "projected/Tensor+QState+QState+gradnorm_magnitude+gradnorm_direction_norm"
                "+gradnorm_step+gradnorm_exp_avg+gradnorm_exp_avg_sq"
            },
        ),
    ],
    ids=[
        "rank-none-fp32",
        "projected-8bit",
        "randomized-8bit",
        "sparse-8bit",
        "projector-4bit",
        "fira-8bit",
        "frugal-8bit",
        "apollo-8bit",
        "apollo-mini",
        "gradnorm-8bit",
    ],
)
def test_resume_in_a_fresh_process_is_bit_identical(tmp_path, options, kinds):
    full = _worker(options, tmp_path, "full")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert sum("lowrank" in e for e in ckpt["opt"]["state"].values()) == 3  # the three weights
    resumed = _worker(options, tmp_path, "resume")
    for name, kind in kinds.items():  # the configuration really ran (8-bit, projected)
        assert full["kinds"][name] == resumed["kinds"][name] == kind
    moved = sum((full["params"][n] - ckpt["model"][n]).abs().sum().item() for n in full["params"])
    assert moved > 0  # steps 8..15 changed the weights
    for n, p in full["params"].items():
        assert torch.equal(p, resumed["params"][n]), n
    assert full["projectors"].keys() == resumed["projectors"].keys()
    assert bool(full["projectors"]) == (options["rank"] is not None)
    for n, p in full["projectors"].items():  # two processes, the same projector after 4-5 refreshes
        assert torch.equal(p, resumed["projectors"][n]), n
    if options.get("projector") == "sparse":
        assert set(full["projector_bytes"].values()) == {0}  # regenerated, never stored
        assert all((p != 0).float().mean() < 0.5 for p in full["projectors"].values())  # really sparse


def _adamw(model, **kw):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **kw)


def _stepper(model, opt, options=None):
    dtype = next(model.parameters()).dtype

    def step(i):
        x, y = mlp_batch(i)
        mlp_loss(model, (x.to(dtype), y)).backward()
        opt.step()
        opt.zero_grad()

    return torch.compile(step, backend="lowrank", options=options) if options else step


def _rel(m1, m2) -> float:
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(m1.parameters(), m2.parameters()))


def test_rewind_within_a_process_by_loading_an_earlier_state_dict():
    model = mlp()
    opt = _adamw(model)
    step = _stepper(model, opt, PROJ8 | {"rank": 8})
    for i in range(3):
        step(i)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    for i in range(3, 6):
        step(i)
    after = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    assert not any(p in opt.state for p in (model[0].weight, model[2].weight))  # the backend took them back
    for i in range(3, 6):
        step(i)
    assert all(torch.equal(a, p) for a, p in zip(after, model.parameters()))


def test_lowrank_fp32_checkpoint_loads_into_plain_torch_optim():
    model = mlp()
    opt = _adamw(model)
    step = _stepper(model, opt, FULL32)
    for i in range(3):
        step(i)
    sd = opt.state_dict()
    eager = _adamw(copy.deepcopy(model))
    eager.load_state_dict(sd)
    p_e = list(eager.param_groups[0]["params"])[0]
    st = lookup(model[0].weight)
    assert st is not None
    assert torch.equal(eager.state[p_e]["exp_avg"], st.ostate["exp_avg"])
    assert torch.equal(eager.state[p_e]["exp_avg_sq"], st.ostate["exp_avg_sq"])
    assert eager.state[p_e]["step"].item() == 3.0


def test_eager_checkpoint_continues_under_the_backend():
    base = mlp().double()  # fp64: AdamW amplifies fp32 gradient noise where v is tiny
    em = copy.deepcopy(base)
    eo = _adamw(em)
    estep = _stepper(em, eo)
    for i in range(3):
        estep(i)
    lm = copy.deepcopy(em)
    lo = _adamw(lm)
    lo.load_state_dict(copy.deepcopy(eo.state_dict()))  # torch.optim aliases loaded tensors
    lstep = _stepper(lm, lo, FULL32)
    with pytest.warns(UserWarning, match="took over a torch.optim state"):
        lstep(3)
    estep(3)
    for i in range(4, 8):
        estep(i)
        lstep(i)
    assert lookup(lm[0].weight) is not None and lm[0].weight not in lo.state
    assert _rel(lm, em) <= 1e-10  # fp64 eager-vs-compiled trajectories differ by ~1e-14 (test_numerics)


def _take_over_only(model, opt, options):
    """Compile and run a backward only: the backend takes the parameters over, no update runs."""
    torch.compile(lambda i: mlp_loss(model, mlp_batch(i)).backward(), backend="lowrank", options=options)(0)


def test_eager_checkpoint_projected_onto_the_first_moments_subspace():
    em = mlp()
    eo = _adamw(em)
    estep = _stepper(em, eo)
    for i in range(3):
        estep(i)
    lm = copy.deepcopy(em)
    lo = _adamw(lm)
    lo.load_state_dict(copy.deepcopy(eo.state_dict()))  # torch.optim aliases loaded tensors
    with pytest.warns(UserWarning, match="projected onto the top-8 singular vectors of the first moment"):
        _take_over_only(lm, lo, {"rank": 8, "update_gap": 50, "state_bits": 32, "min_dim": 4})
    lo.state_dict()  # moves the loaded states into the backend's storage
    st = lookup(lm[2].weight)
    # 40 x 40: GaLore's std rule keeps the columns (m >= n), so P reduces the right side.
    assert st is not None and st.proj is not None and st.proj.side == "right" and lm[2].weight not in lo.state
    m, v = eo.state[em[2].weight]["exp_avg"], eo.state[em[2].weight]["exp_avg_sq"]
    # Reference: P = the top-8 right singular vectors of m (compared sign-free through P P^T);
    # states m P and, for the second moment, v (P * P) (the documented approximation).
    u = torch.linalg.svd(m).Vh[:8].t()
    p = st.proj.p
    assert torch.allclose(p @ p.t(), u @ u.t(), atol=1e-5)  # fp32 SVD of a 40 x 40 matrix
    torch.testing.assert_close(st.ostate["exp_avg"], m @ p)
    torch.testing.assert_close(st.ostate["exp_avg_sq"], (v @ (p * p)).clamp_min(0))
    assert st.ostate["step"].item() == 3.0
    assert st.proj.updates == 3 and st.proj.next_refresh == 53  # the next refresh a gap later


def test_loading_a_state_dict_without_entries_restarts_the_state_as_eager_does():
    base = mlp().double()  # fp64, as above
    em, lm = copy.deepcopy(base), copy.deepcopy(base)
    eo, lo = _adamw(em), _adamw(lm)
    empty = copy.deepcopy(_adamw(mlp()).state_dict())
    estep, lstep = _stepper(em, eo), _stepper(lm, lo, FULL32)
    for i in range(3):
        estep(i)
        lstep(i)
    eo.load_state_dict(empty)
    lo.load_state_dict(empty)
    assert lookup(lm[0].weight).ostate is None
    for i in range(3, 6):
        estep(i)
        lstep(i)
    assert lookup(lm[0].weight).ostate["step"].item() == 3.0  # restarted at 0, three steps since
    assert _rel(lm, em) <= 1e-10  # as above


@pytest.mark.parametrize("saved_bits,loaded_bits", [(32, 8), (8, 32), (8, 8)])
def test_state_bits_change_across_a_checkpoint(saved_bits, loaded_bits):
    import lowrank_compile

    opts = {"rank": None, "min_dim": 4}
    model = wide_mlp()
    opt = _adamw(model)
    step = _stepper(model, opt, opts | {"state_bits": saved_bits})
    for i in range(3):
        step(i)
    old = lookup(model[0].weight).ostate
    sd = torch.load(_roundtrip(opt.state_dict()), weights_only=True)
    weights = copy.deepcopy(model.state_dict())

    lowrank_compile.reset()  # a new run
    model2 = wide_mlp()
    model2.load_state_dict(weights)
    opt2 = _adamw(model2)
    opt2.load_state_dict(sd)
    _take_over_only(model2, opt2, opts | {"state_bits": loaded_bits})
    opt2.state_dict()
    new = lookup(model2[0].weight).ostate
    assert new["step"].item() == old["step"].item() == 3.0
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        if (saved_bits, loaded_bits) == (32, 8):  # quantized on load, as the state encoder does it
            assert new[key].sqrt == (not signed)  # second moments stored as sqrt(v)
            codes, absmax = quant.encode_blockwise(old[key], signed, sqrt=not signed)
            assert torch.equal(new[key].codes, codes) and torch.equal(new[key].absmax, absmax)
        elif (saved_bits, loaded_bits) == (8, 32):  # dequantized on load, exactly
            assert torch.equal(new[key], old[key].dequantize())
        else:  # 8-bit to 8-bit: code for code
            assert torch.equal(new[key].codes, old[key].codes) and torch.equal(
                new[key].absmax, old[key].absmax
            )


def _roundtrip(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_projected_checkpoint_into_a_full_rank_run_is_projected_back():
    import lowrank_compile

    model = mlp()
    opt = _adamw(model)
    step = _stepper(model, opt, {"rank": 8, "update_gap": 50, "state_bits": 32, "min_dim": 4})
    for i in range(3):
        step(i)
    st = lookup(model[2].weight)
    p, r_m, r_v = st.proj.p.clone(), st.ostate["exp_avg"].clone(), st.ostate["exp_avg_sq"].clone()
    sd = torch.load(_roundtrip(opt.state_dict()), weights_only=True)
    weights = copy.deepcopy(model.state_dict())

    lowrank_compile.reset()
    model2 = mlp()
    model2.load_state_dict(weights)
    opt2 = _adamw(model2)
    opt2.load_state_dict(sd)
    with pytest.warns(UserWarning, match="projected back to full size"):
        _take_over_only(model2, opt2, FULL32)
    opt2.state_dict()
    new = lookup(model2[2].weight).ostate
    # Reference: first moment R P^T (right side), second moment R_v (P * P)^T, clamped at 0.
    torch.testing.assert_close(new["exp_avg"], r_m @ p.t())
    torch.testing.assert_close(new["exp_avg_sq"], (r_v @ (p * p).t()).clamp_min(0))
    assert new["step"].item() == 3.0


def test_lowrank_entry_of_a_parameter_now_left_to_torch_optim_is_converted():
    import lowrank_compile

    model = mlp()
    opt = _adamw(model)
    step = _stepper(model, opt, {"rank": 8, "update_gap": 50, "state_bits": 32, "min_dim": 4})
    for i in range(3):
        step(i)
    st = lookup(model[2].weight)
    p, r_m = st.proj.p.clone(), st.ostate["exp_avg"].clone()
    sd = torch.load(_roundtrip(opt.state_dict()), weights_only=True)
    weights = copy.deepcopy(model.state_dict())

    lowrank_compile.reset()
    model2 = mlp()
    model2.load_state_dict(weights)
    opt2 = _adamw(model2)
    opt2.load_state_dict(sd)
    step2 = _stepper(model2, opt2, FULL32 | {"exclude": ["2.*"]})
    with pytest.warns(UserWarning, match="projected back to full size"):
        step2(3)  # torch.optim updates 2.weight from the converted state (no KeyError)
    w = model2[2].weight
    assert lookup(w) is None and set(opt2.state[w]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt2.state[w]["step"].item() == 4.0
    # Reference for the converted first moment, one AdamW step later: m4 = b1 * (R P^T) + (1 - b1) g4.
    x, y = mlp_batch(3)
    model3 = mlp()
    model3.load_state_dict(weights)
    mlp_loss(model3, (x, y)).backward()
    torch.testing.assert_close(opt2.state[w]["exp_avg"], 0.9 * (r_m @ p.t()) + 0.1 * model3[2].weight.grad)
