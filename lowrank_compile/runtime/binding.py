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
  decoupled as torch's AdamW and Lion apply it (GaLore; the `method` option's others, in
  lowrank_compile/methods, change what the rule steps on and how its output changes W). The
  rule runs with weight decay 0: a decoupled decay is applied to W as above, and an L2 decay
  (Adam, SGD) is folded into the gradient as R + wd * proj(W).
States are stored per parameter (`ParamState.ostate`). With `state_bits=8`, states of >= 4096
values are block-wise 8-bit (`runtime/quant.py`): the compiled update dequantizes them, runs the
rule, and quantizes the result, all inside one graph that Inductor fuses. The update of one kind
of parameter and shape is one function, compiled once by torch.compile and Inductor with static
shapes and a private code object (its own Dynamo cache); its scalar terms are computed once per
call (the `hoist-scalars` pass). `lr`, the weight decay and the rule's lifted hyper-parameters
(runtime/rules.py) are float64 tensors read from the param group at every update (and written
only when a value changed: on an accelerator each write is a launch), so schedulers that change
lr, betas, momentum or weight decay cause no recompiles.
"""

from __future__ import annotations

import collections
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

from lowrank_compile import projectors
from lowrank_compile.config import LowRankConfig
from lowrank_compile.methods.base import Update
from lowrank_compile.optimizers import OptimizerRule
from lowrank_compile.runtime import checkpoint
from lowrank_compile.runtime import projector as pm
from lowrank_compile.runtime import projector_quant
from lowrank_compile.runtime import quant
from lowrank_compile.runtime import refresh
from lowrank_compile.runtime.kernels.adamw8bit import adamw8bit_applicable
from lowrank_compile.runtime.kernels.adamw8bit import adamw8bit_update
from lowrank_compile.runtime.rules import Rule
from lowrank_compile.runtime.rules import trace_rule
from lowrank_compile.runtime.state import ParamState
from lowrank_compile.runtime.state import compute_dtype

__all__ = ["OptimizerBinding", "binding_of"]

_ATTR = "_lowrank_binding"
# Updates run by the fused Triton 8-bit AdamW kernel, by parameter name (`_kernel_update`; what
# tests read to prove the kernel ran).
KERNEL_UPDATES: collections.Counter[str] = collections.Counter()
# The AdamW states the kernel reads and writes (torch.optim.AdamW's keys, amsgrad off).
_ADAMW_KEYS = {"step", "exp_avg", "exp_avg_sq"}
_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class _Item:
    """One taken-over parameter as the compiled update sees it."""

    st: ParamState
    rule: Rule
    lr: torch.Tensor
    wd: float  # the decay the backend applies (decoupled on W, or L2 added to the gradient)
    hps: torch.Tensor | None = None  # (k,) float64: the rule's lifted hyper-parameters (rules.py)
    wd_t: torch.Tensor | None = None  # (1,) float64: `wd` as the compiled update reads it
    wd_now: tuple[float, ...] | None = None  # the value `wd_t` holds (`_write`)
    hps_now: tuple[float, ...] | None = None  # the values `hps` holds (`_write`)
    first: bool = True  # the next update is the parameter's first (the rule's `first` runs)
    active: bool = False  # it has a gradient this step
    kstep: int | None = None  # the Triton kernel's host copy of the step counter (`_kernel_update`)


def binding_of(opt: torch.optim.Optimizer) -> OptimizerBinding | None:
    """The binding installed on `opt`, if any."""
    return getattr(opt, _ATTR, None)


def _write(t: torch.Tensor, values: tuple[float, ...], held: tuple[float, ...] | None) -> tuple[float, ...]:
    """Write `values` into the float64 tensor `t` unless it holds them already; return what it holds.

    lr, weight decay and the lifted hyper-parameters are read at every update but rarely change;
    on an accelerator each write is a launch or a host-to-device copy.
    """
    if values != held:
        if len(values) == 1:
            t.fill_(values[0])
        else:
            t.copy_(torch.tensor(values, dtype=torch.float64))
    return values


def _private_code(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A copy of closure `fn` with its own code object (and so its own Dynamo cache)."""
    code = fn.__code__.replace(co_name=name)
    new = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    new.__qualname__ = name
    return new


def _load(store: list[torch.Tensor], kind: tuple[Any, ...], as_blocks: bool, numel: int) -> torch.Tensor:
    if kind[0] == "q":
        codes, absmax = store
        if as_blocks:
            return quant.decode_blocks(codes, absmax, kind[1], kind[2])
        return quant.decode_blockwise(codes, absmax, kind[1], numel, kind[2])
    (t,) = store
    # A step counter is stored (1,) and handed to the rule as a 0-d view made in the graph: 0-d
    # keeps eager's type promotion (a 1-D float64 would pull the update into float64).
    if kind[0] == "s":
        return t.view(())
    return t.view(-1, quant.BLOCK) if as_blocks else t.view(-1)


