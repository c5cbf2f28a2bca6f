"""The `lowrank` torch.compile backend: capture, discovery, planning and orchestration.

Dynamo hands every captured graph to `lowrank_backend`. For a graph whose inputs include
parameters:

1. **Discover and plan.** Find the optimizers that own the parameters (`discovery`), decide
   per parameter what the backend takes over (`plan`), allocate its state
   (`runtime.state`), and bind the owning optimizer (`runtime.binding`).
2. **Compile with Inductor.** The graph goes through Inductor's `compile_fx`, which runs
   AOTAutograd. Inductor calls back into `_inner_compile` with the forward and the backward
   graph. The forward is compiled untouched. The backward is rewritten first
   (`pipeline.backward_passes`) and wrapped in `BackwardWithState`, which feeds it the backend's
   buffers on every call.

Graphs without parameters (for example the tail of a step after a graph break) go to Inductor
untouched. So do parameters the plan leaves to torch.optim, with one warning per reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Sequence
from typing import Any
from typing import cast

import torch
from torch import nn

from lowrank_compile.config import LowRankConfig
from lowrank_compile.config import LowRankOptionError
from lowrank_compile.config import parse_options
from lowrank_compile.plan import FROZEN
from lowrank_compile.plan import Kind
from lowrank_compile.plan import ParamInfo
from lowrank_compile.plan import ParamPlan
from lowrank_compile.plan import make_plan
from lowrank_compile.plan import revisable
from lowrank_compile.runtime import state as state_mod
from lowrank_compile.runtime.state import ParamState

__all__ = ["LowRankBackend", "LowRankWarning", "lowrank_backend", "reset"]


class LowRankWarning(UserWarning):
    """Something was left to torch.optim / Inductor, or a rewrite could not apply."""


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Issue `message` as a LowRankWarning, once per process."""
    if message in _warned:
        return
    _warned.add(message)
    warnings.warn(message, LowRankWarning, stacklevel=3)


@dataclasses.dataclass
class GraphRecord:
    """What the backend saw and did for one Dynamo graph (for inspection and tests)."""

    index: int
    num_inputs: int
    param_indices: list[int]
    planned: dict[int, str]  # forward input index -> parameter name
    kind: str = (
        "train"  # "train": user graph with parameters; "other": no parameters; "update": optimizer update
    )
    passes: list[Any] = dataclasses.field(default_factory=list)  # PassRecords of the backward
    backward_compiled: bool = False
    fallback: str | None = None  # why the backward was not rewritten, if it was not
    identity_guards: int = 0  # ID_MATCH guards added so the graph never runs on other parameters
    # Backward calls per variant ("steady", "refresh", "lean"); a variant is compiled at its first call.
    variant_calls: dict[str, int] = dataclasses.field(default_factory=dict)


