"""OptimizerBinding: the backend's hold on one user optimizer.

When the backend takes over parameters of an optimizer, it installs two instance-level
wrappers on it:

- `opt.step`: Dynamo-disabled, so the remaining parameters are updated by torch.optim as in
  eager mode and their float hyper-parameters never become guards (no recompiles when an LR
  scheduler changes `lr`). It calls the original step, which runs the user's step hooks. The
  backend's update is the first step post-hook, so it sees whatever a pre-hook changed.
- `opt.zero_grad`: clears the backend's gradient buffers with eager semantics.

The update of taken-over parameters runs the optimizer's own rule, traced from its step on a
virtual parameter (`runtime/rules.py`), on tensors the backend owns:
- full-rank parameter: the parameter's storage (a flat view) and its gradient buffer;
- projected parameter: a *virtual* parameter of R's shape, zero before each update, and R. The
  rule leaves v = -lr * N in it. Then W <- W * (1 - lr * wd) + back(scale * v), with decay
  decoupled as torch's AdamW and Lion apply it. The rule runs with weight decay 0: a decoupled
  decay is applied to W as above, and an L2 decay (Adam, SGD) is folded into the gradient as
  R + wd * proj(W).
States are stored per parameter (`ParamState.ostate`). With `state_bits=8`, states of >= 4096
values are block-wise 8-bit (`runtime/quant.py`): the compiled update dequantizes them, runs the
rule, and quantizes the result, all inside one graph that Inductor fuses. The whole update is one
function, compiled once by torch.compile and Inductor, with a private code object (its own Dynamo
cache). `lr` is a 0-d float64 tensor per param group, so schedulers cause no recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from typing import cast

import torch

from lowrank_compile.config import LowRankConfig
from lowrank_compile.optimizers import OptimizerRule
from lowrank_compile.runtime import projector as pm
from lowrank_compile.runtime import quant
from lowrank_compile.runtime import refresh
from lowrank_compile.runtime.rules import Rule
from lowrank_compile.runtime.rules import trace_rule
from lowrank_compile.runtime.state import ParamState

__all__ = ["OptimizerBinding", "binding_of"]

_ATTR = "_lowrank_binding"
_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class _Item:
    """One taken-over parameter as the compiled update sees it."""

    st: ParamState
    rule: Rule
    lr: torch.Tensor
    wd: float  # projected: the decay the backend applies (decoupled on W, or L2 folded into R)
    first: bool = True  # the next update is the parameter's first (the rule's `first` runs)
    active: bool = False  # it has a gradient this step


def binding_of(opt: torch.optim.Optimizer) -> OptimizerBinding | None:
    """The binding installed on `opt`, if any."""
    return getattr(opt, _ATTR, None)


def _private_code(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A copy of closure `fn` with its own code object (and so its own Dynamo cache)."""
    code = fn.__code__.replace(co_name=name)
    new = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    new.__qualname__ = name
    return new


