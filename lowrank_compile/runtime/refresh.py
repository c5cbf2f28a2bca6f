"""Projector refresh and the low-rank gradient of each update, run at `opt.step()`.

`prepare(st)` runs before the compiled update. It leaves this step's R in `st.proj.r_acc`:

- steady step: R was accumulated by the backward; nothing to do.
- svd/dct refresh step (default): the backward already chose P_new (runtime/refresh_op.py) and
  accumulated R with it; P_new is installed (states rotated when asked).
- full accumulator present (svd/dct refresh steps, `grad_accumulation="full"`): R = proj(full),
  after refreshing P from `full` when due. The full buffer is then dropped.
- randomized refresh: P_new comes from the sketch Y. This update still uses the current
  projector with its exact R, and P_new takes over after it (a one-step lag). The very first
  update therefore runs in the seeded random subspace the projector starts with (as APOLLO's
  random projections do), while the first sketch is collected.

`after_update(st)` counts the update and installs a pending projector.

Seeded projectors (sparse, gaussian) need no gradient to refresh: `advance_seeded` moves the key
to the next refresh as soon as the coming update is due, before that update's first backward
call reads it, so R is accumulated with the projector the update uses (no lag, no refresh
variant of the backward graph).

An SVD that fails or returns non-finite values never produces NaNs or zeros. The previous
projector is kept, with one warning. Before the first projector exists, a QR range finder and
then the first DCT columns are used instead.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lowrank_compile.runtime import projector as pm
from lowrank_compile.runtime.state import SIM_THRESHOLD
from lowrank_compile.runtime.state import ParamState
from lowrank_compile.runtime.state import Projection

__all__ = ["advance_seeded", "after_update", "prepare"]

# Second-moment state keys: rotated with the elementwise square of the change of basis.
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")

_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    from lowrank_compile.backend import LowRankWarning

    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, LowRankWarning, stacklevel=4)


def _fallback_projector(g: torch.Tensor, pj: Projection) -> torch.Tensor:
    """A usable orthonormal projector when the SVD failed and no previous projector exists."""
    from lowrank_compile.runtime.refresh_op import _fallback

    return _fallback(g, pj.rank, pj.side == "left")


def _new_projector_from_full(st: ParamState, g: torch.Tensor) -> torch.Tensor | None:
    """P_new (or basis indices) for a gradient-refreshed kind from the full gradient `g`; None: keep P."""
    pj = st.proj
    assert pj is not None
    try:
        return pj.kind.choose(g, pj.rank, pj.side, st.config.svd_signs, pj.basis)
    except (torch.linalg.LinAlgError, RuntimeError) as err:
        if pj.has_p or pj.kind.storage == "basis":  # a basis kind starts with usable columns
            _warn_once(
                f"lowrank: {pj.method} refresh failed for {st.plan.name} ({err}); "
                "keeping the previous projector"
            )
            return None
        _warn_once(f"lowrank: SVD failed for {st.plan.name} ({err}); using a QR range finder instead")
        return _fallback_projector(g, pj)


def _track_similarity(st: ParamState, old: torch.Tensor | None, new: torch.Tensor) -> None:
    """Q-GaLore's adaptive gap: double the gap once the subspace stops moving."""
    pj = st.proj
    assert pj is not None
    if old is None or not st.config.adaptive_gap:
        return
    a, b = old[:, 0].double(), new[:, 0].double()
    cos = float((a @ b).abs() / (a.norm() * b.norm()).clamp_min(1e-30))
    pj.sims.append(cos)
    if len(pj.sims) == pj.sims.maxlen and sum(pj.sims) / len(pj.sims) >= SIM_THRESHOLD:
        pj.gap *= 2
        pj.sims.clear()


def _rotate_states(st: ParamState, old: torch.Tensor, new: torch.Tensor) -> None:
    """Carry the optimizer's projected states over to the new basis (`rotate_states=True`)."""
    from lowrank_compile.runtime.quant import QState

    pj = st.proj
    assert pj is not None
    if not st.ostate:
        return
    c = (new.double().t() @ old.double()).to(pj.virtual.dtype)  # r x r change of basis
    for key, stored in st.ostate.items():
        t = stored.dequantize() if isinstance(stored, QState) else stored
        if t.shape != pj.virtual.shape:
            continue
        m = c * c if key in SECOND_MOMENTS else c
        rotated = m @ t if pj.side == "left" else t @ m.t()
        if isinstance(stored, QState):
            stored.assign(rotated)
        else:
            stored.copy_(rotated)


def _install(st: ParamState, new: torch.Tensor) -> None:
    """Make `new` (a d x r matrix, or dct indices) the projector, in place."""
    pj = st.proj
    assert pj is not None
    old = pj.projector().clone() if pj.has_p else None
    if pj.kind.storage == "basis":
        assert pj.index is not None
        pj.index.copy_(new)
    else:
        pj.set_matrix(new)
    cur = pj.projector()
    _track_similarity(st, old, cur)
    if old is not None and st.config.rotate_states:
        _rotate_states(st, old, cur)
    elif old is not None:
        reset_if_method_asks(st)
    pj.has_p = True
    pj.refreshes += 1
    pj.next_refresh = pj.updates + pj.gap


def _method_of(st: ParamState) -> Any:
    """The method updating `st`: its binding's, or one made from its options before it is bound."""
    from lowrank_compile import methods

    return st.binding.method if st.binding is not None else methods.make(st.config)


