"""Checkpoints: the backend's states go into `opt.state_dict()` and come back from `load_state_dict()`.

`opt.state_dict()["state"][i]` for a taken-over parameter (index i, as torch.optim numbers them)
holds:
- `"lowrank"`: everything needed to resume bit for bit. That is the kind, the optimizer states,
  and for projected parameters the projector (or DCT indices) and the refresh schedule. Every
  tensor is stored as its raw bytes (uint8) with its dtype and shape. torch.optim's loader casts
  all tensors of a state to the parameter's dtype, and byte values 0..255 survive that cast in
  every float dtype. The entry is plain tensors, numbers, strings and lists, so it loads with
  `torch.load(..., weights_only=True)`.
- for full-rank parameters with 32-bit states, also torch.optim's own keys (`step`, `exp_avg`,
  ...). A lowrank checkpoint of that kind loads into plain torch.optim.

Loading goes through one function, `restore`. It runs when the backend takes a parameter over,
so a checkpoint loaded into a fresh optimizer before the first compiled step still works, and it
runs from a load post-hook once the optimizer is bound. It converts, with one LowRankWarning per
kind of conversion:
- 8-bit <-> 32-bit storage (`state_bits` changed): exact up to the 8-bit rounding;
- an eager torch.optim state, or a full-rank one, into a projected parameter: the projector
  becomes the top-r singular vectors of the first moment. First moments are projected, and
  second moments are projected with the elementwise square of the projector (the same
  approximation as `rotate_states`);
- a projected state into a full-rank parameter: states back-projected the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from lowrank_compile import projectors
from lowrank_compile.config import METHODS
from lowrank_compile.config import PROJECTORS
from lowrank_compile.projectors.seeded import seed_key
from lowrank_compile.projectors.svd import svd_projector
from lowrank_compile.runtime import projector as pm
from lowrank_compile.runtime import quant

__all__ = ["export", "restore"]

FORMAT = 1  # version of the "lowrank" entry
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")
# torch.optim's loader rebuilds every iterable it finds in a state, strings included (into
# garbage), so the entry holds no strings: dtypes, sides and methods are stored as small ints.
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.uint8, torch.int64, torch.int32)
_SIDES = ("left", "right")
_METHODS = PROJECTORS  # a projector kind is stored as its index there (config.py: append only)


def _enc(t: torch.Tensor) -> dict[str, Any]:
    t = t.detach().contiguous()
    return {
        "bytes": t.reshape(-1).view(torch.uint8).cpu().clone(),
        "dtype": _DTYPES.index(t.dtype),
        "shape": list(t.shape),
    }


def _dec(d: dict[str, Any], device: torch.device) -> torch.Tensor:
    raw = d["bytes"]
    # Cast to the parameter's float dtype by torch.optim's loader; 0..255 are exact in all of them.
    raw = raw.round().to(torch.uint8) if raw.is_floating_point() else raw.to(torch.uint8)
    return raw.to(device).view(_DTYPES[int(d["dtype"])]).reshape([int(x) for x in d["shape"]]).clone()


def _enc_state(v: Any) -> dict[str, Any]:
    if isinstance(v, quant.QState):
        return {
            "q": True,
            "codes": _enc(v.codes),
            "absmax": _enc(v.absmax),
            "signed": v.signed,
            "sqrt": v.sqrt,
            "shape": list(v.shape),
        }
    return {"q": False, "t": _enc(v)}


def _dec_state(d: dict[str, Any], device: torch.device) -> Any:
    """A stored state: a tensor, or a QState for an 8-bit one (kept as codes, so bit-exact)."""
    if d["q"]:
        shape = tuple(int(x) for x in d["shape"])
        # Entries written before second moments were stored as square roots have no "sqrt".
        sqrt = bool(d.get("sqrt", False))
        return quant.QState(
            _dec(d["codes"], device), _dec(d["absmax"], device), bool(d["signed"]), shape, sqrt
        )
    return _dec(d["t"], device)


def _plain(v: Any) -> torch.Tensor:
    return v.dequantize() if isinstance(v, quant.QState) else v


def export(st: Any) -> dict[str, Any] | None:
    """The state_dict entry of taken-over parameter `st` (None when it has no state yet)."""
    if not st.ostate:
        return None
    entry: dict[str, Any] = {}
    low: dict[str, Any] = {
        "format": FORMAT,
        "projected": st.proj is not None,
        "states": {k: _enc_state(v) for k, v in st.ostate.items()},
        # A dict, not a list of names: Optimizer.load_state_dict re-casts every iterable value
        # element-wise, which turns a str into the repr of a generator; dict keys survive.
        "scalars": dict.fromkeys(st.scalar_keys, True),
        "first": bool(st.binding is not None and st.binding.is_first(st)),
        "rounds": int(st.rounds),
        # clip_stats="auto": 2 = a clip has read this gradient, 1 = updated with no clip yet, 0 = not
        # updated. A resumed run picks the backward variant the uninterrupted one would (bit for bit).
        "clip": 2 if st.clip_seen else int(st.stepped),
    }
    if st.mstate:  # the method's own states (lowrank_compile/methods), under the method's index
        low["opt_method"] = METHODS.index(st.config.method)
        low["mstates"] = {k: _enc(v) for k, v in st.mstate.items()}
    if st.proj is not None:
        pj = st.proj
        low.update(
            side=_SIDES.index(pj.side),
            rank=pj.rank,
            method=_METHODS.index(pj.method),
            # Quantized projectors: the dequantized matrix (for conversions) and the codes themselves.
            projector=_enc(pj.index if pj.index is not None else pj.projector()),
            pbits=pj.pbits,
            pcodes=_enc(pj.pcodes) if pj.pcodes is not None else None,
            pqparams=_enc(pj.pqparams) if pj.pqparams is not None else None,
            pending=_enc(pj.pending_p) if pj.pending_p is not None else None,
            has_p=pj.has_p,
            updates=pj.updates,
            next_refresh=pj.next_refresh,
            gap=pj.gap,
            refreshes=pj.refreshes,
            sims=[float(x) for x in pj.sims],
        )
    # Step counters always go under torch.optim's own keys too (Adam's `__setstate__` reads
    # `step` of every non-empty state), and full-rank 32-bit states as well, so plain torch.optim
    # loads such a checkpoint and continues from it.
    torch_format = st.proj is None and not any(isinstance(v, quant.QState) for v in st.ostate.values())
    for k, v in st.ostate.items():
        if isinstance(v, quant.QState):
            continue
        if k in st.scalar_keys:
            entry[k] = v.detach().reshape(()).float().clone()
        elif torch_format:
            entry[k] = v.detach().clone()
    entry["lowrank"] = low
    return entry


def _note(msg: str) -> None:
    from lowrank_compile.backend import warn_once

    warn_once(msg)


def _project_state(key: str, full: torch.Tensor, p: torch.Tensor, side: pm.Side) -> torch.Tensor:
    if key in SECOND_MOMENTS:
        return pm.project(full, p * p, side).clamp_min(0)
    return pm.project(full, p, side)


def _back_project_state(key: str, low: torch.Tensor, p: torch.Tensor, side: pm.Side) -> torch.Tensor:
    if key in SECOND_MOMENTS:
        return pm.project_back(low, p * p, side).clamp_min(0)
    return pm.project_back(low, p, side)


def restore(st: Any, entry: Any) -> None:
    """Load a state_dict entry (ours or eager torch.optim's) into `st` for its next update.

    The states land in `st.pending_state`; the binding moves them into its storage (converting
    between 8-bit and 32-bit) when it next builds the update.
    """
    name = st.plan.name
    if not isinstance(entry, dict):
        raise TypeError(f"lowrank: optimizer state of {name!r} is a {type(entry).__name__}, expected a dict")
    dev = st.view.device
    low = entry.get("lowrank")
    states: dict[str, Any]
    first = False
    if isinstance(low, dict):
        if low.get("format") != FORMAT:
            raise ValueError(
                f"lowrank: checkpoint entry of {name!r} has format {low.get('format')!r}; this version "
                f"reads format {FORMAT}"
            )
        states = {k: _dec_state(v, dev) for k, v in low["states"].items()}
        for k in low["scalars"]:  # step counters: 0-d from here on, as in torch.optim's states
            states[k] = states[k].reshape(())
        first = bool(low.get("first", False))
        st.rounds = int(low.get("rounds", 0))
        st.pending_mstate = None
        if "mstates" in low:
            saved = METHODS[int(low["opt_method"])]
            if saved == st.config.method:
                st.pending_mstate = {k: _dec(v, dev) for k, v in low["mstates"].items()}
            else:
                _note(
                    f"lowrank: {name}: checkpoint states of method {saved!r}; "
                    f"{st.config.method!r} starts its own afresh"
                )
        clip = int(low.get("clip", 0))
        st.clip_seen = clip == 2
        st.stepped = clip > 0
        if low["projected"]:
            side, rank, method = _SIDES[int(low["side"])], int(low["rank"]), _METHODS[int(low["method"])]
            stored = _dec(low["projector"], dev)
            pj = st.proj
            if pj is not None and (side, rank, _family(method)) == (pj.side, pj.rank, _family(pj.method)):
                if pj.index is not None:
                    pj.index.copy_(stored)
                elif not pj.seeded:
                    pj.set_matrix(stored)
                    if pj.pcodes is not None and int(low.get("pbits", 32)) == pj.pbits:
                        assert pj.pqparams is not None
                        pj.pcodes.copy_(_dec(low["pcodes"], dev))  # bit for bit, not requantized
                        pj.pqparams.copy_(_dec(low["pqparams"], dev))
                pj.pending_p = _dec(low["pending"], dev) if low.get("pending") is not None else None
                pj.has_p = bool(low["has_p"])
                pj.updates, pj.next_refresh = int(low["updates"]), int(low["next_refresh"])
                pj.gap, pj.refreshes = int(low["gap"]), int(low["refreshes"])
                pj.sims.clear()
                pj.sims.extend(float(x) for x in low["sims"])
                if pj.seeded:  # nothing stored: the key follows from the name and the refresh count
                    pj.sync_key()
                if method != pj.method:
                    _note(
                        f"lowrank: {name}: checkpoint projector came from {method!r}; "
                        f"refreshes now use {pj.method!r}"
                    )
            else:
                # Another rank, side or projector family: back to full size, then on as a full state.
                states = _full_size(name, low, states, tuple(st.view.shape), dev)
                if st.proj is not None:
                    states = _into_projection(st, states)
        elif st.proj is not None:
            states = _into_projection(st, states)
    else:
        # An eager torch.optim state: plain tensors under the optimizer's own keys.
        states = {k: v for k, v in entry.items() if isinstance(v, torch.Tensor)}
        _note(
            f"lowrank: {name}: took over a torch.optim state ("
            + ("projected onto its rank-r subspace" if st.proj is not None else "full-rank")
            + (", stored 8-bit" if st.config.state_bits == 8 else "")
            + ")"
        )
        if st.proj is not None:
            states = _into_projection(st, states)
    st.pending_state = states
    st.pending_first = first
    if st.binding is not None:
        st.binding.invalidate()


def _full_size(
    name: str, low: dict[str, Any], states: dict[str, Any], shape: tuple[int, ...], dev: torch.device
) -> dict[str, torch.Tensor]:
    """Projected stored states back at full size (second moments approximately), with a warning."""
    side: pm.Side = "left" if int(low["side"]) == 0 else "right"
    rank, method = int(low["rank"]), _METHODS[int(low["method"])]
    stored = _dec(low["projector"], dev)
    d = shape[0] if side == "left" else shape[1]
    kind = projectors.get(method)
    if kind.storage == "basis":
        stored = kind.shared_basis(d, torch.float32, dev).index_select(1, stored.long())
    elif kind.storage == "seeded":
        from lowrank_compile.runtime.state import name_seed

        key = seed_key(name_seed(name), int(low["refreshes"]))
        stored = kind.generate(torch.tensor([key], device=dev), d, rank, min(shape[:2]), torch.float32)
    _note(
        f"lowrank: {name}: checkpoint states were projected (rank {rank}, {side}); they were "
        "projected back to full size (second moments approximately)"
    )
    return {
        k: _plain(v)
        if _plain(v).dim() == 0
        else _back_project_state(k, _plain(v).float(), stored.float(), side)
        for k, v in states.items()
    }


def to_torch(name: str, entry: dict[str, Any], param: torch.Tensor) -> dict[str, Any]:
    """A lowrank entry in torch.optim's own format, for a parameter torch.optim now updates."""
    low = entry["lowrank"]
    states = {k: _dec_state(v, param.device) for k, v in low["states"].items()}
    for k in low["scalars"]:
        states[k] = states[k].reshape(())
    if low["projected"]:
        states = _full_size(name, low, states, tuple(param.shape), param.device)
    elif any(isinstance(v, quant.QState) for v in states.values()):
        _note(f"lowrank: {name}: 8-bit checkpoint states were dequantized for torch.optim")
    out: dict[str, Any] = {}
    for k, v in states.items():
        v = _plain(v)
        out[k] = v.float() if v.dim() == 0 else v.to(param.dtype)
    return out


def forget(st: Any) -> None:
    """Drop the optimizer state of `st`, as loading a state_dict without an entry for it does."""
    st.ostate = None
    st.pending_state = None
    st.pending_mstate = None
    st.pending_first = True
    st.stepped = False  # a fresh state's first step keeps the clip statistics, as a fresh run's does
    if st.proj is not None:
        pj = st.proj
        pj.has_p = False
        pj.pending_p = None
        pj.updates = pj.next_refresh = pj.refreshes = 0
        pj.gap = st.config.update_gap
        pj.sims.clear()
    if st.binding is not None:
        st.binding.invalidate()


def _family(method: str) -> str:
    """What a stored projector entry holds: "matrix" (any matrix kind reads it), or its kind's name.

    A basis kind's indices and a seeded kind's (absent) projector are read by that kind only.
    """
    return "matrix" if projectors.get(method).storage == "matrix" else method


def _into_projection(st: Any, states: dict[str, Any]) -> dict[str, Any]:
    """Full-size states into `st`'s projection: P from the first moment's top singular vectors."""
    pj = st.proj
    states = {k: _plain(v) for k, v in states.items()}
    first = next((v for k, v in states.items() if v.shape == st.view.shape and k not in SECOND_MOMENTS), None)
    if first is None:
        return {k: v for k, v in states.items() if v.dim() == 0}
    if pj.index is not None:  # a basis kind: the columns best aligned with the first moment
        pj.index.copy_(pj.kind.choose(first.float(), pj.rank, pj.side, st.config.svd_signs, pj.basis.float()))
        new = pj.basis.index_select(1, pj.index).float()
    elif pj.seeded:  # the first seeded projector; nothing to choose
        pj.refreshes = max(pj.refreshes, 1)
        pj.sync_key()
        new = pj.projector().float()
    else:
        new = svd_projector(first.float(), pj.rank, pj.side, st.config.svd_signs)
        pj.set_matrix(new)
    pj.has_p = True
    pj.pending_p = None
    step = next((v for v in states.values() if v.dim() == 0), None)
    pj.updates = int(step.item()) if step is not None else 0
    pj.next_refresh = pj.updates + pj.gap
    onto = f"the top-{pj.rank} singular vectors of the first moment"
    if pj.seeded:
        onto = f"its seeded {pj.method} projector"
    _note(
        f"lowrank: {st.plan.name}: full-size optimizer states were projected onto {onto} "
        "(second moments approximately)"
    )
    return {k: v if v.dim() == 0 else _project_state(k, v.float(), new, pj.side) for k, v in states.items()}


def store_pending_method(st: Any) -> None:
    """Move `st.pending_mstate` (a checkpoint's method states) into `st.mstate`, bit for bit."""
    pending, st.pending_mstate = st.pending_mstate, None
    if pending is None:
        return
    for key, dst in st.mstate.items():
        if key not in pending:
            _note(f"lowrank: {st.plan.name}: checkpoint lacks method state {key!r}; it starts afresh")
            continue
        _check_shape(st, key, pending[key], tuple(dst.shape))
        dst.copy_(pending[key].to(dst.dtype))


def store_pending(st: Any, specs: Any) -> bool:
    """Move `st.pending_state` into the allocated storage `st.ostate`; True if the states were restored.

    8-bit stored states go into 8-bit storage code for code; other combinations convert
    (quantize or dequantize). A state the rule needs but the entry lacks starts the rule afresh.
    """
    pending = st.pending_state
    st.pending_state = None
    if pending is None:
        return False
    missing = [s.key for s in specs if s.key not in pending]
    if missing:
        if pending:
            _note(f"lowrank: {st.plan.name}: checkpoint lacks optimizer states {missing}; they start afresh")
        return False
    for spec in specs:
        dst, src = st.ostate[spec.key], pending[spec.key]
        if spec.scalar:
            dst.copy_(_plain(src).reshape(1).to(dst.dtype))
        elif isinstance(dst, quant.QState):
            same = (src.signed, src.sqrt, src.shape) if isinstance(src, quant.QState) else None
            if same == (dst.signed, dst.sqrt, dst.shape):
                dst.codes.copy_(src.codes)
                dst.absmax.copy_(src.absmax)
                continue
            value = _plain(src)
            _check_shape(st, spec.key, value, dst.shape)
            dst.assign(value)
        else:
            value = _plain(src)
            _check_shape(st, spec.key, value, tuple(dst.shape))
            dst.copy_(value.to(dst.dtype))
    return not st.pending_first


def _check_shape(st: Any, key: str, value: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"lowrank: checkpoint state {key!r} of {st.plan.name!r} has shape {tuple(value.shape)}, "
            f"expected {tuple(shape)}"
        )
