"""Gradient clipping that sees the gradients the backend consumed in backward.

`torch.nn.utils.clip_grad_norm_(model.parameters(), c)` reads `p.grad`, which is None for taken-over
parameters, so on its own it would clip with the norm of the remaining parameters only. While any
optimizer is bound, the backend redirects `clip_grad_norm_` and `clip_grad_value_` to the functions
below. It does so by swapping the function inside torch's `_no_grad` wrapper, so every reference
is covered, `from torch.nn.utils import clip_grad_norm_` included. When no taken-over parameter
is in the arguments, the original runs unchanged. accelerate >= 1.16 (HF Trainer's clip) computes
the norm itself from `p.grad` (`get_total_norm` + `clip_grads_with_norm_`), which would leave the
taken-over parameters out of both the norm and the clip; so, when accelerate is loaded,
`Accelerator.clip_grad_norm_` is wrapped too (`_install_accelerate`).

Norm of a taken-over parameter's full gradient:
- full-rank parameter, or projected one whose full gradient is being accumulated
  (`grad_accumulation="full"`, eager backward at an svd/dct refresh step): computed from the full
  buffer, for every norm type.
- projected parameter after one backward call: the backward also accumulates sum(G^2) and
  max|G| of each gradient it consumes, which give the exact 2-norm and inf-norm.
- projected parameter after several backward calls: the norm of the *sum* cannot be rebuilt
  from R alone. The 2-norm is split into the exact projected part ||R||^2, the exact per-call
  residual energies, and the cross terms between calls' residuals, which are estimated from a
  k-column random sketch (`clip_sketch`, see `residual_estimate`). Other norm types raise
  `LowRankClipError`, which says what to do instead. `report()` gives the last estimate's
  relative standard error.
- with `clip_stats="auto"` (the default), once an opt.step() came with no clip before it, the
  backward stops computing sum(G^2) and max|G| (backend.py's "lean" variant); a clip on such a
  step raises `LowRankClipError`, and the statistics come back from the next step on.

Clipping multiplies every accumulator by the same coefficient (sums of squares by its square),
which is exact because projection and the sketch are linear.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ClipReport", "LowRankClipError", "install", "report", "residual_estimate", "uninstall"]


class LowRankClipError(RuntimeError):
    """Clipping cannot be made exact for these taken-over parameters."""


_ORIGINALS: dict[str, tuple[Any, Callable[..., Any]]] = {}


def _cell(wrapper: Any) -> Any | None:
    code = getattr(wrapper, "__code__", None)
    if code is None or "func" not in code.co_freevars or wrapper.__closure__ is None:
        return None
    return wrapper.__closure__[code.co_freevars.index("func")]


def install() -> None:
    """Redirect torch's clip functions to the backend-aware ones (idempotent)."""
    import torch.nn.utils.clip_grad as cg

    from lowrank_compile import _compat

    _install_accelerate()
    for name, ours in (("clip_grad_norm_", clip_grad_norm_), ("clip_grad_value_", clip_grad_value_)):
        if name in _ORIGINALS:
            continue
        wrapper = getattr(cg, name)
        cell = _cell(wrapper)
        if cell is None:  # pragma: no cover - a torch whose wrapper changed shape: patch the module names
            _ORIGINALS[name] = (None, wrapper)
            replacement = _compat.dynamo_disable(ours)
            setattr(cg, name, replacement)
            setattr(torch.nn.utils, name, replacement)
            continue
        _ORIGINALS[name] = (cell, cell.cell_contents)
        cell.cell_contents = _compat.dynamo_disable(ours)


_METHODS: dict[str, tuple[type, Callable[..., Any]]] = {}

# accelerate's distributed types whose clip is not accelerate's own norm over `p.grad`: FSDP and
# DeepSpeed clip inside the engine, XLA reduces first. Their path runs unchanged.
_ACCELERATE_OWN_PATH = ("FSDP", "DEEPSPEED", "XLA")


def _install_accelerate() -> None:
    """Route `Accelerator.clip_grad_norm_` over taken-over parameters to `clip_grad_norm_` below.

    Only when accelerate is already imported (the backend never imports it). The wrapper unscales
    as accelerate does, then clips with the backend-aware norm; without taken-over parameters, or
    under an engine that clips itself, accelerate's own method runs.
    """
    import sys

    mod = sys.modules.get("accelerate.accelerator")
    if mod is None or "accelerate" in _METHODS:
        return
    cls = mod.Accelerator
    orig = cls.clip_grad_norm_

    def accelerate_clip_grad_norm_(self: Any, parameters: Any, max_norm: float, norm_type: float = 2) -> Any:
        from lowrank_compile.runtime.state import lookup

        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        kind = getattr(self.distributed_type, "name", str(self.distributed_type))
        if kind in _ACCELERATE_OWN_PATH or all(lookup(p) is None for p in params):
            return orig(self, params, max_norm, norm_type)
        self.unscale_gradients()
        return clip_grad_norm_(params, max_norm, norm_type)

    accelerate_clip_grad_norm_.__doc__ = orig.__doc__
    accelerate_clip_grad_norm_.__wrapped__ = orig  # type: ignore[attr-defined]
    _METHODS["accelerate"] = (cls, orig)
    cls.clip_grad_norm_ = accelerate_clip_grad_norm_


