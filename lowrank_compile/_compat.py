"""Every private torch API the package relies on, in one place (torch 2.11 to 2.14).

Importing this module imports Dynamo and Inductor (and with them triton, when installed), so
only code that runs at compile time imports it; `import lowrank_compile` stays lean.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import torch
import torch._dynamo
import torch._dynamo.exc
import torch._functorch.config as functorch_config
from torch._dynamo.utils import counters
from torch._guards import detect_fake_mode
from torch._inductor.compile_fx import compile_fx
from torch._inductor.compile_fx import compile_fx_inner

__all__ = [
    "allocation_events",
    "before_ddp_split",
    "checkpoint_side_effect_breaks",
    "compile_wrapper_target",
    "compile_fx",
    "compile_fx_inner",
    "compile_later_context",
    "counters",
    "detect_fake_mode",
    "dynamo_disable",
    "guard_on_identity",
    "no_autograd_cache",
    "post_grad_pass",
    "real_parameters",
    "realize_op",
    "rebuild_ddp_reducer",
    "static_fake",
    "unwrapped_by_dynamo",
]


@contextlib.contextmanager
def no_autograd_cache() -> Iterator[None]:
    """Keep AOTAutograd's cache off while the backend compiles.

    The backward graph is rewritten and wrapped after AOTAutograd hands it over. A cached
    artifact would skip that step, so nothing may be loaded from or saved to that cache.
    Inductor's FX graph cache keys on the rewritten graph and stays on.
    """
    with functorch_config.patch(enable_autograd_cache=False):
        yield


def compile_later_context() -> Callable[[], contextlib.AbstractContextManager[None]]:
    """Save the tracing and compile contexts now; the returned factory re-enters them later.

    For compiling another variant of a backward graph at its first use, outside AOTAutograd's
    compile, as AOTAutograd's own lazy backward compile does (runtime_wrappers: get_or_compile).
    """
    from torch._guards import CompileContext
    from torch._guards import TracingContext
    from torch._guards import compile_context
    from torch._guards import tracing

    saved, saved_compile = TracingContext.try_get(), CompileContext.try_get()

    @contextlib.contextmanager
    def enter() -> Iterator[None]:
        with tracing(saved), compile_context(saved_compile), torch._C._DisableAutocast():
            yield

    return enter


def static_fake(fake_mode: Any, tensor: torch.Tensor) -> torch.Tensor:
    """A fake tensor with static sizes, for extra graph inputs the backend appends."""
    return fake_mode.from_tensor(tensor, static_shapes=True)


def guard_on_identity(gm: torch.fx.GraphModule, indices: list[int]) -> int:
    """Make Dynamo reuse this graph only for the very same objects at input positions `indices`.

    Parameters are graph inputs, so Dynamo's guards check their structure, not which model they
    belong to. Without this, a graph compiled for one model instance runs for another model of
    the same architecture. The backward the backend rewrote holds per-parameter state, so it must
    never be shared. The guards are added to the tracing context while the backend runs; Dynamo
    installs them with the frame's others. Returns how many guards were added.
    """
    from torch._dynamo.guards import GuardBuilder

    tc = torch._guards.TracingContext.try_get()
    if tc is None:
        return 0
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    added = 0
    for i in indices:
        grapharg = placeholders[i].meta.get("grapharg") if i < len(placeholders) else None
        source = getattr(grapharg, "source", None)
        if source is None:
            continue
        tc.guards_context.dynamo_guards.add(source.make_guard(GuardBuilder.ID_MATCH))
        added += 1
    return added


def real_parameters(example_inputs: Any, indices: list[int]) -> dict[int, torch.Tensor | None]:
    """The real parameter behind each of `example_inputs[indices]` (None where none is found).

    Dynamo's DDPOptimizer splits a graph per DDP bucket and hands every piece fake copies of
    the parameters, made by the piece's fake mode from the real ones. The fake mode's memo maps
    each real tensor to its fake; the real candidates are the parameters of the DDP module whose
    forward is being compiled.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    out: dict[int, torch.Tensor | None] = {i: example_inputs[i] for i in indices}
    fakes = {i: x for i, x in out.items() if isinstance(x, FakeTensor)}
    if not fakes:
        return out
    ddp = None
    if torch.distributed.is_available():
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel._get_active_ddp_module()
    by_fake: dict[int, torch.Tensor] = {}
    if ddp is not None:
        for q in ddp.module.parameters():
            for fake_mode in {id(f.fake_mode): f.fake_mode for f in fakes.values()}.values():
                hit = fake_mode.fake_tensor_converter._get_memo(q)
                if hit is not None:
                    by_fake[id(hit)] = q
    for i, f in fakes.items():
        out[i] = by_fake.get(id(f))
    return out