def reset_if_method_asks(st: ParamState) -> None:
    """A new basis: the method's rule states restart from zero (FRUGAL; `Method.resets_states`).

    Zero states and a zero step counter are the rule's first step for the optimizers such
    methods accept (Adam, AdamW: `Rule.zero_init`).
    """
    from lowrank_compile.runtime.quant import QState

    method = _method_of(st)
    if not method.resets_states or not st.ostate:
        return
    for stored in st.ostate.values():
        if isinstance(stored, QState):
            stored.assign(torch.zeros(stored.shape, device=stored.codes.device))
        else:
            stored.zero_()


def advance_seeded(st: ParamState) -> None:
    """A seeded projector due for a refresh moves to its next key (states rotated when asked)."""
    pj = st.proj
    assert pj is not None
    if not pj.seeded or not pj.refresh_due():
        return
    had_p = pj.has_p
    old = pj.projector() if had_p and st.config.rotate_states else None
    pj.refreshes += 1
    pj.sync_key()
    pj.has_p = True
    pj.next_refresh = pj.updates + pj.gap
    if old is not None:
        _rotate_states(st, old, pj.projector())
    elif had_p:
        reset_if_method_asks(st)


def prepare(st: ParamState) -> None:
    """Leave this update's low-rank gradient in `st.proj.r_acc` (refreshing the projector if due)."""
    pj = st.proj
    assert pj is not None
    advance_seeded(st)
    due = pj.refresh_due()
    if pj.bwd_refreshed:
        _install_from_backward(st)
        return
    if pj.full is not None:
        g = pj.full
        if due:
            if pj.kind.refresh_from == "sketch":
                _refresh_sketch_from_full(st, _refresh_source(st, g))
            else:
                new = _new_projector_from_full(st, _refresh_source(st, g))
                if new is not None:
                    _install(st, new)
                else:
                    pj.next_refresh = pj.updates + pj.gap
        pj.r_acc.copy_(pm.project(g.to(pj.r_acc.dtype), pj.projector().to(pj.r_acc.dtype), pj.side))
        if not st.config.reads_full_gradient:  # the method's update reads G too: dropped after it
            pj.full = None
        return
    if due and pj.kind.refresh_from == "sketch":
        _refresh_from_sketch(st)


def _refresh_source(st: ParamState, g: torch.Tensor) -> torch.Tensor:
    """What an svd/dct refresh decomposes: G, or what the method makes of it (`Method.refresh_source`)."""
    return _method_of(st).refresh_source(g, st.view, list(st.mstate.values()))


def _install_from_backward(st: ParamState) -> None:
    """The backward already chose P_new (refresh mode) and accumulated R with it: install it."""
    from lowrank_compile.runtime import refresh_op

    pj = st.proj
    assert pj is not None and pj.refresh_buf is not None
    new, pj.refresh_buf, pj.bwd_refreshed = pj.refresh_buf, None, False
    err = refresh_op.failed(st.plan.name, pj.index if pj.index is not None else pj.current_matrix_input())
    pj.src_cache = None
    if err is not None and (pj.has_p or pj.kind.storage == "basis"):
        # The op passed the current projector through, so R is consistent with keeping it.
        _warn_once(f"lowrank: refresh failed for {st.plan.name} ({err}); keeping the previous projector")
        pj.next_refresh = pj.updates + pj.gap
    else:
        if err is not None:
            _warn_once(f"lowrank: SVD failed for {st.plan.name} ({err}); using a QR range finder instead")
        _install(st, new)
    if pj.full is not None:  # gradients folded from .grad (a backward that was not rewritten)
        pj.r_acc.add_(pm.project(pj.full.to(pj.r_acc.dtype), pj.projector().to(pj.r_acc.dtype), pj.side))
        pj.full = None


def _refresh_from_sketch(st: ParamState) -> None:
    pj = st.proj
    assert pj is not None and pj.sketch_y is not None
    try:
        p_new = pj.kind.from_sketch(pj.sketch_y, pj.rank, st.config.svd_signs)
    except (torch.linalg.LinAlgError, RuntimeError) as err:
        _warn_once(f"lowrank: randomized refresh failed for {st.plan.name} ({err}); keeping the projector")
        p_new = None
    pj.omega = pj.sketch_y = None
    pj.next_refresh = pj.updates + pj.gap
    if p_new is not None:
        pj.pending_p = p_new.to(pj.p.dtype)  # takes over after this update; R stays exact


def _refresh_sketch_from_full(st: ParamState, g: torch.Tensor) -> None:
    """A sketch refresh when the full gradient is there (`grad_accumulation="full"`): no lag needed."""
    pj = st.proj
    assert pj is not None
    st._ensure_sketch()
    assert pj.omega is not None
    pj.sketch_y = ((g if pj.side == "left" else g.t()).float() @ pj.omega.float()).to(pj.r_acc.dtype)
    _refresh_from_sketch(st)
    if pj.pending_p is not None:
        new, pj.pending_p = pj.pending_p, None
        _install(st, new)


def after_update(st: ParamState) -> None:
    """Count the update; a pending projector (randomized refresh) takes over now."""
    pj = st.proj
    assert pj is not None
    pj.updates += 1
    if pj.pending_p is not None:
        new, pj.pending_p = pj.pending_p, None
        _install(st, new)
        pj.next_refresh = pj.updates - 1 + pj.gap