def uninstall() -> None:
    """Restore torch's own clip functions (and accelerate's method); forget the last report."""
    import torch.nn.utils.clip_grad as cg

    _LAST.clear()

    for key, (cls, method) in list(_METHODS.items()):
        cls.clip_grad_norm_ = method  # type: ignore[attr-defined]
        del _METHODS[key]

    for name, (cell, orig) in list(_ORIGINALS.items()):
        if cell is None:
            setattr(cg, name, orig)
            setattr(torch.nn.utils, name, orig)
        else:
            cell.cell_contents = orig
        del _ORIGINALS[name]


def _original(name: str) -> Callable[..., Any]:
    return _ORIGINALS[name][1]


def _split(parameters: Any) -> tuple[list[torch.Tensor], list[Any]]:
    """(parameters torch sees, taken-over states that hold a gradient)."""
    from lowrank_compile.runtime.state import lookup

    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    states = []
    bindings = {}
    taken = []
    for p in params:
        st = lookup(p)
        if st is not None:
            taken.append(st)
        if st is not None and st.binding is not None:
            bindings[id(st.binding)] = st.binding
            if st.config.update_in_backward:
                from lowrank_compile.config import LowRankOptionError

                raise LowRankOptionError(
                    f"lowrank option 'update_in_backward': clipping {st.plan.name} cannot be honoured: "
                    "with update_in_backward=True it was updated inside the backward, before any clip "
                    "could see its gradient. Accepted with clip_grad_norm_/clip_grad_value_: "
                    "update_in_backward=False"
                )
    for st in taken:
        st.clip_seen = True  # clip_stats="auto": its backward keeps the statistics from now on
    for b in bindings.values():
        b.fold_stray_grads()  # an eager backward may have left .grad on planned parameters
    for p in params:
        st = lookup(p)
        if st is not None and not st.fresh:
            states.append(st)
    return params, states


def _full_buffer(st: Any) -> torch.Tensor | None:
    if st.proj is None:
        return st.grad
    return st.proj.full


@dataclass(frozen=True)
class ClipReport:
    """What the last backend-aware `clip_grad_norm_` measured (see `lowrank_compile.clip_report`).

    `norm` is the total norm it returned. `estimated` names the projected parameters whose
    gradient was accumulated over several backward calls, so their residual part was estimated
    from the sketch. `rel_std` is the sketch's own estimate of the norm's relative standard
    error (0.0 when nothing was estimated).
    """

    norm: float
    estimated: tuple[str, ...]
    rel_std: float


_LAST: dict[str, Any] = {}


def report() -> ClipReport | None:
    """The last clip's `ClipReport`, or None before the first backend-aware clip."""
    if not _LAST:
        return None
    total = float(_LAST["total"])
    var = float(sum(v.item() for v in _LAST["var"]))  # parameters may differ in dtype and device
    # d||G|| = d(||G||^2) / (2 ||G||)
    rel = math.sqrt(var) / (2.0 * total * total) if total > 0 and var > 0 else 0.0
    return ClipReport(norm=total, estimated=tuple(_LAST["estimated"]), rel_std=rel)