class OptimizerBinding:
    """Routes a user optimizer's `step`/`zero_grad` through the backend for its planned params."""

    def __init__(
        self,
        opt: torch.optim.Optimizer,
        rule: OptimizerRule,
        config: LowRankConfig,
        update_backend: Callable[..., Any],
    ) -> None:
        self._opt_ref = weakref.ref(opt)
        self.rule = rule
        self.config = config
        self.update_backend = update_backend
        self.states: list[ParamState] = []
        self.id = next(_ids)
        self._items: list[_Item] = []
        self._lrs: dict[int, torch.Tensor] = {}
        self._signatures: dict[tuple[int, bool], tuple[Any, ...]] = {}
        self._compiled: Callable[[], Any] | None = None
        self._hook_handle: Any = None
        self._saved: dict[str, Any] = {}
        self.update_calls = 0

    # ----------------------------------------------------------------- install
    @property
    def opt(self) -> torch.optim.Optimizer:
        """The user optimizer (raises if it was freed)."""
        opt = self._opt_ref()
        if opt is None:
            raise ReferenceError("the optimizer bound by lowrank_compile no longer exists")
        return opt

    def add(self, state: ParamState) -> None:
        """Take over one more parameter; the compiled update is rebuilt at the next step."""
        state.binding = self
        self.states.append(state)
        self._compiled = None

    def install(self) -> None:
        """Wrap the optimizer's `step` and `zero_grad`, and add the update as first post-hook."""
        opt = self.opt
        if binding_of(opt) is not None:
            raise RuntimeError("optimizer already bound by lowrank_compile")
        from lowrank_compile import _compat
        from lowrank_compile.runtime import clip

        clip.install()
        binding = self
        for attr in ("step", "zero_grad"):
            self._saved[attr] = opt.__dict__.get(attr)  # an instance attribute (LRScheduler's), or None
        orig_step = opt.step
        orig_zero = opt.zero_grad

        def step(self_opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            return binding._step(orig_step, *args, **kwargs)

        def zero_grad(self_opt: torch.optim.Optimizer, set_to_none: bool = True) -> None:
            orig_zero(set_to_none)
            for st in binding.states:
                st.zero_grad(set_to_none)

        # Keep the wrapped function's attributes (LRScheduler's `_wrapped_by_lr_sched` marker).
        # Bind as methods, so an LRScheduler created later can wrap `opt.step.__func__` again.
        for attr, fn, orig in (("step", step, orig_step), ("zero_grad", zero_grad, orig_zero)):
            wrapped = _compat.dynamo_disable(fn)
            functools.update_wrapper(wrapped, getattr(orig, "__func__", orig))
            wrapped.__wrapped__ = orig  # type: ignore[attr-defined]
            setattr(opt, attr, types.MethodType(wrapped, opt))
        self._hook_handle = opt.register_step_post_hook(lambda o, a, k: binding.update())
        hooks = cast("OrderedDict[int, Any]", opt._optimizer_step_post_hooks)  # an OrderedDict at runtime
        hooks.move_to_end(self._hook_handle.id, last=False)
        setattr(opt, _ATTR, self)

    def uninstall(self) -> None:
        """Undo `install` (the backend's states are kept on the binding, not restored)."""
        opt = self._opt_ref()
        if opt is None:
            return
        for attr, saved in self._saved.items():
            if saved is None:
                opt.__dict__.pop(attr, None)
            else:
                setattr(opt, attr, saved)
        if self._hook_handle is not None:
            self._hook_handle.remove()
        if getattr(opt, _ATTR, None) is self:
            delattr(opt, _ATTR)

    # ----------------------------------------------------------------- step
    def _step(
        self, orig_step: Callable[..., Any], closure: Callable[[], Any] | None = None, **kw: Any
    ) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.fold_stray_grads()
        out = orig_step(**kw)
        return loss if closure is not None else out

    def fold_stray_grads(self) -> None:
        """Move into the buffers any `.grad` that an uncompiled backward left on a planned param."""
        for st in self.states:
            p = st.param
            if p is not None and p.grad is not None:
                with torch.no_grad():
                    st.accumulate(p.grad)
                p.grad = None

    def update(self) -> None:
        """Apply the optimizer's rule to every planned parameter that has a gradient."""
        active = [st for st in self.states if not st.fresh]
        if not active:
            return
        with torch.no_grad():
            for st in active:
                if st.proj is not None:
                    refresh.prepare(st)
        if self._compiled is None or self._rules_changed():
            self._build()
        opt = self.opt
        for gi, lr in self._lrs.items():
            lr.fill_(float(opt.param_groups[gi]["lr"]))
        for it in self._items:
            it.active = not it.st.fresh
            if it.st.proj is not None:
                it.wd = self.rule.weight_decay(opt, opt.param_groups[it.st.group])
        assert self._compiled is not None
        with torch.no_grad():
            self._compiled()
            for it in self._items:
                if it.active:
                    it.first = False
                    if it.st.proj is not None:
                        refresh.after_update(it.st)
        self.update_calls += 1

    # ----------------------------------------------------------------- rules and storage
    def _rule_for(self, st: ParamState) -> Rule:
        opt = self.opt
        group = dict(opt.param_groups[st.group])
        if st.proj is not None:
            group["weight_decay"] = 0.0  # applied by the epilogue, or folded into R (L2)
        attrs = {a: getattr(opt, a) for a in self.rule.instance_attrs if hasattr(opt, a)}
        return trace_rule(type(opt), group, opt.defaults, attrs, st.view.dtype)

    def _rules_changed(self) -> bool:
        """True when a param group's hyper-parameters changed (the rule must be traced again)."""
        return any(self._rule_for(it.st).signature != it.rule.signature for it in self._items)

    def _allocate(self, st: ParamState, rule: Rule) -> None:
        """The state storage of `st`: fp32 tensors, or 8-bit QStates when asked and large enough."""
        if st.ostate is not None and list(st.ostate) == [s.key for s in rule.specs]:
            return
        target = st.proj.virtual if st.proj is not None else st.view
        st.ostate = {}
        for spec in rule.specs:
            if spec.scalar:
                # Shape (1,), not 0-d: under torch.compile (2.13) an in-place update of a 0-d
                # float64 CPU tensor is silently dropped (Dynamo treats those as Python floats).
                st.ostate[spec.key] = torch.zeros(1, dtype=torch.float64, device=target.device)
            elif self.config.state_bits == 8 and target.numel() >= quant.MIN_QUANT_NUMEL:
                st.ostate[spec.key] = quant.QState.zeros(
                    tuple(target.shape), not spec.second_moment, target.device
                )
            else:
                st.ostate[spec.key] = torch.zeros(target.shape, dtype=target.dtype, device=target.device)

    def _build(self) -> None:
        opt = self.opt
        order = {id(p): i for g in opt.param_groups for i, p in enumerate(g["params"])}
        old = {id(it.st): it for it in self._items}
        self._items = []
        for st in sorted(self.states, key=lambda s: (s.group, order.get(id(s.param), 0))):
            rule = self._rule_for(st)
            self._allocate(st, rule)
            # float64 keeps lr and 1 - lr * wd as exact as eager's Python floats; shape (1,) for the
            # reason given in `_allocate`.
            lr = self._lrs.setdefault(st.group, torch.zeros(1, dtype=torch.float64, device=st.view.device))
            prev = old.get(id(st))
            first = prev.first if prev is not None else not rule.zero_init
            item = _Item(st, rule, lr, 0.0, first=first and not rule.zero_init)
            self._items.append(item)
        decoupled = self.rule.decoupled_weight_decay(opt.param_groups[0])
        scale = float(self.config.scale)
        items = self._items

        def load(store: Any) -> torch.Tensor:
            if isinstance(store, quant.QState):
                return quant.dequantize_blockwise(store.codes, store.absmax, store.signed, store.numel)
            # A step counter is stored (1,) and handed to the rule as a 0-d view made in the graph:
            # 0-d keeps eager's type promotion (a 1-D float64 would pull the update into float64).
            return store.view(()) if store.numel() == 1 and store.dtype == torch.float64 else store.view(-1)

        def save(store: Any, value: torch.Tensor) -> None:
            if isinstance(store, quant.QState):
                codes, absmax = quant.quantize_blockwise(value, store.signed)
                store.codes.copy_(codes)
                store.absmax.copy_(absmax)
            else:
                store.copy_(value.view(store.shape))

        def lowrank_update() -> None:
            for it in items:
                if not it.active:
                    continue
                st = it.st
                pj = st.proj
                if pj is None:
                    p, g = st.view.view(-1), cast(torch.Tensor, st.grad).view(-1)
                else:
                    pmat = (
                        pj.p if pj.basis is None else pj.basis.index_select(1, cast(torch.Tensor, pj.index))
                    )
                    pj.virtual.zero_()
                    p = pj.virtual.view(-1)
                    r = pj.r_acc
                    if not decoupled and it.wd:
                        r = r + it.wd * pm.project(st.view, pmat, pj.side)
                    g = r.reshape(-1)
                stores = list(cast(dict, st.ostate).values())
                lr = it.lr.view(())
                if it.first:
                    for store, value in zip(stores, it.rule.first(p, g, lr)):
                        save(store, value)
                else:
                    values = [load(s) for s in stores]
                    it.rule.step(p, g, lr, *values)
                    for store, value in zip(stores, values):
                        if isinstance(store, quant.QState):
                            save(store, value)
                if pj is not None:
                    if decoupled and it.wd:
                        st.view.mul_(1 - lr * it.wd)
                    # Scale the small R-shaped tensor, not through `alpha`: Inductor's add(mm) <->
                    # addmm rewrites drop alpha (pytorch/pytorch#167313, open on 2.13; measured here).
                    st.view.add_(pm.project_back(pj.virtual * scale, pmat, pj.side))

        fn = _private_code(lowrank_update, f"lowrank_update_{type(opt).__name__}_{self.id}")
        self._compiled = torch.compile(fn, backend=self.update_backend)

    def state_bytes(self) -> int:
        """Bytes of the optimizer states the backend holds for this optimizer."""
        total = 0
        for st in self.states:
            for v in (st.ostate or {}).values():
                total += v.nbytes() if isinstance(v, quant.QState) else v.numel() * v.element_size()
        return total