def _save(
    store: list[torch.Tensor],
    kind: tuple[Any, ...],
    value: torch.Tensor,
    as_blocks: bool,
    old: torch.Tensor | None = None,
    settle: torch.Tensor | None = None,
    salt: torch.Tensor | None = None,
) -> None:
    if kind[0] == "q":
        codes, absmax = store
        encode = quant.encode_blocks if as_blocks else quant.encode_blockwise
        new_codes, new_absmax = encode(value, kind[1], kind[2], old, settle, salt)
        codes.copy_(new_codes)
        absmax.copy_(new_absmax)
    else:
        (t,) = store
        t.copy_(value.view(t.shape))


def _update_one(
    sig: tuple[Any, ...],
    w: torch.Tensor,
    grad: torch.Tensor,
    lr1: torch.Tensor,
    wd1: torch.Tensor,
    hps: torch.Tensor,
    basis: torch.Tensor | None,
    index: torch.Tensor | None,
    virtual: torch.Tensor | None,
    full: torch.Tensor | None,
    salt: torch.Tensor,
    *flat: torch.Tensor,
) -> None:
    """One parameter's update: its rule on the backend's tensors, states loaded and stored.

    `sig` = (rule, first, projected, side, decay, arrival, scale, layout, as_blocks, settles, sr,
    method, nm): constants Dynamo guards on. `arrival` says how the projector arrives: None (the
    matrix in `basis`), "basis" (`basis` and column `index`), a seeded kind's name (generated here from the
    key in `basis`, the kind's `generate`), or "q16"/"q8"/"q4" (codes in `basis`, group scales in
    `index`, dequantized here: runtime/projector_quant.py). `settles`: some element has no
    gradient, so the 8-bit settle rule can change a code (without it the rule is an identity,
    and is not traced). `decay`: None, "decoupled" (W <- W (1 - lr wd)), "l2" (G + wd W) or
    "l2-max" (G - wd W: the rule negates a maximized gradient, torch adds the decay after that).
    `hps` holds the rule's lifted hyper-parameters (Adam's betas, ...), read as 0-d views.
    `layout` says how each state is stored: ("q", signed, sqrt) 8-bit codes + absmax, ("s",) a
    float64 step counter, ("t",) a plain tensor. Full-rank parameters update `w` from `grad`,
    with the decay applied before the rule, as torch.optim applies it. Projected ones run the
    rule on `virtual` (zeroed) from R = `grad`, then apply W <- W * (1 - lr * wd) +
    back(scale * v); an L2 decay adds wd * proj(W) to R instead. `salt` (int64, 1 or 2 elements) is
    the parameter's update counter (with the piece's first element index when the update runs
    in pieces, `_pieces`): it seeds the stochastic rounding of the 8-bit settle rule
    (runtime/quant.py) and, with `sr` (bf16 weights, `stochastic_rounding=True`), of the weight.
    `method` (projected parameters; lowrank_compile/methods) says what the rule steps on and
    turns the rule's output into the change of W; its `nm` own states are the last tensors of
    `flat`, and `full` is G when it reads it (None otherwise).
    """
    rule, first, projected, side, decay, arrival, scale, layout, as_blocks, settles, sr, method, nm = sig
    mstates = list(flat[len(flat) - nm :])
    flat = flat[: len(flat) - nm]
    stores = _stores(layout, flat)
    lr = lr1.view(())
    wd = wd1.view(())
    hv = [hps[i] for i in range(len(rule.hp_keys))]
    sign = -1.0 if decay == "l2-max" else 1.0
    if projected:
        assert basis is not None and virtual is not None
        if arrival == "basis":
            pmat = basis.index_select(1, cast(torch.Tensor, index))
        elif arrival:
            d, r = (w.shape[0], virtual.shape[0]) if side == "left" else (w.shape[1], virtual.shape[1])
            if arrival.startswith("q"):  # quantized: codes in `basis`, [scale, lo] per group in `index`
                pmat = projector_quant.dequantize(
                    basis, cast(torch.Tensor, index), int(arrival[1:]), d, r, w.dtype
                )
            else:  # a seeded projector, generated here from its key (`basis`)
                pmat = projectors.get(arrival).generate(basis, d, r, min(w.shape), w.dtype)
        else:
            pmat = basis
        pmat = pmat.to(w.dtype)
        # The rule's parameter starts at zero: made in the graph (`virtual` gives its shape and
        # dtype), so Inductor fuses it away and no buffer is shared between parameters.
        target = torch.zeros_like(virtual)
        if decay in ("l2", "l2-max"):
            grad = grad + (sign * wd) * pm.project(w, pmat, side).to(grad.dtype)
            if full is not None:
                full = full + (sign * wd) * w.to(full.dtype)
        cdt_w = compute_dtype(w.dtype)
        g_full = full.to(cdt_w) if full is not None else None
        w_c = w.to(cdt_w)  # W before this update, in the compute dtype (read by the method only)
        # What the rule steps on: R, or what the method makes of G (GradNormLoRP's direction).
        grad = method.rule_input(g_full, grad.to(cdt_w), w_c, pmat, side, mstates)
        if not method.rule_lr:  # the method applies lr itself: the rule leaves -N
            lr = torch.ones_like(lr)
    else:
        target = w
    shape = (-1, quant.BLOCK) if as_blocks else (-1,)
    # bf16/fp16 parameters: the rule computes in fp32, the result is rounded back once.
    cdt = compute_dtype(target.dtype)
    p, g = target.view(shape).to(cdt), grad.reshape(shape).to(cdt)
    # The settle rule looks at the elements without a gradient: before a full-rank L2 decay.
    settle = g == 0 if settles else None
    if not projected:
        # torch.optim's order: the decay first (on the compute-dtype copy, rounded once with the
        # update), then the rule.
        if decay == "decoupled":
            p.mul_(1 - lr * wd)
        elif decay in ("l2", "l2-max"):
            g = g + (sign * wd) * p
    if first:
        for store, kind, value in zip(stores, layout, rule.first(p, g, lr, *hv)):
            _save(store, kind, value, as_blocks)
    else:
        values = [_load(store, kind, as_blocks, target.numel()) for store, kind in zip(stores, layout)]
        # The signed 8-bit states before the rule mutates them, for the settle rule: elements
        # without a gradient decay toward zero instead of sticking at a code (runtime/quant.py).
        olds = [
            v.clone() if kind[0] == "q" and kind[1] and settles else None for v, kind in zip(values, layout)
        ]
        rule.step(p, g, lr, *hv, *values)
        for store, kind, value, old in zip(stores, layout, values, olds):
            if kind[0] == "q":
                _save(store, kind, value, as_blocks, old, settle, salt)
    if p.dtype != target.dtype:
        # A full-rank bf16 weight is `target` itself: its one rounding is the stochastic one.
        target.view(shape).copy_(quant.stochastic_round_bf16(p, salt) if sr and not projected else p)
    if projected:
        lr = lr1.view(())
        keep = 1 - lr * wd if decay == "decoupled" else torch.ones_like(lr)
        specs = rule.specs

        def rule_step(q: torch.Tensor, qg: torch.Tensor, qstates: list[torch.Tensor]) -> None:
            views = [t.view(()) if spec.scalar else t for t, spec in zip(qstates, specs)]
            rule.step(q, qg, lr, *hv, *views)

        # GaLore reads v as stored (its bf16 rounding included, as before the methods existed);
        # the others read the rule's compute-dtype output.
        out = target if method.rule_lr else p.view(target.shape)
        u = Update(
            g_full,
            grad,
            out,
            w_c,
            pmat,
            side,
            lr,
            keep,
            scale,
            mstates,
            torch.float32 if sr else w.dtype,
            rule_step,
        )
        change = method.delta(u)
    if projected and sr:
        # The decay and the change in fp32, then one stochastic rounding to bf16.
        new = w.float()
        if decay == "decoupled":
            new = new * (1 - lr * wd)
        w.copy_(quant.stochastic_round_bf16(new + change, salt))
    elif projected:
        if decay == "decoupled":
            w.mul_(1 - lr * wd)
        w.add_(change)


