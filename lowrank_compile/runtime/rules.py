"""Update rules traced from the optimizer's own step, on a virtual parameter (DESIGN.md section 4).

The backend never writes an optimizer's formula itself. For each param group it builds a
throwaway instance of the user's optimizer class over one virtual 1-D parameter, and `make_fx`
traces the class's step body (without torch.optim's wrappers). Every tensor is traced
symbolically, so the rule works for any length:

- `first(p, g, lr) -> states`: the optimizer's own state initialisation and first step (SGD's
  momentum buffer starts as a copy of the gradient, not from zeros);
- `step(p, g, lr, *states)`: every later step. `p` and the states are updated in place.

States come in the order of `specs`. A spec says whether the state is a scalar (a step counter,
never quantized) and whether it is a second moment (non-negative: unsigned 8-bit map).

Tracing details:
- `torch.compiler.is_compiling()` is patched to True, so torch.optim keeps step counters as
  tensors (`_get_value`), as it does when compiled. The default dtype is float64, so those
  counters are float64 and Adam's bias corrections are as exact as eager's Python doubles.
- `foreach=False`: the rule is the per-tensor path. `fused=True` groups trace it too: torch's
  fused kernel computes the same formula (rounding aside) and cannot be traced; parameters
  left to torch.optim keep the fused kernel.
- Hyper-parameters other than `lr` are baked in. A rule is cached per optimizer class and
  hyper-parameter values, so changing them traces a new rule, and the compiled update that
  calls it recompiles, as a changed float does under torch.compile.
- `.item()`-derived scalars (Adam's `value=-step_size`) are turned back into tensor arithmetic
  by the `tensorize-scalars` pass, so the compiled update has no graph break.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
import torch.fx

__all__ = ["Rule", "StateSpec", "trace_rule"]

# Non-negative states (bitsandbytes and torchao quantize them with the unsigned map).
SECOND_MOMENT_KEYS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})


@dataclass(frozen=True)
class StateSpec:
    """One optimizer state of the rule."""

    key: str
    scalar: bool
    second_moment: bool


@dataclass(eq=False)  # identity: a Rule is a key of the compiled-update caches
class Rule:
    """A traced update rule (see the module docstring)."""

    specs: tuple[StateSpec, ...]
    first: torch.fx.GraphModule
    step: torch.fx.GraphModule
    signature: tuple[Any, ...]
    # True when `first` equals `step` on zero states (AdamW, Adam, Lion; SGD without dampening).
    # The update then always runs `step` on zero-initialised storage: no branch on the first
    # update, hence no recompile when it is over.
    zero_init: bool = False


@contextlib.contextmanager
def _tracing_context() -> Iterator[None]:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with mock.patch("torch.compiler.is_compiling", lambda: True), torch.no_grad():
            yield
    finally:
        torch.set_default_dtype(prev)


def _hashable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return ("tensor", v.dtype, tuple(v.shape), float(v) if v.numel() == 1 else id(v))
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    return v


def _group_signature(
    cls: type, group: Mapping[str, Any], defaults: Mapping[str, Any], attrs: Mapping[str, Any]
) -> tuple:
    hp = tuple(sorted((k, _hashable(v)) for k, v in group.items() if k not in ("params", "lr", "initial_lr")))
    return (cls, hp, tuple(sorted((k, _hashable(v)) for k, v in attrs.items())))


_CACHE: dict[tuple, Rule] = {}


def trace_rule(
    cls: type[torch.optim.Optimizer],
    group: Mapping[str, Any],
    defaults: Mapping[str, Any],
    attrs: Mapping[str, Any],
    dtype: torch.dtype,
    lr_dtype: torch.dtype = torch.float64,
) -> Rule:
    """The update rule of optimizer class `cls` for hyper-parameters `group` (cached)."""
    sig = (_group_signature(cls, group, defaults, attrs), dtype, lr_dtype)
    rule = _CACHE.get(sig)
    if rule is not None:
        return rule
    from torch.fx.experimental.proxy_tensor import make_fx

    from lowrank_compile.passes.tensorize_scalars import TensorizeScalars

    raw_step = inspect.unwrap(cls.step)
    accepted = inspect.signature(cls).parameters
    ctor = {k: v for k, v in defaults.items() if k in accepted and k != "params"}
    hp = {k: v for k, v in group.items() if k not in ("params", "initial_lr")}
    if "foreach" in hp:
        hp["foreach"] = False
    if hp.get("fused"):
        hp["fused"] = False  # the same formula as the per-tensor path, in one kernel per device

    def run(
        p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor, states: dict[str, Any] | None
    ) -> dict[str, Any]:
        opt = cls([{**hp, "params": [p], "lr": lr}], **ctor)
        for a, v in attrs.items():
            setattr(opt, a, v)
        p.grad = g
        if states is not None:
            opt.state[p] = dict(states)
        raw_step(opt)
        return opt.state[p]

    # The state layout: one eager dry run on a tiny tensor.
    with _tracing_context():
        probe = run(
            torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype), torch.tensor(1e-3, dtype=lr_dtype), None
        )
    keys = [k for k, v in probe.items() if isinstance(v, torch.Tensor)]
    if len(keys) != len(probe):
        raise RuntimeError(
            f"{cls.__name__} keeps non-tensor state ({sorted(set(probe) - set(keys))}); not supported"
        )
    specs = tuple(StateSpec(k, probe[k].dim() == 0, k in SECOND_MOMENT_KEYS) for k in keys)

    def first(p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor) -> tuple[torch.Tensor, ...]:
        st = run(p, g, lr, None)
        return tuple(st[k] for k in keys)

    def step(p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor, *states: torch.Tensor) -> None:
        run(p, g, lr, dict(zip(keys, states)))

    ex_p, ex_g = torch.zeros(8, dtype=dtype), torch.zeros(8, dtype=dtype)
    ex_lr = torch.tensor(1e-3, dtype=lr_dtype)
    ex_states = [
        torch.zeros((), dtype=probe[k].dtype) if probe[k].dim() == 0 else torch.zeros(8, dtype=probe[k].dtype)
        for k in keys
    ]
    with _tracing_context():
        first_gm = make_fx(first, tracing_mode="symbolic")(ex_p, ex_g, ex_lr)
        step_gm = make_fx(step, tracing_mode="symbolic")(ex_p, ex_g, ex_lr, *ex_states)
    for gm in (first_gm, step_gm):
        TensorizeScalars()(gm)
    rule = Rule(specs, first_gm, step_gm, sig)
    rule.zero_init = _first_is_step_on_zeros(rule, dtype, lr_dtype, {k: probe[k].dtype for k in keys})
    _CACHE[sig] = rule
    return rule


def _first_is_step_on_zeros(
    rule: Rule, dtype: torch.dtype, lr_dtype: torch.dtype, dtypes: dict[str, torch.dtype]
) -> bool:
    """Whether the first update equals a regular one on zero states, bit for bit, on random data."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            p = torch.randn(64, generator=gen, dtype=torch.float64).to(dtype)
            g = torch.randn(64, generator=gen, dtype=torch.float64).to(dtype)
            lr = torch.tensor(0.01, dtype=lr_dtype)
            p1 = p.clone()
            got = rule.first(p1, g, lr)
            p2 = p.clone()
            zeros = [torch.zeros(() if s.scalar else 64, dtype=dtypes[s.key]) for s in rule.specs]
            rule.step(p2, g, lr, *zeros)
            if not torch.equal(p1, p2):
                return False
            for a, b in zip(got, zeros):
                if not torch.equal(a.reshape(-1).to(b.dtype), b.reshape(-1)):
                    return False
    return True


def clear_cache() -> None:
    """Forget traced rules (tests, and `lowrank_compile.reset`)."""
    _CACHE.clear()