class BackwardWithState:
    """A compiled backward that also takes the backend's buffers as trailing inputs.

    AOTAutograd calls it boxed (one list of inputs, consumed). There is one compiled graph per
    variant: "steady"; "refresh" when the graph holds svd/dct/randomized projected parameters
    (their refresh step); "lean" when clip_stats="auto" lets the backward skip what only
    clip_grad_norm_ reads. Each call picks a variant, compiles it on its first use (as
    AOTAutograd compiles a backward: under the forward's saved tracing context), appends the
    extra inputs that consume-grads declared for it, runs the graph, and marks the consumed
    states as holding a gradient.
    """

    def __init__(
        self,
        names: list[str],
        build: Any,
        states: list[ParamState],
        num_inputs: int = 0,
        calls: dict[str, int] | None = None,
    ) -> None:
        # An instance attribute: AOTAutograd wraps this object with functools.wraps, which copies
        # the instance __dict__ (not class attributes) onto the wrapper it calls.
        self._boxed_call = True
        self.names = names
        self._build = build  # name -> (compiled, extra inputs, anchors)
        self.variants: dict[str, tuple[Any, list[tuple[ParamState, str]]]] = {}
        self.states = states
        # update_in_backward (runtime/update_op.py): per variant, the states the graph updates and
        # the input positions that are their parameters; checked against aliases on first call.
        self.anchors: dict[str, dict[int, tuple[ParamState, list[int]]]] = {}
        self.unchecked: set[str] = set()
        self.num_inputs = num_inputs
        self.in_backward = [st for st in self.states if st.config.update_in_backward]
        self.projected = [st for st in self.states if st.proj is not None]
        # The states the "lean" variant consumes without statistics.
        self.lean = [
            st for st in self.projected if st.config.clip_stats == "auto" and not st.config.update_in_backward
        ]
        self.calls: dict[str, int] = {} if calls is None else calls  # the GraphRecord's variant_calls
        # Parameters trained under DDP: their buffers are reduced by runtime/dist.py.
        self.data_parallel = [st for st in self.states if st.dp is not None]
        self.compiled = self._variant(self.variant(), now=True)[0]

    def variant(self) -> str:
        """The variant the next call runs."""
        if "refresh" in self.names and any(st.proj.refresh_due() for st in self.projected if st.proj):
            return "refresh"
        if "lean" in self.names and all(st.lean_ok() for st in self.lean):
            return "lean"
        return "steady"

    def _variant(self, name: str, now: bool = False) -> tuple[Any, list[tuple[ParamState, str]]]:
        """Variant `name`, compiled on first use (`now`: inside AOTAutograd's own compile)."""
        if name not in self.variants:
            compiled, extra, anchors = self._build(name, now)
            self.variants[name] = (compiled, extra)
            if anchors:
                self.anchors[name] = anchors
                self.unchecked.add(name)
        return self.variants[name]

    def __call__(self, args: list[Any]) -> Any:
        if self.data_parallel:
            from lowrank_compile.runtime import dist

            dist.wait_for(self.data_parallel)  # a reduction in flight still writes the buffers
        for st in self.in_backward:
            if st.done:
                from lowrank_compile.runtime.update_op import second_gradient_error

                raise second_gradient_error(st.plan.name)
        name = self.variant()
        compiled, extra = self._variant(name)
        if name in self.unchecked:
            self._check_aliases(name, args)
        for st, role in extra:
            if role == "fresh":
                args.append(state_mod.constant(st.view.device, st.fresh))
            else:
                args.append(st.input_for(role))
        out = compiled(args)
        for st in self.states:
            if st.config.update_in_backward:
                st.backward_calls += 1  # its update ran in the graph and reset the flags
                continue
            if st.fresh:
                st.no_stats = False
            st.fresh = False
            st.backward_calls += 1
            st.calls_since_zero += 1
        if name == "lean":
            for st in self.lean:
                st.no_stats = True  # clip_grad_norm_ cannot read this step's gradient norm
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.data_parallel:
            dist.after_backward(self.data_parallel)
        return out

    def _check_aliases(self, name: str, args: list[Any]) -> None:
        """update_in_backward: no input but the parameter itself may share its storage.

        The update op is ordered after the graph's reads of the parameter's own input; a saved
        view of the weight (another input on the same storage) would be read unordered.
        """
        from lowrank_compile.config import LowRankOptionError

        by_storage: dict[int, set[int]] = {}
        for j, a in enumerate(args[: self.num_inputs]):
            if isinstance(a, torch.Tensor) and a.device.type != "meta":
                by_storage.setdefault(a.untyped_storage().data_ptr(), set()).add(j)
        for st, positions in self.anchors[name].values():
            other = by_storage.get(st.view.untyped_storage().data_ptr(), set()) - set(positions)
            if other:
                raise LowRankOptionError(
                    f"lowrank option 'update_in_backward': the backward graph reads {st.plan.name} "
                    f"through {len(other)} saved view(s) besides the parameter itself, so its update "
                    "inside the backward cannot be ordered after every read. Use "
                    "update_in_backward=False for this model"
                )
        self.unchecked.discard(name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.compiled, name)


