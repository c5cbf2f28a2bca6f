"""Entry points of torch that must see the gradients the backend holds.

Installed while any optimizer is bound (`OptimizerBinding.install`), removed by
`lowrank_compile.reset()`:

- `nn.Module.zero_grad`: `model.zero_grad()` resets the `.grad` of the module's parameters.
  For taken-over parameters the gradient lives in the backend's buffers, so they are reset too,
  with the same `set_to_none` semantics as `opt.zero_grad()`.
- `GradScaler._unscale_grads_`: this is what `scaler.unscale_(opt)` and `scaler.step(opt)` use to
  unscale `.grad` and find inf/NaN. Taken-over parameters' buffers are unscaled the same way,
  and a non-finite value in them sets `found_inf`, so the step is skipped for every parameter
  and the scale lowered, as in eager mode.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["install", "uninstall"]

_ORIGINALS: dict[str, Any] = {}


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
            if st.proj is not None:  # a sum of squares scales by inv_scale squared
                sq = st.proj.sq
                sq.mul_(inv_scale.to(sq.device, sq.dtype).square())
    return per_device


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


def uninstall() -> None:
    """Restore the originals."""
    if "zero_grad" in _ORIGINALS:
        torch.nn.Module.zero_grad = _ORIGINALS.pop("zero_grad")  # type: ignore[method-assign]
    if "_unscale_grads_" in _ORIGINALS:
        from torch.amp.grad_scaler import GradScaler

        GradScaler._unscale_grads_ = _ORIGINALS.pop("_unscale_grads_")  # type: ignore[method-assign]