_DDP_HOOKS: list[Callable[[Any, torch.fx.GraphModule, list[Any]], None]] = []


def before_ddp_split(hook: Callable[[Any, torch.fx.GraphModule, list[Any]], None]) -> None:
    """Call `hook(backend, gm, example_inputs)` before Dynamo's DDPOptimizer splits a graph.

    DDPOptimizer (the default `optimize_ddp`) cuts a graph compiled inside DDP's forward into
    one piece per DDP bucket and compiles each with fake parameters. The hook sees the whole
    graph with the real parameters first, so the backend can plan them (their roles read from
    the whole graph) and mark them `_ddp_ignored`, which DDPOptimizer's bucketing skips.
    """
    if hook in _DDP_HOOKS or not torch.distributed.is_available():
        return
    from torch._dynamo.backends.distributed import DDPOptimizer

    _DDP_HOOKS.append(hook)
    if getattr(DDPOptimizer.compile_fn, "_lowrank_hooked", False):
        return
    original = DDPOptimizer.compile_fn

    def compile_fn(self: Any, gm: torch.fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Any:
        for h in _DDP_HOOKS:
            h(self.backend_compile_fn, gm, example_inputs)
        return original(self, gm, example_inputs, **kwargs)

    compile_fn._lowrank_hooked = True  # type: ignore[attr-defined]
    DDPOptimizer.compile_fn = compile_fn  # type: ignore[method-assign]


def rebuild_ddp_reducer(ddp: Any, names: set[str]) -> None:
    """Rebuild `ddp`'s Reducer without the parameters `names`, the way DDP's `__setstate__` builds one.

    `names` are spelled as the Reducer forms them (module name, ".", parameter name). The old
    Reducer's autograd hooks are removed; comm hooks are registered again on the new one. With
    no parameter left, DDP's own switch for a module whose every parameter is reduced elsewhere
    (`_delay_all_reduce_all_params`) turns its forward hooks into no-ops.
    """
    import torch.distributed as dist

    ddp.reducer._remove_autograd_hooks()
    ddp.parameters_to_ignore |= names
    parameters, expect_sparse = ddp._build_params_for_reducer()
    if not parameters:
        ddp._delay_all_reduce_all_params = True
        return
    mapping = ddp._build_debug_param_to_name_mapping(parameters)
    ddp._ddp_init_helper(parameters, expect_sparse, mapping, ddp.static_graph)
    if ddp.static_graph:
        ddp.reducer._set_static_graph()
        ddp.logger._set_static_graph()
    for hook, state in ddp._comm_hooks:
        dist._register_comm_hook(ddp.reducer, state, hook)


def compile_wrapper_target(fn: Any) -> tuple[Any, dict[str, Any]]:
    """(the backend function, its `mode`/`options` kwargs) behind torch.compile's backend wrapper."""
    return getattr(fn, "compiler_fn", fn), dict(getattr(fn, "kwargs", None) or {})


def dynamo_disable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`torch._dynamo.disable`: Dynamo neither traces `fn` nor anything it calls."""
    return torch._dynamo.disable(fn, recursive=True)


# Why the integer hashes (quant.uniform_hash, quant.stochastic_round_bf16, the seeded projectors)
# add a zero read from a tensor to their iota: Inductor's index propagation folds `arange * C`
# into one index expression, and torch 2.11 prints index expressions in the kernel's int32
# index type, so on Triton a 32-bit constant C such as 0x9E3779B1 fails to compile ("Scalar
# 2654435761 is out of range for type int32"; seen on the GPU machine, torch 2.11 + triton 3.6,
# 2026-12-04). torch 2.13 emits such values through value_expr in int64. A loaded value ends the
# folding on every version, and the numbers stay the same.
HASH_INDEX_NOTE = "iota + a zero read from a tensor: no int32 index expression on Triton"


def inductor_lowers(op: Any) -> bool:
    """Whether Inductor has a lowering for the aten overload `op` (else it builds a fallback on the fly)."""
    from torch._inductor.lowering import lowerings

    return op in lowerings


# The Dynamo flag that lets a checkpointed region with Python side effects compile (the side
# effects then run once in the forward, not again in the recomputation).
CHECKPOINT_SIDE_EFFECTS_FLAG = "skip_fwd_side_effects_in_bwd_under_checkpoint"


def checkpoint_side_effect_breaks() -> list[str]:
    """Dynamo's recorded graph breaks that ran an activation-checkpointed region eagerly.

    Dynamo cannot compile a checkpoint body that mutates Python state from outside it unless
    `torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint` is set; it then breaks
    the graph and runs the whole region eagerly. Returns the reasons (each break's text) of such
    breaks seen so far in this process; empty when the flag is already set.
    """
    if getattr(torch._dynamo.config, CHECKPOINT_SIDE_EFFECTS_FLAG, True):
        return []
    return [k for k in counters["graph_break"] if CHECKPOINT_SIDE_EFFECTS_FLAG in k]


_UNWRAPPED_TYPES: dict[type, type[BaseException]] = {}


def unwrapped_by_dynamo(err: BaseException) -> BaseException:
    """Return `err` as an instance Dynamo re-raises as it is, not wrapped in BackendCompilerFailed.

    Dynamo passes `ShortenTraceback` subclasses through untouched. The result is a subclass
    of `type(err)`, so `except type(err)` still catches it.
    """
    base = getattr(torch._dynamo.exc, "ShortenTraceback", None)
    if base is None:  # pragma: no cover - torch without ShortenTraceback: plain error
        return err
    cls = type(err)
    sub: type[BaseException] | None = _UNWRAPPED_TYPES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (cls, base), {"__module__": cls.__module__})
        _UNWRAPPED_TYPES[cls] = sub
    new = BaseException.__new__(sub)
    BaseException.__init__(new, *err.args)
    new.first_useful_frame = None  # type: ignore[attr-defined]
    return new


def allocation_events(prof: Any) -> list[tuple[int, int]]:
    """(time in ns, bytes) of each allocation (+) and free (-) in a finished profile, in time order.

    The profile must be recorded with `profile_memory=True`; the events come from its private
    Kineto results.
    """
    events = prof.profiler.kineto_results.events()
    return sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")


def post_grad_pass(graph_pass: Any, then: Any = None) -> Any:
    """`graph_pass` (a GraphPass) as Inductor's `post_grad_custom_post_pass`, followed by `then`.

    `then` is a pass the user configured there already (the `inductor` option), kept after ours.
    The wrapper is a `CustomGraphPass`, so Inductor's FX graph cache keys on its `uuid()`.
    """
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class _Adapter(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            graph_pass(graph.owning_module)
            if then is not None:
                then(graph)

        def uuid(self) -> Any:
            theirs = then.uuid() if then is not None and hasattr(then, "uuid") else repr(then)
            return (graph_pass.uuid(), theirs)

    return _Adapter()


_REALIZE: Any = None


def realize_op() -> Any:
    """`lowrank::realize(x) -> x`: an identity that Inductor computes into a buffer of its own.

    Inductor inlines a pointwise producer into each consumer's loop; through this op it makes the
    producer a realized buffer instead (computed once, read with a load). Registered on first use,
    with an Inductor lowering (a private API) that realizes its input. Outside Inductor it is a copy.
    """
    global _REALIZE
    if _REALIZE is None:
        from torch._inductor.lowering import register_lowering

        @torch.library.custom_op("lowrank::realize", mutates_args=())
        def realize(x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        @realize.register_fake
        def _(x: torch.Tensor) -> torch.Tensor:
            return torch.empty_like(x)

        @register_lowering(torch.ops.lowrank.realize.default, type_promotion_kind=None)
        def _lower(x: Any) -> Any:
            x.realize()
            return x

        _REALIZE = torch.ops.lowrank.realize.default
    return _REALIZE
