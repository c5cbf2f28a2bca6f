"""OptimizerBinding: the backend's hold on one user optimizer.

When the backend takes over parameters of an optimizer, it installs two instance-level
wrappers on it:

- `opt.step`: Dynamo-disabled, so the remaining parameters are updated by torch.optim as in
  eager mode and their float hyper-parameters never become guards (no recompiles when an LR
  scheduler changes `lr`). It calls the original step, which runs the user's step hooks. The
  backend's update is the first step post-hook, so it sees whatever a pre-hook changed.
- `opt.zero_grad`: clears the backend's gradient buffers with eager semantics.

The update of taken-over parameters is the optimizer's own `step`, run by a *shadow* instance
of the same class. Its hyper-parameters are copied from the user's param groups at every step
(`lr` as a 0-d tensor), and the backend owns its states. Each user param group maps to up to two
shadow groups:

- full-rank members: the parameter's storage (a detached view), `.grad` = the backend's buffer.
- projected members: a *virtual* parameter of R's shape, zero before each update, `.grad` = R.
  The optimizer's step leaves v = -lr * N in it. Then W <- W * (1 - lr * wd) + scale * back(v),
  with decay decoupled as torch's AdamW and Lion apply it. Weight decay is 0 in that group: a
  decoupled decay is applied to W as above, and an L2 decay (Adam, SGD) is folded into the
  gradient as R + wd * proj(W).

The whole update is compiled once with torch.compile and Inductor. A private code object gives
it a Dynamo cache of its own.
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
from lowrank_compile.runtime import projector as pm
from lowrank_compile.runtime import refresh
from lowrank_compile.runtime.state import ParamState

__all__ = ["OptimizerBinding", "binding_of"]

_ATTR = "_lowrank_binding"
_WD_KEY = "lowrank_weight_decay"  # the real decay of a projected shadow group (its own is 0)
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
        # (user group index, shadow group, projected?) for every shadow group
        self._shadow_groups: list[tuple[int, dict[str, Any], bool]] = []
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
        if self._compiled is None:
            self._build()
        self._sync_hyperparameters()
        l2 = not self.rule.decoupled_weight_decay(self.opt.param_groups[0])
        for st in self.states:
            if st.proj is None:
                st.view.grad = None if st.fresh else st.grad
            else:
                pj = st.proj
                pj.virtual.grad = None if st.fresh else (pj.eff_grad if l2 else pj.r_acc)
        assert self._compiled is not None
        # torch.optim creates its step counters with the default dtype's precision. Compiled, Adam
        # computes 1 - beta2**t from that tensor, and in fp32 that cancellation loses ~1.3e-5
        # relative; eager mode computes it in Python doubles. Float64 counters keep eager numerics.
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            with torch.no_grad():
                self._compiled()
        finally:
            torch.set_default_dtype(prev)
        with torch.no_grad():
            for st in active:
                if st.proj is not None:
                    refresh.after_update(st)
        self.update_calls += 1

    # ----------------------------------------------------------------- shadow
    def _build(self) -> None:
        opt = self.opt
        order = {id(p): i for g in opt.param_groups for i, p in enumerate(g["params"])}
        by_group: dict[tuple[int, bool], list[ParamState]] = {}
        for st in self.states:
            by_group.setdefault((st.group, st.proj is not None), []).append(st)
        groups = []
        self._shadow_groups = []
        keys = sorted(by_group)
        for gi, projected in keys:
            members = sorted(by_group[(gi, projected)], key=lambda s: order.get(id(s.param), 0))
            ug = opt.param_groups[gi]
            group = {k: v for k, v in ug.items() if k != "params"}
            group["lr"] = torch.tensor(float(ug["lr"]), dtype=self.rule.lr_dtype)
            if projected:
                group["params"] = [st.proj.virtual for st in members if st.proj is not None]
                group["weight_decay"] = 0.0
                group[_WD_KEY] = self.rule.weight_decay(opt, ug)
            else:
                group["params"] = [st.view for st in members]
            groups.append(group)
        cls = type(opt)
        accepted = inspect.signature(cls.__init__).parameters
        defaults = {k: v for k, v in opt.defaults.items() if k in accepted and k != "params"}
        shadow = cls(groups, **defaults)
        for attr in self.rule.instance_attrs:
            if hasattr(opt, attr):
                setattr(shadow, attr, getattr(opt, attr))
        for (gi, projected), group in zip(keys, shadow.param_groups):
            self._shadow_groups.append((gi, group, projected))
        self._shadow = shadow

        decoupled = self.rule.decoupled_weight_decay(opt.param_groups[0])
        scale = float(self.config.scale)
        items: list[
            tuple[Any, ...]
        ] = []  # (virtual, r_acc, eff_grad, p, basis, index, w, side, shadow group)
        for (gi, projected), group in zip(keys, shadow.param_groups):
            if not projected:
                continue
            for st in sorted(by_group[(gi, True)], key=lambda s: order.get(id(s.param), 0)):
                pj = st.proj
                assert pj is not None
                if not decoupled and pj.eff_grad is None:
                    pj.eff_grad = torch.zeros_like(pj.r_acc)
                items.append(
                    (pj.virtual, pj.r_acc, pj.eff_grad, pj.p, pj.basis, pj.index, st.view, pj.side, group)
                )

        # The step body without torch.optim's wrappers: the hook/profiler wrapper (the shadow has no
        # hooks) and `_use_grad`, whose graph breaks would split the update and compile
        # `Adam.step` as a frame shared by every Adam instance. The update runs under no_grad
        # (see `update`), which is what those graph breaks exist to guarantee.
        raw_step = inspect.unwrap(cls.step)

        def lowrank_update() -> None:
            for v, *_ in items:
                v.zero_()
            if not decoupled:
                for v, r, eff, p, basis, index, w, side, group in items:
                    if v.grad is None:
                        continue
                    if group[_WD_KEY]:
                        pmat = p if basis is None else basis.index_select(1, index)
                        eff.copy_(r + group[_WD_KEY] * pm.project(w, pmat, side))
                    else:
                        eff.copy_(r)
            raw_step(shadow)
            for v, _r, _eff, p, basis, index, w, side, group in items:
                if v.grad is None:
                    continue
                pmat = p if basis is None else basis.index_select(1, index)
                if decoupled:
                    w.mul_(1 - group["lr"] * group[_WD_KEY])
                # Scale the small R-shaped tensor, not through `alpha`: Inductor's add(mm) <-> addmm
                # rewrites drop alpha (pytorch/pytorch#167313, open on 2.13; measured here).
                w.add_(pm.project_back(v * scale, pmat, side))

        fn = _private_code(lowrank_update, f"lowrank_update_{type(opt).__name__}_{self.id}")
        self._compiled = torch.compile(fn, backend=self.update_backend)

    def _sync_hyperparameters(self) -> None:
        opt = self.opt
        for gi, group, projected in self._shadow_groups:
            ug = opt.param_groups[gi]
            for k, v in ug.items():
                if k == "params":
                    continue
                if k == "lr":
                    group["lr"].fill_(float(v))
                    continue
                if projected and k == "weight_decay":
                    wd = self.rule.weight_decay(opt, ug)
                    if group[_WD_KEY] != wd:
                        group[_WD_KEY] = wd  # recompiles the update, as a changed float does in torch.compile
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
