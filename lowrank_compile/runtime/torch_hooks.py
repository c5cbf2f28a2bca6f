"""Entry points of torch that must see the gradients the backend holds.

Installed once the backend compiles a graph (and by `OptimizerBinding.install`), removed by
`lowrank_compile.reset()`:

- `nn.Module.zero_grad`: `model.zero_grad()` resets the `.grad` of the module's parameters.
  For taken-over parameters the gradient lives in the backend's buffers, so they are reset too,
  with the same `set_to_none` semantics as `opt.zero_grad()`.
- `GradScaler._unscale_grads_`: this is what `scaler.unscale_(opt)` and `scaler.step(opt)` use to
  unscale `.grad` and find inf/NaN. Taken-over parameters' buffers are unscaled the same way,
  and a non-finite value in them sets `found_inf`, so the step is skipped for every parameter
  and the scale lowered, as in eager mode.
- a global optimizer step pre-hook: an optimizer that is not the one a taken-over parameter is
  bound to, stepping that parameter. That happens when the user replaces the optimizer mid-run.
  Once the old optimizer is gone, the new one takes the parameter over with fresh optimizer
  states, as a new torch.optim optimizer starts from empty states. While the old one still
  holds the parameter too, it raises `LowRankUsageError`.
  The same hook says (once per optimizer) when matrices it steps have gradients but reached no
  graph the backend compiled: code Dynamo ran eagerly after a graph break trained them, so
  torch.optim keeps their full-size states (see `_warn_untraced`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

__all__ = ["install", "uninstall"]

_ORIGINALS: dict[str, Any] = {}
_UNTRACED_SAID: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()


def _module_zero_grad(self: torch.nn.Module, set_to_none: bool = True) -> None:
    from lowrank_compile.runtime.state import lookup

    _ORIGINALS["zero_grad"](self, set_to_none)
    for p in self.parameters():
        st = lookup(p)
        if st is not None:
            st.zero_grad(set_to_none)


def _unscale_grads_(
    self: Any,
    optimizer: torch.optim.Optimizer,
    inv_scale: torch.Tensor,
    found_inf: torch.Tensor,
    allow_fp16: bool,
) -> dict[torch.device, torch.Tensor]:
    from collections import defaultdict

    from lowrank_compile.runtime.binding import binding_of

    binding = binding_of(optimizer)
    if binding is not None and binding.config.update_in_backward:
        from lowrank_compile.config import LowRankOptionError

        raise LowRankOptionError(
            "lowrank option 'update_in_backward': a GradScaler cannot unscale gradients the backward "
            "already applied (update_in_backward=True updates each parameter inside the backward). "
            "Accepted with a GradScaler: update_in_backward=False"
        )
    if binding is not None:
        binding.fold_stray_grads()  # before torch's pass, so no gradient is unscaled twice
    per_device = _ORIGINALS["_unscale_grads_"](self, optimizer, inv_scale, found_inf, allow_fp16)
    if binding is None:
        return per_device
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    active = [st for st in binding.states if not st.fresh]
    for st in active:
        for buf in st.gradient_buffers():
            if buf.dtype == torch.float16 and not allow_fp16:
                raise ValueError("Attempting to unscale FP16 gradients.")
            groups[(buf.device, buf.dtype)].append(buf)
    with torch.no_grad():
        for (dev, _), bufs in groups.items():
            if dev not in per_device:
                per_device[dev] = found_inf.to(dev, copy=True)
            # The op torch uses for .grad: sets found_inf on inf/NaN, multiplies by inv_scale.
            torch._amp_foreach_non_finite_check_and_unscale_(bufs, per_device[dev], inv_scale.to(dev))
        for st in active:
            for sq in st.quadratic_buffers() + list(st.quad_base or ()):  # scale by inv_scale squared
                sq.mul_(inv_scale.to(sq.device, sq.dtype).square())
    return per_device


def _holds(opt: torch.optim.Optimizer, p: torch.Tensor) -> bool:
    return any(q is p for g in opt.param_groups for q in g["params"])


def _warn_untraced(opt: torch.optim.Optimizer) -> None:
    """Warn once per optimizer that trains planned parameters and matrices no graph planned.

    A matrix with a gradient that no compiled graph planned was trained by code Dynamo ran
    eagerly (a graph break, e.g. a checkpointed region whose forward mutates Python state): the
    plan never saw it, torch.optim keeps its full-size states. Silent, that looks like a working
    backend that saves nothing. Names are the optimizer's (group, index): no graph gave one.
    """
    from lowrank_compile.runtime.state import decided

    if opt in _UNTRACED_SAID:
        return
    missed, planned = [], False
    for gi, group in enumerate(opt.param_groups):
        for i, p in enumerate(group["params"]):
            if decided(p) is not None:
                planned = True
            elif p.grad is not None and p.dim() >= 2:
                missed.append(f"param_groups[{gi}][{i}] {tuple(p.shape)}")
    # Only for an optimizer of a model the backend compiled (some parameter planned): another
    # optimizer in the process (an eager baseline, a model compiled by Inductor) is not its own.
    if not missed or not planned:
        return
    _UNTRACED_SAID.add(opt)
    from lowrank_compile import _compat
    from lowrank_compile.backend import _shown
    from lowrank_compile.backend import warn_once

    msg = (
        f"lowrank: {len(missed)} matrices of this {type(opt).__name__} ({_shown(missed)}) received "
        "gradients from code that no graph compiled by the backend covered (Dynamo ran it eagerly "
        "after a graph break): they train with torch.optim at full size, neither projected nor "
        "quantized. TORCH_LOGS=graph_breaks, or `python -m lowrank_compile.cli`, shows where."
    )
    breaks = _compat.checkpoint_side_effect_breaks()
    if breaks:
        culprit = (
            " (transformers >= 5.25 wraps its attention in the `kernels` package's context variable, "
            "which does this to every checkpointed decoder layer)"
            if any("CompileableContextVar" in b for b in breaks)
            else ""
        )
        msg += (
            " Dynamo ran an activation-checkpointed region eagerly because its forward mutates "
            f"Python state{culprit}; set `torch._dynamo.config.{_compat.CHECKPOINT_SIDE_EFFECTS_FLAG}"
            " = True` before the first compiled step to compile it (the side effect then runs once, "
            "not again in the recomputation)."
        )
    warn_once(msg)


def _optimizer_pre_hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    from lowrank_compile.discovery import wrapped_optimizers
    from lowrank_compile.runtime.state import lookup

    _warn_untraced(opt)

    strays = []
    inner: set[int] | None = None
    for gi, group in enumerate(opt.param_groups):
        for p in group["params"]:
            st = lookup(p)
            if st is not None and (st.binding is None or st.binding._opt_ref() is not opt):
                if inner is None:
                    inner = {id(o) for o in wrapped_optimizers(opt)}
                # No strong reference kept: _adopt may need a replaced optimizer to be collected.
                bound = st.binding._opt_ref() if st.binding is not None else None
                wraps = bound is not None and id(bound) in inner
                del bound
                if wraps:
                    continue  # `opt` wraps the bound optimizer (a container): its step reaches ours
                strays.append((gi, p, st))
    if strays:
        _adopt(opt, strays)


def _adopt(opt: torch.optim.Optimizer, strays: list[tuple[int, torch.Tensor, Any]]) -> None:
    """Move taken-over parameters from their (gone) optimizer's binding to `opt`'s."""
    import gc

    from lowrank_compile.backend import warn_once
    from lowrank_compile.config import LowRankUsageError
    from lowrank_compile.optimizers import rule_for
    from lowrank_compile.runtime import checkpoint
    from lowrank_compile.runtime.binding import OptimizerBinding
    from lowrank_compile.runtime.binding import binding_of

    def old_holder(st: Any, p: torch.Tensor) -> torch.optim.Optimizer | None:
        old = st.binding._opt_ref() if st.binding is not None else None
        return old if old is not None and old is not opt and _holds(old, p) else None

    if any(old_holder(st, p) is not None for _, p, st in strays):
        gc.collect()  # a replaced optimizer may only be kept alive by reference cycles
    names = [st.plan.name for _, _, st in strays]
    shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
    for _, p, st in strays:
        old = old_holder(st, p)
        if old is not None:
            raise LowRankUsageError(
                f"lowrank: {type(opt).__name__}.step() updates {st.plan.name!r}, which the compiled step "
                f"trains through another live optimizer ({type(old).__name__}). A parameter can be "
                "trained by one optimizer at a time: delete the old optimizer before stepping a new "
                "one, or call lowrank_compile.reset() and compile again."
            )
    rule = rule_for(opt)
    reason = None if rule is None else rule.unsupported(opt, opt.param_groups[strays[0][0]])
    if rule is None or reason is not None:
        raise LowRankUsageError(
            f"lowrank: {type(opt).__name__}.step() updates parameters the compiled step took over "
            f"for another optimizer ({shown}), and lowrank_compile cannot take them over for it "
            f"({reason or 'unsupported optimizer'}); their gradients live in the backend's buffers. "
            "Call lowrank_compile.reset() before switching to this optimizer, and compile again."
        )
    binding = binding_of(opt)
    for gi, _, st in strays:
        old_binding = st.binding
        if binding is None:
            binding = OptimizerBinding(opt, rule, st.config, old_binding.backend)
            binding.install()
        if old_binding is not None:
            old_binding.states.remove(st)
            old_binding.invalidate()
        st.group = gi
        # A new optimizer starts from empty states. The projection is kept when the step's
        # gradient is already accumulated against it; otherwise it restarts too.
        if st.fresh:
            checkpoint.forget(st)
        else:
            st.ostate, st.pending_state, st.pending_first = None, None, True
        binding.add(st)
    warn_once(
        f"lowrank: {type(opt).__name__} replaced the optimizer of {shown}; the backend now updates "
        "them through it, from fresh optimizer states as torch.optim would"
    )


def follow_replaced_optimizers(params: list[torch.Tensor]) -> None:
    """At compile time: hand taken-over `params` whose optimizer was replaced to the new one.

    Called when Dynamo recompiles a step for parameters the backend already trains. Doing it
    here, before Dynamo traces the new optimizer's `step`, keeps that step Dynamo-disabled, so
    the parameters left to torch.optim keep eager numerics.
    """
    import gc

    from lowrank_compile.discovery import find_owners
    from lowrank_compile.runtime.state import lookup

    def strays_by_optimizer() -> tuple[dict[int, list[tuple[int, torch.Tensor, Any]]], dict[int, Any], bool]:
        owners = find_owners(params)
        found: dict[int, list[tuple[int, torch.Tensor, Any]]] = {}
        opts: dict[int, Any] = {}
        ambiguous = False
        for p in params:
            st = lookup(p)
            if st is None:
                continue
            mine = st.binding._opt_ref() if st.binding is not None else None
            others = [(o, gi) for o, gi in owners.optimizer_of(p) if o is not mine]
            if not others:
                continue
            if (mine is not None and _holds(mine, p)) or len(others) > 1:
                ambiguous = True
                continue
            o, gi = others[0]
            found.setdefault(id(o), []).append((gi, p, st))
            opts[id(o)] = o
        return found, opts, ambiguous

    found, opts, ambiguous = strays_by_optimizer()
    if ambiguous:
        gc.collect()  # a replaced optimizer may only be kept alive by reference cycles
        found, opts, _ = strays_by_optimizer()
    for key, strays in found.items():
        _adopt(opts[key], strays)


def install() -> None:
    """Wrap the torch entry points (idempotent)."""
    from lowrank_compile import _compat

    if "zero_grad" not in _ORIGINALS:
        _ORIGINALS["zero_grad"] = torch.nn.Module.zero_grad
        torch.nn.Module.zero_grad = _compat.dynamo_disable(_module_zero_grad)  # type: ignore[method-assign]
    if "_unscale_grads_" not in _ORIGINALS:
        from torch.amp.grad_scaler import GradScaler

        _ORIGINALS["_unscale_grads_"] = GradScaler._unscale_grads_
        GradScaler._unscale_grads_ = _unscale_grads_  # type: ignore[method-assign]
    if "pre_hook" not in _ORIGINALS:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _ORIGINALS["pre_hook"] = register_optimizer_step_pre_hook(_compat.dynamo_disable(_optimizer_pre_hook))


def uninstall() -> None:
    """Restore the originals."""
    if "zero_grad" in _ORIGINALS:
        torch.nn.Module.zero_grad = _ORIGINALS.pop("zero_grad")  # type: ignore[method-assign]
    if "_unscale_grads_" in _ORIGINALS:
        from torch.amp.grad_scaler import GradScaler

        GradScaler._unscale_grads_ = _ORIGINALS.pop("_unscale_grads_")  # type: ignore[method-assign]
    if "pre_hook" in _ORIGINALS:
        _ORIGINALS.pop("pre_hook").remove()
    _UNTRACED_SAID.clear()