# A full-rank update of more values than this runs in pieces of at most this many (whole 8-bit
# blocks): Inductor's CPU code stages each updated state in an fp32 buffer of the tensor's size
# while it takes block maxima, so a 2M-value embedding or output layer needed 16 MB of
# temporaries; pieces of 2^18 values need 2 MB (what `update_in_backward` adds to the backward's peak).
PIECE = 1 << 18


def _pieces(
    sig: tuple[Any, ...], args: tuple[Any, ...]
) -> tuple[list[tuple[Any, ...]], Callable[[], Any] | None]:
    """`_update_one`'s arguments for one call, or for consecutive pieces of a large full-rank update.

    Returns the argument tuples and what to run between two of them (None for one call).

    Every piece is the same update on a slice of the weight, the gradient and each state (the
    elementwise rules and the block-wise quantization never look across blocks). The step
    counter is shared: it is put back after every piece but the last, so it counts one update.
    The salt gains the piece's first element index, so the stochastic roundings draw what they
    would for the whole tensor.
    """
    layout, as_blocks = sig[7], sig[8]
    w, grad, lr, wd, hps, basis, index, virtual, full, salt = args[:10]
    flat = args[10:]
    n = w.numel()
    if sig[2] or not as_blocks or n <= PIECE or not w.is_contiguous():
        return [args], None
    nblocks = n // quant.BLOCK
    most = PIECE // quant.BLOCK
    per = next((d for d in range(most, 0, -1) if nblocks % d == 0), most)
    if per < most // 4:  # no near divisor: equal pieces plus one remainder (two compiled shapes)
        per = most
    stores = _stores(layout, flat)
    counters = [store for kind, store in zip(layout, stores) if kind[0] == "s"]
    saved = [c[0].clone() for c in counters]
    wf, gf = w.view(-1), grad.reshape(-1)
    out: list[tuple[Any, ...]] = []
    for b0 in range(0, nblocks, per):
        b1 = min(nblocks, b0 + per)
        a, z = b0 * quant.BLOCK, b1 * quant.BLOCK
        pieces: list[torch.Tensor] = []
        for kind, store in zip(layout, stores):
            if kind[0] == "q":
                pieces += [store[0][a:z], store[1][b0:b1]]
            elif kind[0] == "s":
                pieces += store
            else:
                pieces.append(store[0].view(-1)[a:z])
        psalt = torch.stack([salt.view(-1)[0], salt.new_tensor(a).view(())])
        out.append((wf[a:z], gf[a:z], lr, wd, hps, basis, index, virtual, full, psalt, *pieces))
    return out, lambda: [c[0].copy_(v) for c, v in zip(counters, saved)]