class LowRankBackend:
    """The backend for one `LowRankConfig` (and torch.compile `mode`)."""

    def __init__(self, config: LowRankConfig, mode: str | None = None) -> None:
        self.config = config
        self.mode = mode
        self.graphs: list[GraphRecord] = []

    # ------------------------------------------------------------------ compile
    def inductor_patches(self) -> dict[str, Any]:
        """Inductor config for every graph: the `mode`'s options, then the `inductor` option."""
        patches: dict[str, Any] = {}
        if self.mode not in (None, "default"):
            import torch._inductor

            patches.update(torch._inductor.list_mode_options(self.mode))
        patches.update(self.config.inductor_patches())
        return patches

    def inductor(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        """Compile `gm` with Inductor, unchanged."""
        from lowrank_compile import _compat

        return _compat.compile_fx(gm, list(example_inputs), config_patches=self.inductor_patches())

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        """Compile one Dynamo graph (see the module docstring)."""
        from lowrank_compile import _compat
        from lowrank_compile.runtime import torch_hooks

        torch_hooks.install()  # its step pre-hook says when a graph break hid matrices from the plan
        param_indices = [i for i, x in enumerate(example_inputs) if isinstance(x, nn.Parameter)]
        record = GraphRecord(len(self.graphs), len(example_inputs), param_indices, {})
        compiled = self._compile(gm, example_inputs, record, _compat)
        # Recorded only once compiled: Dynamo may abandon an attempt (it restarts analysis from
        # inside the backend) and call again.
        record.index = len(self.graphs)
        self.graphs.append(record)
        return compiled

    def _compile(
        self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], record: GraphRecord, _compat: Any
    ) -> Any:
        param_indices = record.param_indices
        if not param_indices:
            record.kind = "other"
            return self.inductor(gm, example_inputs)
        # Under Dynamo's DDPOptimizer each bucket's piece comes with fake copies of the
        # parameters: plan the real ones.
        reals = _compat.real_parameters(example_inputs, param_indices)
        if any(r is None for r in reals.values()):
            warn_once(
                "lowrank: a graph came with fake parameters that the backend cannot map back to the "
                "model's (a graph splitter other than DDPOptimizer?); they are left to torch.optim. "
                "torch._dynamo.config.optimize_ddp = False hands the backend the real parameters."
            )
        if torch._dynamo.config.compiled_autograd:
            warn_once(
                "lowrank: compiled autograd is enabled; it replays the backward itself, so the "
                "backend cannot consume gradients in it. Every parameter is left to torch.optim."
            )
            return self.inductor(gm, example_inputs)
        slots = self._plan_graph(gm, [(i, reals[i]) for i in param_indices if reals[i] is not None])
        record.planned = {i: st.plan.name for i, st in slots.items()}
        if not slots:
            return self.inductor(gm, example_inputs)
        record.identity_guards = _compat.guard_on_identity(gm, sorted(slots))
        inner = functools.partial(_inner_compile, slots=slots, record=record, num_inputs=len(example_inputs))
        with _compat.no_autograd_cache():
            return _compat.compile_fx(
                gm, list(example_inputs), inner_compile=inner, config_patches=self.inductor_patches()
            )

    # ------------------------------------------------------------------ planning
    def _plan_graph(
        self, gm: torch.fx.GraphModule, params: list[tuple[int, torch.Tensor]]
    ) -> dict[int, ParamState]:
        """Plan the graph's parameters; return forward input index -> state of those taken over."""
        from lowrank_compile import roles as role_analysis
        from lowrank_compile.discovery import find_owners

        # New parameters, and ones left to torch.optim only because they were frozen or held by
        # no optimizer when first planned (unfrozen since, or added with add_param_group).
        new = [(i, p) for i, p in params if (d := state_mod.decided(p)) is None or revisable(d, p)]
        if new:
            owners = find_owners(p for _, p in new)
            roles = role_analysis.param_roles(gm, [i for i, _ in new])
            roles, unsure = self._settle_output_roles(gm, new, roles, owners)
            infos = [
                ParamInfo(
                    owners.name_of(p, f"input{i}"),
                    p,
                    owners.optimizer_of(p),
                    roles.get(i, "other"),
                    owners.wrapper_of(p),
                )
                for i, p in new
            ]
            try:
                plan = make_plan(infos, self.config)
            except (
                LowRankOptionError
            ) as err:  # a method the optimizer does not fit (plan._method_state_bytes)
                from lowrank_compile import _compat

                raise _compat.unwrapped_by_dynamo(err) from None
            self._warn_unsure_outputs(plan.params, unsure)
            if self.config.update_in_backward:
                self._refuse_ddp(new, plan.params, owners)
            under_ddp: dict[int, tuple[nn.Module, list[ParamState]]] = {}
            for (_, p), info, pp in zip(new, infos, plan.params):
                st = self._take_over(p, info, pp) if pp.kind is not Kind.TORCH else None
                if st is None:
                    _to_torch_format(p, info, pp)
                elif (ddp := owners.ddp_of(p)) is not None:
                    under_ddp.setdefault(id(ddp), (ddp, []))[1].append(st)
                state_mod.register(p, pp, st)
            for ddp, sts in under_ddp.values():
                from lowrank_compile.runtime import dist

                dist.adopt(ddp, sts)  # out of DDP's Reducer, before its backward is prepared
            if len(new) == len(params) and not any(pp.taken_over for pp in plan.params):
                self._warn_none_taken_over(plan.params)
            else:
                self._warn_left_alone(plan.params)
        if len(new) < len(params):
            # Parameters trained already: follow them if their optimizer was replaced.
            from lowrank_compile.runtime.torch_hooks import follow_replaced_optimizers

            seen = {id(p) for _, p in new}
            follow_replaced_optimizers([p for _, p in params if id(p) not in seen])
        slots: dict[int, ParamState] = {}
        for i, p in params:
            st = state_mod.lookup(p)
            if st is None:
                continue
            if st.config != self.config:
                raise RuntimeError(
                    f"lowrank: parameter {st.plan.name!r} is already trained by a step compiled with "
                    f"options {st.config.as_dict()}; this graph was compiled with "
                    f"{self.config.as_dict()}. Compile every function that trains a model with the "
                    "same options."
                )
            slots[i] = st
        return slots

    def _settle_output_roles(
        self,
        gm: torch.fx.GraphModule,
        new: list[tuple[int, torch.Tensor]],
        roles: dict[int, str],
        owners: Any,
    ) -> tuple[dict[int, str], list[str]]:
        """Decide the "output" roles a graph break may have faked (see roles.py).

        A matmul whose result leaves the graph without another parameter matmul downstream looks
        like the output layer. When a graph break follows a hidden layer (transformers graph-breaks
        between the decoder and the LM head under gradient checkpointing), it is not. A model that
        names its output layer (`get_output_embeddings()`) settles it; otherwise, when this graph
        computes no scalar (no loss here, so its outputs go on to another graph), the role stays
        "output" (full-rank), and the parameter's name is returned among the undecided ones.
        """
        from lowrank_compile import roles as role_analysis

        out = dict(roles)
        unsure: list[str] = []
        computes_loss: bool | None = None  # read from the graph once, when first needed
        for i, p in new:
            if out.get(i) != "output":
                continue
            if owners.declared_hidden(p):
                out[i] = "matmul"
            elif id(p) not in owners.declared_outputs:
                if computes_loss is None:
                    computes_loss = role_analysis.computes_scalar(gm)
                if not computes_loss:
                    unsure.append(owners.name_of(p, f"input{i}"))
        return out, unsure

    def _refuse_ddp(self, new: list[tuple[int, torch.Tensor]], plans: list[ParamPlan], owners: Any) -> None:
        """update_in_backward: refuse, before anything is taken over, a parameter trained under DDP."""
        for (_, p), pp in zip(new, plans):
            if pp.kind is not Kind.TORCH and owners.ddp_of(p) is not None:
                from lowrank_compile import _compat

                raise _compat.unwrapped_by_dynamo(
                    LowRankOptionError(
                        f"lowrank option 'update_in_backward': got True for {pp.name}, trained under "
                        "DistributedDataParallel; an update inside the backward would run before the "
                        "gradient is averaged over the ranks. Accepted under DDP: False"
                    )
                ) from None

    def take_over_late(self, p: torch.Tensor, info: ParamInfo) -> ParamState | None:
        """Plan a parameter the graphs left to torch.optim again, and take it over if the plan says so.

        Used for parameters added with `add_param_group` after the graphs were compiled: those
        graphs still write the gradient to `.grad`, and the step folds it into the buffers.
        """
        pp = make_plan([info], self.config).params[0]
        st = self._take_over(p, info, pp) if pp.taken_over else None
        state_mod.register(p, pp, st)
        return st

    def _take_over(self, p: torch.Tensor, info: ParamInfo, pp: ParamPlan) -> ParamState:
        from lowrank_compile.optimizers import rule_for
        from lowrank_compile.runtime.binding import OptimizerBinding
        from lowrank_compile.runtime.binding import binding_of

        opt, _ = info.owners[0]
        binding = binding_of(opt)
        if binding is None:
            rule = rule_for(opt)
            assert rule is not None
            binding = OptimizerBinding(opt, rule, self.config, self)
            binding.install()
        st = ParamState.create(p, pp, self.config)
        binding.add(st)
        if self.config.state_bits == 8:
            # The 8-bit code tables (128 KiB each, cached per device), built now rather than
            # inside the first step, whose peak they would otherwise join.
            from lowrank_compile.runtime import quant

            for signed in (True, False):
                quant.code_table(signed, p.device)
        entry = opt.state.pop(p, None)
        if entry:
            # A loaded checkpoint, or states of eager steps taken before the first compiled one.
            from lowrank_compile.runtime import checkpoint

            checkpoint.restore(st, entry)
        return st

    def _warn_left_alone(self, plans: list[ParamPlan]) -> None:
        reasons: dict[str, list[str]] = {}
        for pp in plans:
            if pp.kind is Kind.TORCH and pp.surprising:
                reasons.setdefault(pp.reason, []).append(pp.name)
        for reason, names in reasons.items():
            warn_once(f"lowrank: left to torch.optim and Inductor untouched: {_shown(names)}: {reason}.")

    def _warn_unsure_outputs(self, plans: list[ParamPlan], undecided: list[str]) -> None:
        """One warning for the parameters `_settle_output_roles` left undecided that stay full-rank."""
        unsure = [pp.name for pp in plans if pp.name in undecided and pp.kind is Kind.FULL]
        if unsure:
            warn_once(
                "lowrank: cannot tell whether "
                + ", ".join(unsure[:4])
                + (f" ({len(unsure)} in all)" if len(unsure) > 4 else "")
                + " is the output layer or a hidden layer followed by a graph break: it stays "
                "full-rank. Models that name their output layer (get_output_embeddings()) are "
                "classified exactly."
            )

    def _warn_none_taken_over(self, plans: list[ParamPlan]) -> None:
        """One warning for a graph that trains parameters of which the backend takes over none."""
        trained = [pp for pp in plans if pp.reason != FROZEN]
        if not trained or not torch.is_grad_enabled():
            return  # nothing trains here (frozen parameters, or an inference graph)
        reasons: dict[str, list[str]] = {}
        # The reasons that are not the defaults' ordinary choices come first: they are the cause.
        for pp in sorted(trained, key=lambda pp: not pp.surprising):
            reasons.setdefault(pp.reason, []).append(pp.name)
        parts = [f"{_shown(names)}: {reason}" for reason, names in reasons.items()]
        warn_once(
            f"lowrank: this graph trains {len(trained)} parameters and the backend takes over none of "
            "them (no projection, no 8-bit states; torch.optim and Inductor train them as usual). "
            + "; ".join(parts)
            + "."
        )

    def update_backend(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        """Backend for the compiled optimizer update of taken-over parameters.

        Inductor, with the update's post-grad pass (`lowrank_compile.pipeline.update_post_grad_pass`)
        ahead of any the user configured.
        """
        import torch._inductor.config as inductor_config

        from lowrank_compile import _compat
        from lowrank_compile.pipeline import update_post_grad_pass

        patches = self.inductor_patches()
        key = "post_grad_custom_post_pass"
        patches[key] = update_post_grad_pass(patches.get(key, getattr(inductor_config, key)))
        # Every gather in the update indexes a table with an index in range by construction
        # (8-bit codes into their 256-entry map, masked float bits into the code table): the
        # per-element bounds checks are dropped (~10% of the 8-bit update on CPU).
        patches.setdefault("assert_indirect_indexing", False)
        # AOTAutograd's cache does not key on the post-grad pass (measured on 2.13: an artifact
        # compiled without hoist-scalars was loaded with it); Inductor's FX graph cache does.
        with _compat.no_autograd_cache():
            compiled = _compat.compile_fx(gm, list(example_inputs), config_patches=patches)
        self.graphs.append(GraphRecord(len(self.graphs), len(example_inputs), [], {}, kind="update"))
        return compiled


def _shown(names: list[str]) -> str:
    """The first names of a list, for a warning."""
    return ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")


def _to_torch_format(p: torch.Tensor, info: ParamInfo, pp: ParamPlan) -> None:
    """A lowrank checkpoint entry of a parameter now left to torch.optim, in torch.optim's format."""
    from lowrank_compile.runtime import checkpoint

    for opt, _ in info.owners:
        entry = opt.state.get(p)
        if isinstance(entry, dict) and isinstance(entry.get("lowrank"), dict):
            opt.state[p] = checkpoint.to_torch(pp.name, entry, p)


def _slot(i: int, st: ParamState, variant: str) -> Any:
    """How consume-grads consumes parameter `st`'s gradient in `variant`."""
    from lowrank_compile.passes.consume_grads import GradSlot

    pj = st.proj
    up = st.config.update_in_backward
    if pj is None:
        return GradSlot(i, "full", update=up)
    if st.config.keeps_full_gradient:  # grad_accumulation="full", or a method that reads G
        return GradSlot(i, "full", update=up)
    kind = pj.kind
    ck = 0 if up else st.clip_k()  # clipping cannot follow an update made inside the backward
    q: dict[str, Any] = {"update": up}
    if pj.pcodes is not None:  # a quantized projector: codes and group scales are the inputs
        assert pj.pqparams is not None
        q |= {"pbits": pj.pbits, "pshapes": (tuple(pj.pcodes.shape), tuple(pj.pqparams.shape))}
    q["projector"] = pj.method
    if variant in ("steady", "lean") or kind.refresh_from == "key":
        # A seeded projector refreshes without the gradient (refresh.advance_seeded): no refresh variant.
        if up or (variant == "lean" and st.config.clip_stats == "auto"):
            # No clip reads this gradient (none can follow an update inside the backward): no
            # statistics, no clip sketch, and R straight from the layer's input and output gradient.
            q |= {"stats": False, "direct": True}
            ck = 0
        return GradSlot(i, "project", side=pj.side, rank=pj.rank, clip_k=ck, **q)
    if kind.refresh_from == "sketch":
        k = kind.sketch_width(pj.rank, pj.reduced)
        return GradSlot(i, "sketch", side=pj.side, rank=pj.rank, sketch_k=k, clip_k=ck, **q)
    # svd/dct: the projector is made inside backward, so no full-size gradient outlives its layer.
    signs = st.config.svd_signs
    name = st.plan.name
    return GradSlot(i, "refresh", side=pj.side, rank=pj.rank, name=name, clip_k=ck, signs=signs, **q)


def _clone(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    new = torch.fx.GraphModule(gm, graph)
    new.meta = dict(gm.meta)
    out_node = gm.graph.output_node()
    graph.output_node().meta.update(out_node.meta)
    return new


def _inner_compile(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    slots: dict[int, ParamState],
    record: GraphRecord,
    num_inputs: int,
    **kwargs: Any,
) -> Any:
    """Inductor's inner compile, with the backward graph rewritten first (one compile per variant)."""
    from lowrank_compile import _compat
    from lowrank_compile.passes.consume_grads import ANCHORS_KEY
    from lowrank_compile.passes.consume_grads import EXTRA_INPUTS_KEY
    from lowrank_compile.pipeline import backward_passes

    if not kwargs.get("is_backward"):
        return _compat.compile_fx_inner(gm, example_inputs, **kwargs)
    outputs = list(cast(Sequence[Any], gm.graph.output_node().args[0]))
    problem = _check_backward(outputs, slots, num_inputs)
    if problem is not None:
        record.fallback = problem
        warn_once(
            f"lowrank: a backward graph was not rewritten ({problem}); its gradients reach .grad "
            "and are folded into the backend's buffers at opt.step() (correct, but no memory saved)."
        )
        return _compat.compile_fx_inner(gm, example_inputs, **kwargs)
    # Variants whose slots differ from the steady ones; each is compiled on its first use.
    names = ["steady"]
    projected = [(i, st) for i, st in slots.items() if st.proj is not None]
    for name in ("refresh", "lean"):
        if any(_slot(i, st, name) != _slot(i, st, "steady") for i, st in projected):
            names.append(name)
    num_placeholders = len(example_inputs)
    static = list(kwargs.pop("static_input_idxs", None) or [])
    pristine = _clone(gm)
    later = _compat.compile_later_context()

    def build(name: str, now: bool) -> tuple[Any, list[tuple[ParamState, str]], dict[int, Any]]:
        """Variant `name`: (compiled graph, its extra inputs, update_in_backward's anchors)."""
        vgm = _clone(pristine)
        records = backward_passes(vgm, [_slot(i, st, name) for i, st in sorted(slots.items())])
        for rec in records:
            rec.name = f"{rec.name} [{name}]" if len(names) > 1 else rec.name
        record.passes.extend(records)
        placeholders = [n for n in vgm.graph.nodes if n.op == "placeholder"]
        new_inputs = [n.meta["val"] for n in placeholders[num_placeholders:]]
        vkw = dict(kwargs)
        vkw["static_input_idxs"] = static + list(range(num_placeholders, num_placeholders + len(new_inputs)))
        with contextlib.nullcontext() if now else later():
            compiled = _compat.compile_fx_inner(vgm, list(example_inputs) + new_inputs, **vkw)
        spec = vgm.meta.get(EXTRA_INPUTS_KEY, [])
        anchors = {i: (slots[i], pos) for i, pos in vgm.meta.get(ANCHORS_KEY, {}).items()}
        return compiled, [(slots[i], role) for i, role in spec], anchors

    # The states this graph makes a gradient for (an output that is None stays with nobody).
    present = [st for i, st in sorted(slots.items()) if isinstance(outputs[i], torch.fx.Node)]
    states = list({id(st): st for st in present}.values())
    record.backward_compiled = True
    return BackwardWithState(names, build, states, num_placeholders, record.variant_calls)


def _check_backward(outputs: list[Any], slots: dict[int, ParamState], num_inputs: int) -> str | None:
    """Why the backward's outputs do not line up with the forward's inputs, or None when they do."""
    if len(outputs) != num_inputs:
        return f"{len(outputs)} gradient outputs for {num_inputs} inputs"
    for i, st in slots.items():
        out = outputs[i]
        val = getattr(out, "meta", {}).get("val") if out is not None else None
        if val is None:
            continue
        if tuple(val.shape) != st.plan.shape or val.dtype != st.plan.dtype:
            return (
                f"output {i} is {tuple(val.shape)}/{val.dtype}, parameter {st.plan.name} is {st.plan.shape}"
            )
    return None


_BACKENDS: dict[tuple[LowRankConfig, str | None], LowRankBackend] = {}


def get_backend(config: LowRankConfig, mode: str | None = None) -> LowRankBackend:
    """The backend instance for `config` and `mode` (one per pair, so its records accumulate)."""
    key = (config, mode)
    be = _BACKENDS.get(key)
    if be is None:
        be = _BACKENDS[key] = LowRankBackend(config, mode)
    return be


def lowrank_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: dict[str, Any] | None = None,
    mode: str | None = None,
) -> Any:
    """The `lowrank` backend, as registered through the `torch_dynamo_backends` entry point."""
    try:
        config = parse_options(options)
    except LowRankOptionError as err:
        from lowrank_compile import _compat

        raise _compat.unwrapped_by_dynamo(err) from None
    return get_backend(config, mode)(gm, example_inputs)


def _before_ddp_split(fn: Any, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> None:
    """Plan a graph Dynamo's DDPOptimizer is about to split, when it is compiled with this backend.

    Planned here, the parameters' roles come from the whole graph (a piece boundary would look
    like a graph break), and the taken-over ones leave DDP's buckets (`_ddp_ignored`) before
    DDPOptimizer counts them, so the pieces follow only the parameters DDP still reduces.
    """
    target, kwargs = _compat_module().compile_wrapper_target(fn)
    if target is not lowrank_backend or torch._dynamo.config.compiled_autograd:
        return
    try:
        config = parse_options(kwargs.get("options"))
    except LowRankOptionError:
        return  # raised properly when the backend itself is called
    params: list[tuple[int, torch.Tensor]] = [
        (i, x) for i, x in enumerate(example_inputs) if isinstance(x, nn.Parameter)
    ]
    if params:
        get_backend(config, kwargs.get("mode"))._plan_graph(gm, params)


def _compat_module() -> Any:
    from lowrank_compile import _compat

    return _compat


def all_backends() -> list[LowRankBackend]:
    """Every backend instance created since the last reset (one per options/mode pair)."""
    return list(_BACKENDS.values())


def all_bindings() -> list[Any]:
    """Every live optimizer binding."""
    seen: dict[int, Any] = {}
    for st in list(state_mod._STATES.values()):
        if st.binding is not None:
            seen[id(st.binding)] = st.binding
    return list(seen.values())


def reset() -> None:
    """Forget every plan, unbind every optimizer and clear Dynamo's caches.

    Parameters keep their current values. Optimizer states owned by the backend are dropped.
    """
    from lowrank_compile.runtime import clip
    from lowrank_compile.runtime import dist
    from lowrank_compile.runtime import torch_hooks

    for b in all_bindings():
        b.uninstall()
    clip.uninstall()
    torch_hooks.uninstall()
    state_mod.registry_clear()
    dist.reset()
    _BACKENDS.clear()
    _warned.clear()
    torch._dynamo.reset()


# Importing this module is what torch.compile(backend="lowrank") does (the entry point), before
# any graph is compiled: the DDPOptimizer hook is in place for the first one.
_compat_module().before_ddp_split(_before_ddp_split)