def residual_estimate(
    r_acc: torch.Tensor,
    sq: torch.Tensor,
    sq_r: torch.Tensor,
    clip_y: torch.Tensor,
    clip_diag: torch.Tensor,
    p: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(estimate of ||G||^2, its variance) for a projected gradient summed over several calls.

    G = sum_i G_i is split, with A = G (left) or G^T (right) and P the step's projector, into
    the exact part ||P^T A||^2 = ||R||^2 and the residual E = A - P P^T A. Then
    ||E||^2 = sum_i ||E_i||^2 + C, with C = sum over i != j of <E_i, E_j>:
    - sum_i ||E_i||^2 = sum_i ||A_i||^2 - sum_i ||P^T A_i||^2 is exact (`sq - sq_r`);
    - C is estimated from the sketch Y = sum_i A_i W (`clip_y`; W is e x k with entries +-1):
      each column c gives t_c = ||(I - P P^T) Y_c||^2 - sum_i ||(I - P P^T) A_i W_c||^2
      (`clip_diag`), an unbiased estimate of C. The estimate is their mean, and its variance
      is estimated from their spread.
    With one backward call C = 0 and every t_c is 0 up to rounding.
    `p` None (a seeded projector, whose columns are not orthonormal): nothing is exact but the
    sum of the calls' own energies, E = A, and the sketch estimates every cross term.
    """
    stat = sq.dtype
    if p is None:
        exact = torch.zeros((), dtype=stat, device=sq.device)
        ey = clip_y.to(stat)
    else:
        r = r_acc.to(stat)
        exact = (r * r).sum()
        pc = p.to(clip_y.dtype)
        ey = (clip_y - pc @ (pc.t() @ clip_y)).to(stat)
    diag = (sq - sq_r).clamp_min(0)
    t = (ey * ey).sum(0) - clip_diag
    k = t.numel()
    var = t.var() / k if k > 1 else torch.zeros((), dtype=stat, device=t.device)
    return exact + (diag + t.mean()).clamp_min(0), var


def _norm_of(st: Any, norm_type: float, variances: list[torch.Tensor], estimated: list[str]) -> torch.Tensor:
    full = _full_buffer(st)
    if full is not None:
        return torch.linalg.vector_norm(full, norm_type)
    pj = st.proj
    if st.no_stats:
        raise LowRankClipError(
            f"clip_grad_norm_: {st.plan.name} is projected, and this step's backward did not compute its "
            "full gradient's norm: with clip_stats='auto' (the default) the backend stops computing it "
            "after the first opt.step() that no clipping preceded. The backward computes it again from "
            "the next step on; to clip from any step, pass options={'clip_stats': 'always'}."
        )
    if st.contributions() > 1:
        off = st.config.clip_sketch == 0
        if off or norm_type != 2.0:
            why = (
                "the clip sketch is off (clip_sketch=0)"
                if off
                else f"only the 2-norm can be estimated from the sketch, not norm_type={norm_type}"
            )
            raise LowRankClipError(
                f"clip_grad_norm_: {st.plan.name} is projected and its gradient was accumulated over "
                f"{_contributions(st)} in low-rank form, and {why}. Use norm_type=2.0 with "
                "options={'clip_sketch': 16} (the default), or options={'grad_accumulation': 'full'} to keep "
                "full-size gradient buffers while accumulating (eager-size memory, exact for every norm), or "
                "exclude the parameter (options={'exclude': [...]})."
            )
        p = st.accumulated_projector() if pj.kind.orthonormal else None
        sq, var = residual_estimate(pj.r_acc, pj.sq, pj.sq_r, pj.clip_y, pj.clip_diag, p)
        variances.append(var)
        estimated.append(st.plan.name)
        return sq.sqrt().to(st.view.dtype)
    if norm_type == 2.0:
        return pj.sq.sqrt().to(st.view.dtype)
    if math.isinf(norm_type) and norm_type > 0:
        return pj.amax.to(st.view.dtype)
    raise LowRankClipError(
        f"clip_grad_norm_: norm_type={norm_type} is not available for projected parameter {st.plan.name}; "
        "the backend tracks the 2-norm and the inf-norm of the full gradient. Use norm_type=2.0 or "
        "float('inf'), or options={'grad_accumulation': 'full'}."
    )


def _scale(st: Any, coef: torch.Tensor) -> None:
    if st.proj is None:
        st.grad.mul_(coef.to(st.grad.dtype))
        return
    pj = st.proj
    for t in (pj.r_acc, pj.full, pj.sketch_y, pj.clip_y):
        if t is not None:
            t.mul_(coef.to(t.dtype))
    for t in st.quadratic_buffers() + list(st.quad_base or ()):
        t.mul_((coef * coef).to(t.dtype))
    pj.amax.mul_(coef.abs().to(pj.amax.dtype))


def _contributions(st: Any) -> str:
    calls = f"{st.calls_since_zero} backward call{'s' if st.calls_since_zero != 1 else ''}"
    return calls + (f" on each of {st.reduced_world} ranks" if st.reduced_world > 1 else "")


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_`, counting the gradients the backend holds."""
    params, states = _split(parameters)
    if not states:
        return _original("clip_grad_norm_")(params, max_norm, norm_type, error_if_nonfinite, foreach)
    norm_type = float(norm_type)
    from torch.nn.utils.clip_grad import _clip_grads_with_norm_
    from torch.nn.utils.clip_grad import _get_total_norm

    grads = [p.grad for p in params if p.grad is not None]
    variances: list[torch.Tensor] = []
    estimated: list[str] = []
    norms = [_norm_of(st, norm_type, variances, estimated) for st in states]
    if grads:
        norms.append(_get_total_norm(grads, norm_type, False, foreach))
    device = norms[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
            "anyway, set `error_if_nonfinite=False`"
        )
    if grads:
        _clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total, foreach)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for st in states:
        _scale(st, coef)
    _LAST.clear()
    _LAST.update(total=total.detach(), var=variances, estimated=estimated)
    return total


def clip_grad_value_(
    parameters: Iterable[torch.Tensor] | torch.Tensor, clip_value: float, foreach: bool | None = None
) -> None:
    """`torch.nn.utils.clip_grad_value_`, for gradients the backend holds in full."""
    params, states = _split(parameters)
    if not states:
        return _original("clip_grad_value_")(params, clip_value, foreach)
    for st in states:
        full = _full_buffer(st)
        if full is None:
            raise LowRankClipError(
                f"clip_grad_value_: {st.plan.name} is projected, and clamping elements of the full "
                "gradient does not commute with projection. Use clip_grad_norm_, exclude the parameter "
                "(options={'exclude': [...]}), or pass options={'grad_accumulation': 'full'}."
            )
        full.clamp_(-clip_value, clip_value)
    _original("clip_grad_value_")([p for p in params if p.grad is not None], clip_value, foreach)
    return None