def _stores(layout: tuple[Any, ...], flat: tuple[Any, ...]) -> list[list[torch.Tensor]]:
    """`flat` grouped per state as `layout` says (8-bit: codes and absmax; others: one tensor)."""
    out, i = [], 0
    for kind in layout:
        k = 2 if kind[0] == "q" else 1
        out.append(list(flat[i : i + k]))
        i += k
    return out


def _refuse_grad_scaler() -> None:
    """update_in_backward: raise if an enabled GradScaler exists (its unscale would come too late)."""
    import gc

    from lowrank_compile.config import LowRankOptionError

    # torch.cuda.amp.GradScaler subclasses torch.amp.GradScaler.
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.amp.GradScaler) and obj.is_enabled():
            raise LowRankOptionError(
                "lowrank option 'update_in_backward': an enabled GradScaler exists; with "
                "update_in_backward=True parameters are updated inside the backward, before the scaler "
                "could unscale their gradients or skip a step with inf/NaN. Accepted with a GradScaler: "
                "update_in_backward=False"
            )


class OptimizerBinding:
    """Routes a user optimizer's `step`/`zero_grad` through the backend for its planned params."""

    def __init__(
        self,
        opt: torch.optim.Optimizer,
        rule: OptimizerRule,
        config: LowRankConfig,
        backend: Any,
    ) -> None:
        self._opt_ref = weakref.ref(opt)
        self.rule = rule
        self.config = config
        from lowrank_compile import methods

        self.method = methods.make(config)
        self.backend = backend  # the LowRankBackend whose graphs feed this optimizer
        self._nparams = sum(len(g["params"]) for g in opt.param_groups)
        self.states: list[ParamState] = []
        self.id = next(_ids)
        self._items: list[_Item] = []
        self._lrs: dict[int, torch.Tensor] = {}
        self._lr_now: dict[int, tuple[float, ...]] = {}  # the value each `_lrs` tensor holds (`_write`)
        self._compiled: dict[tuple[Any, ...], Callable[..., Any]] | None = None
        self._decoupled = False
        self._hook_handle: Any = None
        self._sd_handles: list[Any] = []
        self._dirty = False
        self._saved: dict[str, Any] = {}
        self.update_calls = 0
        self._item_of: dict[int, _Item] = {}
        self._checked = False  # update_in_backward: structural changes looked for this step
        self._scaler_checked = False
        # Hyper-parameter changes that traced a new rule (and so recompiled the update): one
        # entry per change, {"update": n, "group": g, "changes": [(key, old, new), ...]}.
        self.retraces: list[dict[str, Any]] = []

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
        self._dirty = True

    def invalidate(self) -> None:
        """Rebuild the update's items before the next update (states were loaded or dropped)."""
        self._dirty = True

    def is_first(self, st: ParamState) -> bool:
        """True when the next update of `st` runs the rule's first step (states not yet set)."""
        for it in self._items:
            if it.st is st:
                return it.first
        return st.ostate is None

    def install(self) -> None:
        """Wrap the optimizer's `step` and `zero_grad`, and add the update as first post-hook."""
        opt = self.opt
        if binding_of(opt) is not None:
            raise RuntimeError("optimizer already bound by lowrank_compile")
        from lowrank_compile import _compat
        from lowrank_compile.runtime import clip
        from lowrank_compile.runtime import torch_hooks

        clip.install()
        torch_hooks.install()
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
        self._sd_handles = [
            opt.register_state_dict_post_hook(lambda o, sd: binding.export_state(sd)),
            opt.register_load_state_dict_post_hook(lambda o: binding.import_state()),
        ]
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
        for h in self._sd_handles:
            h.remove()
        self._sd_handles = []
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
        nparams = sum(len(g["params"]) for g in self.opt.param_groups)
        if nparams != self._nparams:
            self._nparams = nparams
            self._take_over_added()
        self.fold_stray_grads()
        out = orig_step(**kw)
        return loss if closure is not None else out

    def _take_over_added(self) -> None:
        """Take over parameters added to the optimizer after the graphs that use them were planned."""
        from lowrank_compile.plan import NO_OPTIMIZER
        from lowrank_compile.plan import ParamInfo
        from lowrank_compile.runtime.state import decided
        from lowrank_compile.runtime.state import lookup

        opt = self.opt
        for gi, group in enumerate(opt.param_groups):
            for p in group["params"]:
                pp = decided(p)
                if pp is not None and pp.reason == NO_OPTIMIZER and lookup(p) is None:
                    self.backend.take_over_late(p, ParamInfo(pp.name, p, [(opt, gi)], pp.role))

    def fold_stray_grads(self) -> None:
        """Bring the buffers up to date before they are read (step, clipping, GradScaler's unscale).

        Moves into the buffers any `.grad` that an uncompiled backward left on a planned
        parameter, then, under DDP, waits for the reductions in flight and reduces what no
        synchronised backward did (runtime/dist.py).
        """
        folded = []
        for st in self.states:
            p = st.param
            if p is not None and p.grad is not None:
                with torch.no_grad():
                    st.accumulate(p.grad)
                p.grad = None
                folded.append(st.plan.name)
        if folded:
            from lowrank_compile.backend import _shown
            from lowrank_compile.backend import warn_once

            warn_once(
                f"lowrank: {_shown(folded)} received .grad from a backward the backend did not compile "
                "(an uncompiled backward, or a frame Dynamo ran eagerly, e.g. under a TorchDispatchMode); "
                "it is folded into the backend's buffers: correct, but that backward saved no memory."
            )
        if any(st.dp is not None for st in self.states):
            from lowrank_compile.runtime import dist

            with torch.no_grad():
                dist.settle(self.states)

    def update(self) -> None:
        """Apply the optimizer's rule to every planned parameter that has a gradient.

        Parameters the backward already updated (`update_in_backward`) are skipped; their step is
        over once `opt.step()` runs.
        """
        early = False
        for st in self.states:
            if st.done:
                st.done, early = False, True
        self._checked = False
        active = [st for st in self.states if not st.fresh]
        if not active:
            if early:
                self._finish_step()
            return
        with torch.no_grad():
            for st in active:
                if st.proj is not None:
                    refresh.prepare(st)
        self._ensure_built()
        for gi in self._lrs:
            self._set_lr(gi)
        for it in self._items:
            it.active = not it.st.fresh
            if it.active:
                self._read_group(it)
        with torch.no_grad():
            self._run_items()
            for it in self._items:
                if it.active:
                    it.first = False
                    if it.st.proj is not None:
                        refresh.after_update(it.st)
                        if self.method.full_gradient:
                            it.st.proj.full = None  # read by the method's update, not needed after it
                    if self.config.update_in_backward:
                        it.st.release_accumulators()
        self._finish_step()

    def _finish_step(self) -> None:
        self.update_calls += 1
        if self.config.check_ranks:
            from lowrank_compile.runtime import dist

            dist.check_ranks(self.states)

    def _ensure_built(self, rules: bool = True) -> None:
        """(Re)build the items when parameters, loaded states or (`rules`) group structure changed."""
        if self._compiled is None or self._dirty or not self._items or (rules and self._rules_changed()):
            self._build()

    def _set_lr(self, group: int) -> None:
        """Fill the group's lr tensor from its param group."""
        value = (float(self.opt.param_groups[group]["lr"]),)
        self._lr_now[group] = _write(self._lrs[group], value, self._lr_now.get(group))

    def _read_group(self, it: _Item) -> None:
        """Fill item `it`'s decay and lifted hyper-parameters from its param group, as they are now."""
        group = self.opt.param_groups[it.st.group]
        it.wd = self.rule.weight_decay(self.opt, group)
        if it.hps is not None and it.rule.hp_keys:
            it.hps_now = _write(it.hps, tuple(it.rule.hp_values(group)), it.hps_now)

    def update_now(self, st: ParamState, values: list[torch.Tensor], mode: str) -> None:
        """`update_in_backward`: update `st` from what its backward consumer just made (runtime/update_op.py).

        `values` are graph temporaries: [G] for a full-rank parameter, [R] when projected, plus
        the refresh sketch Y (randomized) or the new projector (svd/dct) on a refresh step. They
        are read here and not kept. lr, weight decay and the rule's hyper-parameters come from
        the param group as it is now.
        """
        if st.done:
            from lowrank_compile.runtime.update_op import second_gradient_error

            raise second_gradient_error(st.plan.name)
        if not self._scaler_checked:
            self._scaler_checked = True
            _refuse_grad_scaler()
        pj = st.proj
        with torch.no_grad():
            if pj is None:
                st.grad = values[0]
            elif mode == "full":  # grad_accumulation="full": R is made from the gradient by `prepare`
                pj.full = values[0]
                st.ensure_accumulators()
            elif pj.kind.refresh_from == "sketch":
                pj.r_acc.copy_(values[0])  # kept: the next sketch's warm start
            else:
                pj.r_acc = values[0]
            if pj is not None and mode == "sketch":
                pj.sketch_y = values[1]
            elif pj is not None and mode == "refresh":
                pj.refresh_buf = values[1]
            st.fresh, st.calls_since_zero = False, 1
            try:
                if pj is not None:
                    refresh.prepare(st)
                # The param groups' structure is looked at once per step, at its first update.
                self._ensure_built(rules=not self._checked)
                self._checked = True
                it = self._item_of[id(st)]
                self._set_lr(st.group)
                self._read_group(it)
                it.active = True
                self._run_item(it)
                it.active = False
                it.first = False
                if pj is not None:
                    refresh.after_update(st)
            finally:
                st.release_accumulators()
                st.fresh, st.calls_since_zero = True, 0
                st.done = True

    # ----------------------------------------------------------------- rules and storage
    def _rule_for(self, st: ParamState) -> Rule:
        opt = self.opt
        group = dict(opt.param_groups[st.group])
        # Applied around the rule (`_update_one`), its value a tensor input: a weight-decay
        # schedule changes no rule.
        group["weight_decay"] = 0.0
        attrs = {a: getattr(opt, a) for a in self.rule.instance_attrs if hasattr(opt, a)}
        return trace_rule(type(opt), group, opt.defaults, attrs, compute_dtype(st.view.dtype))

    def _rules_changed(self) -> bool:
        """True when a param group's structural hyper-parameters changed (the rule is traced again).

        Lifted values (rules.py) are not part of a signature; what changes one is recorded in
        `retraces`, for `lowrank-compile inspect`.
        """
        changed = False
        seen: set[int] = set()
        # The rule depends on the group and the compute dtype only: one lookup per pair, not per
        # parameter (86 lookups were ~0.07 ms each on a 12-layer model, every step).
        signatures: dict[tuple[int, torch.dtype], tuple] = {}
        for it in self._items:
            key = (it.st.group, compute_dtype(it.st.view.dtype))
            new = signatures.get(key)
            if new is None:
                new = signatures[key] = self._rule_for(it.st).signature
            if new == it.rule.signature:
                continue
            changed = True
            if it.st.group not in seen:
                seen.add(it.st.group)
                old_hp, new_hp = dict(it.rule.signature[0][1]), dict(new[0][1])
                diff = [(k, old_hp.get(k), new_hp.get(k)) for k in sorted(set(old_hp) | set(new_hp))]
                diff = [d for d in diff if d[1] != d[2]]
                self.retraces.append({"update": self.update_calls, "group": it.st.group, "changes": diff})
        return changed

    def _allocate(self, st: ParamState, rule: Rule) -> bool:
        """Make the state storage of `st` and move loaded states into it.

        Storage: fp32 tensors, or 8-bit QStates when asked and large enough. Returns True when
        loaded states were stored.
        """
        if st.ostate is None or list(st.ostate) != [s.key for s in rule.specs]:
            self._make_storage(st, rule)
        checkpoint.store_pending_method(st)
        return checkpoint.store_pending(st, rule.specs)

    def _make_storage(self, st: ParamState, rule: Rule) -> None:
        target = st.proj.virtual if st.proj is not None else st.view
        cdt = compute_dtype(target.dtype)
        st.ostate = {}
        st.scalar_keys = tuple(spec.key for spec in rule.specs if spec.scalar)
        for spec in rule.specs:
            if spec.scalar:
                # Shape (1,), not 0-d: under torch.compile (2.13) an in-place update of a 0-d
                # float64 CPU tensor is silently dropped (Dynamo treats those as Python floats).
                st.ostate[spec.key] = torch.zeros(1, dtype=torch.float64, device=target.device)
            elif self.config.state_bits == 8 and target.numel() >= quant.MIN_QUANT_NUMEL:
                signed = not spec.second_moment
                # Made now, outside the trace, so the compiled update reads them as constants.
                quant.dynamic_map(signed, target.device)
                quant.map_thresholds(signed, target.device)
                quant.code_table(signed, target.device)
                if signed:  # the settle rule's realized codes (quant.encode_blocks)
                    from lowrank_compile import _compat

                    _compat.realize_op()
                # Second moments are stored as their square root (quant's module docstring).
                st.ostate[spec.key] = quant.QState.zeros(
                    tuple(target.shape), signed, target.device, sqrt=spec.second_moment
                )
            else:
                st.ostate[spec.key] = torch.zeros(target.shape, dtype=cdt, device=target.device)
        st.mstate = {}
        if st.proj is not None:
            keys = tuple((spec.key, spec.scalar) for spec in rule.specs)
            for key, shape, counter in self.method.state_shapes(st.proj.shape, st.proj.side, keys):
                dt = torch.float64 if counter else cdt
                st.mstate[key] = torch.zeros(shape, dtype=dt, device=target.device)

    def _build(self) -> None:
        opt = self.opt
        order = {id(p): i for g in opt.param_groups for i, p in enumerate(g["params"])}
        old = {id(it.st): it for it in self._items}
        self._items = []
        for st in sorted(self.states, key=lambda s: (s.group, order.get(id(s.param), 0))):
            rule = self._rule_for(st)
            if (
                st.proj is not None
                and self.method.name != "galore"
                and opt.param_groups[st.group].get("maximize")
            ):
                from lowrank_compile.config import LowRankOptionError

                raise LowRankOptionError(
                    f"lowrank option 'method': {self.method.name!r} applies G itself (not only the rule's "
                    f"output), which maximize=True would have to negate; {st.plan.name}'s param group sets "
                    "maximize=True; accepted values with maximize=True: 'galore'"
                )
            if st.proj is not None and self.method.name != "galore" and not rule.zero_init:
                from lowrank_compile.config import LowRankOptionError

                raise LowRankOptionError(
                    f"lowrank option 'method': {self.method.name!r} needs an update rule that starts from "
                    f"zero states (Adam, AdamW); {type(opt).__name__}'s settings for {st.plan.name} do not; "
                    "accepted values with this optimizer: 'galore'"
                )
            restored = self._allocate(st, rule)
            # float64 keeps lr and 1 - lr * wd as exact as eager's Python floats; shape (1,) for the
            # reason given in `_allocate`.
            lr = self._lrs.setdefault(st.group, torch.zeros(1, dtype=torch.float64, device=st.view.device))
            prev = old.get(id(st))
            first = prev.first if prev is not None and not st.pending_first else True
            if restored:
                first = False
            st.pending_first = False
            hps = torch.zeros(len(rule.hp_keys), dtype=torch.float64, device=st.view.device)
            item = _Item(st, rule, lr, 0.0, hps=hps, first=first and not rule.zero_init)
            self._items.append(item)
        self._item_of = {id(it.st): it for it in self._items}
        self._compiled = self._compiled or {}
        self._dirty = False
        self._decoupled = self.rule.decoupled_weight_decay(opt.param_groups[0])

    def _run_items(self) -> None:
        """Run the compiled update of every active item.

        Each kind of parameter (rule, flags, storage layout: the `sig` tuple of `_update_one`)
        and set of shapes has its compiled function, traced with static shapes and with a private
        code object: it compiles once, never recompiles, and Inductor emits vectorized loops with
        constant trip counts. (Dynamo's automatic dynamic shapes would fold a second shape into
        a symbolic graph whose CPU loops are scalar, with index arithmetic per element.)
        Compile time follows the variety of parameters (kinds x shapes), not their number.
        One graph per kind holding every parameter would save the per-call overhead (~0.1 ms a
        parameter on CPU), but Inductor generates code for each parameter separately then:
        measured on a 6-layer LLaMA: a 306 s first step, against 59-71 s.
        """
        for it in self._items:
            if it.active:
                self._run_item(it)

    def _run_item(self, it: _Item) -> None:
        if self._kernel_update(it):
            it.st.rounds += 1
            it.st.stepped = True
            return
        sig, args = self._call(it)
        pieces, between = _pieces(sig, args)
        for i, piece in enumerate(pieces):
            if i and between is not None:
                between()
            shapes = tuple(tuple(a.shape) for a in piece if isinstance(a, torch.Tensor))
            self._fn((sig, shapes))(sig, *piece)
        it.st.rounds += 1
        it.st.stepped = True

    def _kernel_update(self, it: _Item) -> bool:
        """Run item `it`'s update with the fused Triton 8-bit AdamW kernel where it applies.

        Returns False (and does nothing) unless `update_kernel="auto"`, the optimizer is exactly
        torch.optim.AdamW with amsgrad and maximize off, the parameter is full-rank with 8-bit
        moments and no stochastic rounding, and `adamw8bit_applicable` accepts the tensors (CUDA,
        or the Triton interpreter). The kernel computes `_update_one`'s update for such an item
        (tests/interp holds the two side by side) in one launch, with the step counter kept on
        the host: read once per build, then counted here, so no update syncs with the device.
        """
        st = it.st
        if self.config.update_kernel != "auto" or st.proj is not None or it.first or not self._decoupled:
            return False
        if type(self.opt) is not torch.optim.AdamW or self.config.stochastic_rounding:
            return False
        group = self.opt.param_groups[st.group]
        ostate = st.ostate or {}
        if group.get("amsgrad") or group.get("maximize") or set(ostate) != _ADAMW_KEYS:
            return False
        m, v, grad = ostate["exp_avg"], ostate["exp_avg_sq"], st.grad
        if not isinstance(m, quant.QState) or not isinstance(v, quant.QState) or grad is None:
            return False
        if not adamw8bit_applicable(st.view, grad, m, v):
            return False
        counter = ostate["step"]
        if it.kstep is None:
            it.kstep = int(counter.item())  # once per build (one sync)
        it.kstep += 1
        b1, b2 = group["betas"]
        adamw8bit_update(
            st.view,
            grad,
            m,
            v,
            step=it.kstep,
            lr=float(group["lr"]),
            beta1=float(b1),
            beta2=float(b2),
            eps=float(group["eps"]),
            weight_decay=it.wd,
            salt=st.rounds,
        )
        counter.fill_(it.kstep)
        KERNEL_UPDATES[st.plan.name] += 1
        return True

    def _call(self, it: _Item) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """The `sig` of item `it` and the tensors `_update_one` takes for it."""
        st = it.st
        pj = st.proj
        ostate = cast(dict, st.ostate)
        stores = list(ostate.values())
        layout = tuple(
            ("q", s.signed, s.sqrt)
            if isinstance(s, quant.QState)
            else ("s",)
            if k in st.scalar_keys
            else ("t",)
            for k, s in ostate.items()
        )
        flat: list[torch.Tensor] = []
        for s in stores:
            flat += [s.codes, s.absmax] if isinstance(s, quant.QState) else [s]
        target = pj.virtual if pj is not None else st.view
        as_blocks = any(isinstance(s, quant.QState) for s in stores) and target.numel() % quant.BLOCK == 0
        if it.wd_t is None:
            it.wd_t = torch.zeros(1, dtype=torch.float64, device=st.view.device)
        it.wd_now = _write(it.wd_t, (it.wd,), it.wd_now)
        decay: str | None
        if self._decoupled:
            decay = "decoupled"
        else:
            decay = "l2-max" if self.opt.param_groups[st.group].get("maximize") else "l2"
        scale = float(self.config.scale)
        salt = st.salt_tensor()
        hps = cast(torch.Tensor, it.hps)
        # The settle rule (quant.encode_blocks) acts only on elements whose gradient is exactly 0.
        # On CPU a gradient without one (every dense layer, almost always) skips it: the same
        # codes, at ~40% less cost for the 8-bit update. One reduction (`all()`) decides; on an
        # accelerator that would be a host sync per parameter, so there the rule always runs.
        signed_q = any(k[:2] == ("q", True) for k in layout)
        sr = self.config.stochastic_rounding and st.view.dtype == torch.bfloat16
        if self.config.stochastic_rounding and not sr:
            from lowrank_compile.backend import warn_once

            warn_once(
                f"lowrank: stochastic_rounding=True has no effect on {st.plan.name} ({st.view.dtype}): "
                "it rounds bf16 weights only"
            )
        sig: tuple[Any, ...]

        def settles_for(g: torch.Tensor) -> bool:
            return signed_q and (g.device.type != "cpu" or not bool(g.all()))

        if pj is None:
            # Structural: a decay of 0 leaves W and G untouched (0 * inf would be NaN).
            grad = cast(torch.Tensor, st.grad)
            settles = settles_for(grad)
            sig = (
                it.rule,
                it.first,
                False,
                None,
                decay if it.wd else None,
                False,
                scale,
                layout,
                as_blocks,
                settles,
                sr,
                None,
                0,
            )
            return sig, (st.view, grad, it.lr, it.wd_t, hps, None, None, None, None, salt, *flat)
        # How the projector arrives: a matrix (None), a shared basis (basis + indices) or seeded (its key).
        storage = pj.kind.storage
        arrival = "basis" if storage == "basis" else pj.method if storage == "seeded" else None
        if pj.pcodes is not None:
            arrival = f"q{pj.pbits}"
        # A projected L2 decay adds wd * proj(W) before the settle mask is taken: always settle.
        settles = signed_q and (decay in ("l2", "l2-max") or settles_for(pj.r_acc))
        method = self.method
        nm = len(st.mstate)
        sig = (
            it.rule,
            it.first,
            True,
            pj.side,
            decay,
            arrival,
            scale,
            layout,
            as_blocks,
            settles,
            sr,
            method,
            nm,
        )
        full = pj.full if method.full_gradient else None
        if method.full_gradient and full is None:
            raise RuntimeError(f"lowrank: {st.plan.name}: method {method.name!r} found no full gradient")
        flat += list(st.mstate.values())  # in `state_shapes` order
        basis, index = (
            (pj.basis, pj.index) if arrival == "basis" else (pj.key, None) if arrival else (pj.p, None)
        )
        if pj.pcodes is not None:
            basis, index = pj.pcodes, pj.pqparams
        return sig, (st.view, pj.r_acc, it.lr, it.wd_t, hps, basis, index, pj.virtual, full, salt, *flat)

    def _fn(self, key: tuple[Any, ...]) -> Callable[..., Any]:
        assert self._compiled is not None
        fn = self._compiled.get(key)
        if fn is None:
            name = f"lowrank_update_{type(self.opt).__name__}_{self.id}_{len(self._compiled)}"
            # Static shapes: one compile per key, each loop vectorized with a constant trip count.
            fn = self._compiled[key] = torch.compile(
                _private_code(_update_one, name), backend=self.backend.update_backend, dynamic=False
            )
        return fn

    # ----------------------------------------------------------------- checkpoints
    def export_state(self, sd: dict[str, Any]) -> dict[str, Any]:
        """`state_dict` post-hook: add the backend's state of each taken-over parameter.

        Entries go under the index torch.optim gave the parameter in `sd["param_groups"]`.
        """
        opt = self.opt
        if self._dirty or any(st.pending_state is not None for st in self.states):
            self._build()  # loaded states not yet moved into storage
        index = {
            id(p): i
            for group, packed in zip(opt.param_groups, sd["param_groups"])
            for p, i in zip(group["params"], packed["params"])
        }
        for st in self.states:
            p = st.param
            if p is None or id(p) not in index:
                continue
            entry = checkpoint.export(st)
            if entry is not None:
                sd["state"][index[id(p)]] = entry
        return sd

    def import_state(self) -> None:
        """`load_state_dict` post-hook: take the loaded entries of taken-over parameters back.

        A parameter without an entry loses its state, as in torch.optim (the state is replaced).
        """
        from lowrank_compile.runtime.state import decided

        opt = self.opt
        mine = set()
        for st in self.states:
            p = st.param
            if p is None:
                continue
            mine.add(id(p))
            entry = opt.state.pop(p, None)
            if entry:
                checkpoint.restore(st, entry)
            else:
                checkpoint.forget(st)
        for p, entry in list(opt.state.items()):
            # A lowrank entry for a parameter torch.optim updates (saved under other options).
            if id(p) not in mine and isinstance(entry, dict) and isinstance(entry.get("lowrank"), dict):
                plan = decided(p)
                opt.state[p] = checkpoint.to_torch(plan.name if plan else "a parameter", entry, p)

    def state_bytes(self) -> int:
        """Bytes of the optimizer states the backend holds for this optimizer."""
        total = 0
        for st in self.states:
            for v in (st.ostate or {}).values():
                total += v.nbytes() if isinstance(v, quant.QState) else v.numel() * v.element_size()
            total += sum(v.numel() * v.element_size() for v in st.mstate.values())
        return total
