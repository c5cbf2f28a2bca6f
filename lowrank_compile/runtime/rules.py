"""Update rules traced from the optimizer's own step, on a virtual parameter (DESIGN.md section 4).

The backend never writes an optimizer's formula itself. For each param group it builds a
throwaway instance of the user's optimizer class over one virtual 1-D parameter, and `make_fx`
traces the class's step body (without torch.optim's wrappers). Every tensor is traced
symbolically, so the rule works for any length:

- `first(p, g, lr, *hps) -> states`: the optimizer's own state initialisation and first step
  (SGD's momentum buffer starts as a copy of the gradient, not from zeros);
- `step(p, g, lr, *hps, *states)`: every later step. `p` and the states are updated in place.

`hps` are the lifted hyper-parameters (`Rule.hp_keys`), 0-d float64 tensors like `lr`.

States come in the order of `specs`. A spec says whether the state is a scalar (a step counter,
never quantized) and whether it is a second moment (non-negative: unsigned 8-bit map).

Tracing details:
- `torch.compiler.is_compiling()` is patched to True, so torch.optim keeps step counters as
  tensors (`_get_value`), as it does when compiled. The default dtype is float64, so those
  counters are float64 and Adam's bias corrections are as exact as eager's Python doubles.
- `foreach=False`: the rule is the per-tensor path. `fused=True` groups trace it too: torch's
  fused kernel computes the same formula (rounding aside) and cannot be traced; parameters
  left to torch.optim keep the fused kernel.
- Float hyper-parameters (Adam's betas and eps, SGD's dampening, ...) are *lifted*: traced as
  0-d float64 tensor inputs, so a scheduler that changes them every step (OneCycleLR cycles
  betas[0]) changes no rule and recompiles nothing. A value of 0 is structural (torch.optim
  branches on `x != 0`): it stays baked in, and a change to or from 0 traces once. A
  hyper-parameter whose tensor form cannot be traced (SGD's momentum: `if momentum != 0` on a
  tensor is data-dependent) stays baked in, and a change re-traces. Which keys lift is found by
  tracing, once per optimizer class and structure (`_liftable`).
- Weight decay never reaches the rule: the binding applies it around the rule (decoupled on W,
  or L2 added to the gradient), with its value as a tensor input (runtime/binding.py).
- Eager computes derived constants such as `1 - beta1` in Python doubles and rounds them once
  when the op reads them; torch.optim's tensor path casts `beta1` to the parameter's dtype first.
  `_round_once` moves such casts after the scalar arithmetic, so the lifted rule stays
  eager-exact.
- `.item()`-derived scalars (Adam's `value=-step_size`) are turned back into tensor arithmetic
  by the `tensorize-scalars` pass, so the compiled update has no graph break.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
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
    # The lifted hyper-parameters, in input order: (group key, index in a tuple value or None).
    hp_keys: tuple[tuple[str, int | None], ...] = ()

    def hp_values(self, group: Mapping[str, Any]) -> list[float]:
        """The current values of the lifted hyper-parameters in `group`."""
        return [float(group[k] if i is None else group[k][i]) for k, i in self.hp_keys]


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


_NOT_HPS = frozenset({"params", "lr", "initial_lr", "weight_decay"})
LIFTED = "<lifted>"  # a lifted hyper-parameter's place in a rule signature


def _is_float(v: Any) -> bool:
    return isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool))


def _candidates(group: Mapping[str, Any]) -> tuple[tuple[str, int | None], ...]:
    """Nonzero float hyper-parameters of `group` (scalars, or entries of tuples such as betas)."""
    out: list[tuple[str, int | None]] = []
    for k in sorted(group):
        v = group[k]
        if k in _NOT_HPS:
            continue
        if _is_float(v) and v != 0:
            out.append((k, None))
        elif isinstance(v, (tuple, list)) and v and all(_is_float(x) for x in v):
            out += [(k, i) for i, x in enumerate(v) if x != 0]
    return tuple(out)


def _group_signature(
    cls: type,
    group: Mapping[str, Any],
    attrs: Mapping[str, Any],
    lifted: tuple[tuple[str, int | None], ...],
) -> tuple:
    """What a rule is specialised on: the class, the baked hyper-parameters, the lifted keys."""
    lift = set(lifted)
    hp = []
    for k, v in sorted(group.items()):
        if k in ("params", "lr", "initial_lr"):
            continue
        if (k, None) in lift:
            v = LIFTED
        elif isinstance(v, (tuple, list)) and any((k, i) in lift for i in range(len(v))):
            v = tuple(LIFTED if (k, i) in lift else x for i, x in enumerate(v))
        hp.append((k, _hashable(v)))
    return (cls, tuple(hp), tuple(sorted((k, _hashable(v)) for k, v in attrs.items())))


_CACHE: dict[tuple, Rule] = {}
Keys = tuple[tuple[str, int | None], ...]
# (class, candidate keys, the signature with every candidate lifted) -> (tensor keys, literal keys).
_LIFTABLE: dict[tuple, tuple[Keys, Keys]] = {}
# Stand-ins for hyper-parameters lifted as literals: values no optimizer uses as a constant.
_SENTINELS = (0.6180339887498949, 0.7071067811865476)


def trace_rule(
    cls: type[torch.optim.Optimizer],
    group: Mapping[str, Any],
    defaults: Mapping[str, Any],
    attrs: Mapping[str, Any],
    dtype: torch.dtype,
    lr_dtype: torch.dtype = torch.float64,
) -> Rule:
    """The update rule of optimizer class `cls` for hyper-parameters `group` (cached)."""
    cands = _candidates(group)
    key = (_group_signature(cls, group, attrs, cands), cands, dtype, lr_dtype)
    trace = functools.partial(_trace, cls, group, defaults, attrs, dtype, lr_dtype)
    lift = _LIFTABLE.get(key)
    if lift is None:
        lift = _LIFTABLE[key] = _liftable(trace, cands)
    lifted = lift[0] + lift[1]
    sig = (_group_signature(cls, group, attrs, lifted), lift, dtype, lr_dtype)
    rule = _CACHE.get(sig)
    if rule is None:
        rule = trace(*lift)
        rule.signature = sig
        _CACHE[sig] = rule
    return rule


def _liftable(trace: Callable[..., Rule], cands: Keys) -> tuple[Keys, Keys]:
    """Which candidates lift, and how: (as tensors the step computes with, as literals).

    `trace(tensors, literals, sentinel)` is `_trace` bound to the class and its group.

    Tensor form first: all candidates, else each one that traces on its own. A candidate the
    step cannot take as a tensor (SGD's `if momentum != 0`) is tried as a literal: traced with
    two different stand-in values, every constant equal to the stand-in becomes a read of the
    input; if both traces then give the same graph, the value was used as is (nothing derived
    from it, such as 1 - momentum, stayed baked in) and the literal lifts. Otherwise it stays
    baked in and a change re-traces.
    """
    if not cands:
        return (), ()

    def traces(tensors: Keys, literals: Keys = ()) -> bool:
        try:
            a = trace(tensors, literals, _SENTINELS[0])
            if literals:
                b = trace(tensors, literals, _SENTINELS[1])
                return a.first.code == b.first.code and a.step.code == b.step.code
        except Exception:  # a data-dependent branch on the tensor, or an op that wants a Python number
            return False
        return True

    if traces(cands):
        return cands, ()
    tensors = tuple(c for c in cands if traces((c,)))
    if tensors and not traces(tensors):
        tensors = ()
    literals = tuple(c for c in cands if c not in tensors and traces(tensors, (c,)))
    if literals and not traces(tensors, literals):
        literals = ()
    return tensors, literals


def _trace(
    cls: type[torch.optim.Optimizer],
    group: Mapping[str, Any],
    defaults: Mapping[str, Any],
    attrs: Mapping[str, Any],
    dtype: torch.dtype,
    lr_dtype: torch.dtype,
    tensors: Keys,
    literals: Keys = (),
    sentinel: float = _SENTINELS[0],
) -> Rule:
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
    lifted = tensors + literals
    nh = len(lifted)

    def run(
        p: torch.Tensor,
        g: torch.Tensor,
        lr: torch.Tensor,
        hps: tuple[torch.Tensor, ...],
        states: dict[str, Any] | None,
    ) -> dict[str, Any]:
        # Built with the Python values (the constructor validates them), then the lifted
        # entries are swapped: tensors for their inputs, the stand-in for literals.
        opt = cls([{**hp, "params": [p], "lr": lr}], **ctor)
        grp = opt.param_groups[0]
        for j, ((k, i), t) in enumerate(zip(lifted, hps)):
            value: Any = t if (k, i) in tensors else _stand_in(sentinel, j - len(tensors))
            if i is None:
                grp[k] = value
            else:
                v = list(grp[k])
                v[i] = value
                grp[k] = tuple(v)
        for a, v in attrs.items():
            setattr(opt, a, v)
        p.grad = g
        if states is not None:
            opt.state[p] = dict(states)
        raw_step(opt)
        return opt.state[p]

    values = [float(group[k] if i is None else group[k][i]) for k, i in lifted]
    # The state layout: one eager dry run on a tiny tensor.
    with _tracing_context():
        probe = run(
            torch.zeros(4, dtype=dtype),
            torch.ones(4, dtype=dtype),
            torch.tensor(1e-3, dtype=lr_dtype),
            tuple(torch.tensor(v, dtype=torch.float64) for v in values),
            None,
        )
    keys = [k for k, v in probe.items() if isinstance(v, torch.Tensor)]
    if len(keys) != len(probe):
        raise RuntimeError(
            f"{cls.__name__} keeps non-tensor state ({sorted(set(probe) - set(keys))}); not supported"
        )
    specs = tuple(StateSpec(k, probe[k].dim() == 0, k in SECOND_MOMENT_KEYS) for k in keys)

    def first(
        p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor, *hps: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        st = run(p, g, lr, hps, None)
        return tuple(st[k] for k in keys)

    def step(p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor, *rest: torch.Tensor) -> None:
        run(p, g, lr, rest[:nh], dict(zip(keys, rest[nh:])))

    ex_p, ex_g = torch.zeros(8, dtype=dtype), torch.zeros(8, dtype=dtype)
    ex_lr = torch.tensor(1e-3, dtype=lr_dtype)
    ex_hps = [torch.tensor(v, dtype=torch.float64) for v in values]
    ex_states = [
        torch.zeros((), dtype=probe[k].dtype) if probe[k].dim() == 0 else torch.zeros(8, dtype=probe[k].dtype)
        for k in keys
    ]
    with _tracing_context():
        first_gm = make_fx(first, tracing_mode="symbolic")(ex_p, ex_g, ex_lr, *ex_hps)
        step_gm = make_fx(step, tracing_mode="symbolic")(ex_p, ex_g, ex_lr, *ex_hps, *ex_states)
    for gm in (first_gm, step_gm):
        _lift_literals(gm, {3 + len(tensors) + j: _stand_in(sentinel, j) for j in range(len(literals))})
        _round_once(gm, range(3, 3 + len(tensors)))
        TensorizeScalars()(gm)
    rule = Rule(specs, first_gm, step_gm, (), hp_keys=lifted)
    rule.zero_init = _first_is_step_on_zeros(rule, dtype, lr_dtype, {k: probe[k].dtype for k in keys}, values)
    return rule


def _stand_in(base: float, j: int) -> float:
    """The stand-in value of the `j`-th literal (distinct per literal)."""
    return base + 1e-3 * j


def _lift_literals(gm: torch.fx.GraphModule, stand_ins: dict[int, float]) -> None:
    """Replace every constant argument equal to a stand-in by a read (`.item()`) of its input.

    `stand_ins`: input position -> the value the trace used for it. tensorize-scalars then
    turns the reads into tensor arithmetic.
    """
    if not stand_ins:
        return
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    by_value = {v: placeholders[pos] for pos, v in stand_ins.items()}
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        args = list(node.args)
        kwargs = dict(node.kwargs)
        hit = False
        for container, key in [(args, i) for i in range(len(args))] + [(kwargs, k) for k in kwargs]:
            v = container[key]  # type: ignore[index]
            if isinstance(v, float) and v in by_value:
                with gm.graph.inserting_before(node):
                    container[key] = gm.graph.call_function(  # type: ignore[index]
                        torch.ops.aten._local_scalar_dense.default, (by_value[v],)
                    )
                hit = True
        if hit:
            node.args, node.kwargs = tuple(args), kwargs
    gm.graph.lint()
    gm.recompile()


_SCALAR_ARITH = {
    torch.ops.aten.rsub.Scalar,
    torch.ops.aten.sub.Scalar,
    torch.ops.aten.add.Scalar,
    torch.ops.aten.mul.Scalar,
    torch.ops.aten.div.Scalar,
    torch.ops.aten.neg.default,
}


def _round_once(gm: torch.fx.GraphModule, hp_positions: Any) -> None:
    """Move a cast of a lifted hyper-parameter after the scalar arithmetic that follows it.

    `rsub(_to_copy(beta1, float32), 1)` becomes `_to_copy(rsub(beta1, 1), float32)`: 1 - beta1
    in float64, rounded once, as eager's Python doubles are. Repeats until no cast moves.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    hp_nodes = {placeholders[i] for i in hp_positions if i < len(placeholders)}
    if not hp_nodes:
        return
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            if node.target is not torch.ops.aten._to_copy.default or node.args[0] not in hp_nodes:
                continue
            for user in list(node.users):
                if user.target not in _SCALAR_ARITH or user.args[0] is not node:
                    continue
                with gm.graph.inserting_before(user):
                    wide = gm.graph.call_function(
                        user.target, (node.args[0], *user.args[1:]), dict(user.kwargs)
                    )
                    narrow = gm.graph.call_function(node.target, (wide,), dict(node.kwargs))
                user.replace_all_uses_with(narrow)
                gm.graph.erase_node(user)
                hp_nodes.add(wide)
                changed = True
            if not node.users:
                gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def _first_is_step_on_zeros(
    rule: Rule, dtype: torch.dtype, lr_dtype: torch.dtype, dtypes: dict[str, torch.dtype], hps: list[float]
) -> bool:
    """Whether the first update equals a regular one on zero states, bit for bit, on random data."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            p = torch.randn(64, generator=gen, dtype=torch.float64).to(dtype)
            g = torch.randn(64, generator=gen, dtype=torch.float64).to(dtype)
            lr = torch.tensor(0.01, dtype=lr_dtype)
            h = [torch.tensor(v, dtype=torch.float64) for v in hps]
            p1 = p.clone()
            got = rule.first(p1, g, lr, *h)
            p2 = p.clone()
            zeros = [torch.zeros(() if s.scalar else 64, dtype=dtypes[s.key]) for s in rule.specs]
            rule.step(p2, g, lr, *h, *zeros)
            if not torch.equal(p1, p2):
                return False
            for a, b in zip(got, zeros):
                if not torch.equal(a.reshape(-1).to(b.dtype), b.reshape(-1)):
                    return False
    return True


def clear_cache() -> None:
    """Forget traced rules (tests, and `lowrank_compile.reset`)."""
    _CACHE.clear()
    _LIFTABLE.clear()
