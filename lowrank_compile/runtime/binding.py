"""OptimizerBinding: the backend's hold on one user optimizer.

When the backend takes over parameters of an optimizer, it installs two instance-level
wrappers on it:

- `opt.step`: Dynamo-disabled, so the remaining parameters are updated by torch.optim as in
  eager mode and their float hyper-parameters never become guards (no recompiles when an LR
  scheduler changes `lr`). It calls the original step, which runs the user's step hooks. The
  backend's update is the first step post-hook, so it sees whatever a pre-hook changed.
- `opt.zero_grad`: clears the backend's gradient buffers with eager semantics.

The update of taken-over parameters is the optimizer's own `step`, run by a *shadow* instance
of the same class. The shadow's parameters are the backend's views of the real parameters,
its `.grad` the backend's buffers, its hyper-parameters copied from the user's param groups at
every step (`lr` as a 0-d tensor), and its states owned by the backend. The shadow's `step` is
compiled once with torch.compile and Inductor. A private code object gives it a Dynamo cache
of its own.
"""

from __future__ import annotations

import functools
import inspect
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
from lowrank_compile.runtime.state import ParamState

__all__ = ["OptimizerBinding", "binding_of"]

_ATTR = "_lowrank_binding"
_ids = itertools.count()


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
        self._shadow: torch.optim.Optimizer | None = None
        self._shadow_groups: list[tuple[int, dict[str, Any]]] = []
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
        """Take over one more parameter; the shadow is rebuilt at the next step."""
        state.binding = self
        self.states.append(state)
        self._shadow = None
        self._compiled = None

    def install(self) -> None:
        """Wrap the optimizer's `step` and `zero_grad`, and add the update as first post-hook."""
        opt = self.opt
        if binding_of(opt) is not None:
            raise RuntimeError("optimizer already bound by lowrank_compile")
        from lowrank_compile import _compat

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
        if self._compiled is None:
            self._build()
        self._sync_hyperparameters()
        for st in self.states:
            st.view.grad = None if st.fresh else st.grad
        assert self._compiled is not None
        # torch.optim creates its step counters with the default dtype's precision. Compiled, Adam
        # computes 1 - beta2**t from that tensor, and in fp32 that cancellation loses ~1.3e-5
        # relative; eager mode computes it in Python doubles. Float64 counters keep eager numerics.
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            self._compiled()
        finally:
            torch.set_default_dtype(prev)
        self.update_calls += 1

    # ----------------------------------------------------------------- shadow
    def _build(self) -> None:
        opt = self.opt
        by_group: dict[int, list[ParamState]] = {}
        order = {id(p): i for g in opt.param_groups for i, p in enumerate(g["params"])}
        for st in self.states:
            by_group.setdefault(st.group, []).append(st)
        groups = []
        self._shadow_groups = []
        for gi in sorted(by_group):
            members = sorted(by_group[gi], key=lambda s: order.get(id(s.param), 0))
            ug = opt.param_groups[gi]
            group = {k: v for k, v in ug.items() if k != "params"}
            group["params"] = [st.view for st in members]
            group["lr"] = torch.tensor(float(ug["lr"]), dtype=self.rule.lr_dtype)
            groups.append(group)
        cls = type(opt)
        accepted = inspect.signature(cls.__init__).parameters
        defaults = {k: v for k, v in opt.defaults.items() if k in accepted and k != "params"}
        shadow = cls(groups, **defaults)
        for gi, group in zip(sorted(by_group), shadow.param_groups):
            self._shadow_groups.append((gi, group))
        self._shadow = shadow

        def lowrank_update() -> None:
            shadow.step()

        fn = _private_code(lowrank_update, f"lowrank_update_{type(opt).__name__}_{self.id}")
        self._compiled = torch.compile(fn, backend=self.update_backend)

    def _sync_hyperparameters(self) -> None:
        opt = self.opt
        for gi, group in self._shadow_groups:
            ug = opt.param_groups[gi]
            for k, v in ug.items():
                if k == "params":
                    continue
                if k == "lr":
                    group["lr"].fill_(float(v))
                    continue
                cur = group.get(k)
                if cur is v:
                    continue
                if isinstance(v, torch.Tensor) or isinstance(cur, torch.Tensor) or cur != v:
                    group[k] = v  # a changed float recompiles the update, as plain torch.compile does

    @property
    def shadow(self) -> torch.optim.Optimizer | None:
        """The shadow optimizer (None until the first update)."""
        return self._shadow
