"""Training memory by category, planned on fake tensors: `estimate` (any config) and `explain`.

Categories (bytes):
- weights: every parameter;
- gradients: what lives across a step (eager: every `.grad`; lowrank: the low-rank accumulators
  and the clip residual sketch, full-size buffers of full-rank taken-over parameters and `.grad`
  of parameters left to torch.optim), plus `gradient_transient`: the largest single full
  gradient of a projected parameter (of any taken-over one under `update_in_backward`, which
  keeps no gradient buffer), alive only between the node that makes it and the one that
  consumes it;
- optimizer_states: as stored (8-bit states as codes plus per-block absmax);
- projectors: GaLore projection matrices (or DCT indices);
- buffers: the backend's other buffers (the clip sketch's test matrix, shared per size; the rule's
  R-shaped parameter is made inside the update's graph and stores nothing);
- activations: tensors autograd saves for backward (excluding parameters) in one forward, from a
  forward run under FakeTensorMode, so nothing is allocated. This is eager's count; Inductor's
  partitioner makes its own choice (it recomputes some tensors and may keep others, such as fp32
  upcasts, that eager frees), so a compiled run can hold more or less.

Nothing here imports triton or touches CUDA.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import torch

from lowrank_compile.config import LowRankConfig
from lowrank_compile.config import parse_options

__all__ = [
    "CATEGORIES",
    "MODELS",
    "MemoryEstimate",
    "estimate",
    "estimate_table",
    "explain",
    "llama_config",
    "saved_activation_bytes",
]

CATEGORIES = ("weights", "gradients", "optimizer_states", "projectors", "buffers", "activations")

# The LLaMA configurations of the GaLore paper (vocabulary 32000).
MODELS: dict[str, dict[str, int]] = {
    "llama-60m": {
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_attention_heads": 8,
        "num_hidden_layers": 8,
    },
    "llama-130m": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
    },
    "llama-350m": {
        "hidden_size": 1024,
        "intermediate_size": 2736,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
    },
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 5461,
        "num_attention_heads": 32,
        "num_hidden_layers": 24,
    },
    "llama-7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
    },
}


def llama_config(model: str | dict[str, Any]) -> dict[str, Any]:
    """LlamaConfig keyword arguments for a preset name, a CONFIG.json path, or a dict."""
    if isinstance(model, dict):
        cfg = dict(model)
    elif model in MODELS:
        cfg = dict(MODELS[model], vocab_size=32000, max_position_embeddings=1024)
    elif model.endswith(".json"):
        with open(model) as f:
            cfg = json.load(f)
    else:
        raise ValueError(f"unknown model {model!r}; accepted: {', '.join(MODELS)} or a CONFIG.json path")
    cfg.setdefault("num_key_value_heads", cfg.get("num_attention_heads"))
    cfg.setdefault("tie_word_embeddings", False)
    return cfg


@dataclass
class MemoryEstimate:
    """Bytes per category for one way of training."""

    method: str
    weights: int = 0
    gradients: int = 0
    gradient_transient: int = 0
    optimizer_states: int = 0
    projectors: int = 0
    buffers: int = 0
    activations: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Peak estimate: everything that lives across the step, plus the transient gradient."""
        return sum(getattr(self, c) for c in CATEGORIES) + self.gradient_transient

    def as_dict(self) -> dict[str, Any]:
        """Plain data, with the total."""
        d = {c: getattr(self, c) for c in CATEGORIES}
        d.update(method=self.method, gradient_transient=self.gradient_transient, total=self.total)
        return d


def saved_activation_bytes(
    model: torch.nn.Module,
    run: Callable[[torch.nn.Module], Any],
    params: Sequence[torch.Tensor] | None = None,
) -> int:
    """Bytes of the distinct storages autograd saves for backward while `run(model)` executes.

    Parameters (and views of them) are not activations and are not counted. Works on real and on
    fake tensors.
    """
    skip = {p.untyped_storage()._cdata for p in (params if params is not None else model.parameters())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s._cdata not in skip:
            seen[s._cdata] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(model)
    return sum(seen.values())


def _roles(model: torch.nn.Module) -> dict[str, str]:
    """Parameter roles from module types (the backend reads them from the graph instead)."""
    getter: Any = getattr(model, "get_output_embeddings", None)
    out_emb = getter() if callable(getter) else None
    roles: dict[str, str] = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            if isinstance(mod, torch.nn.Embedding):
                roles[name] = "embedding"
            elif mod is out_emb:
                roles.setdefault(name, "output")
            elif isinstance(mod, torch.nn.Linear) and pname == "weight":
                roles[name] = "matmul"
            else:
                roles.setdefault(name, "other")
    return roles


def _state8(numel: int) -> int:
    from lowrank_compile.plan import _state_bytes

    return _state_bytes(numel, 4, 8)


def estimate(
    model: str | dict[str, Any] = "llama-60m",
    *,
    batch: int = 1,
    seq: int = 256,
    options: dict[str, Any] | None = None,
    dtype: str = "fp32",
) -> list[MemoryEstimate]:
    """Memory of training a LLaMA model (preset, CONFIG.json or dict) with AdamW, per method.

    Methods: eager AdamW fp32; eager AdamW bf16 (weights, gradients and states in bf16); 8-bit
    AdamW (fp32 weights, 8-bit states); GaLore (galore_torch's GaLoreAdamW: full gradients kept,
    projected states); then, with weights in `dtype` ("fp32" or "bf16"), the methods as their
    papers count memory: GaLore with per-layer updates (gradients freed layer by layer, states
    and projectors in the weights' dtype), Q-GaLore (INT8 weights with a scale per 256 values,
    INT4 projectors, 8-bit states, per-layer updates) and APOLLO (rank-r projected moments in
    fp32, a seeded random projection that is not stored, per-layer updates); and lowrank with
    `options` (default options when None), its weights in `dtype`. The model is built and run
    under FakeTensorMode: nothing is allocated.
    """
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"estimate: dtype must be 'fp32' or 'bf16', got {dtype!r}")
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM

    from lowrank_compile.plan import Kind
    from lowrank_compile.plan import ParamInfo
    from lowrank_compile.plan import make_plan

    config = parse_options(options or {})
    kwargs = llama_config(model)
    cfg = LlamaConfig(**kwargs)
    cfg._attn_implementation = "eager"
    acts: dict[torch.dtype, int] = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        net = LlamaForCausalLM(cfg)
        ids = torch.zeros(batch, seq, dtype=torch.long)

        def fwd(m: torch.nn.Module) -> Any:
            return m(input_ids=ids, labels=ids).loss

        acts[torch.float32] = saved_activation_bytes(net, fwd)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # Module.to() cannot swap fake parameters
        try:
            net_bf16 = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(default)
        acts[torch.bfloat16] = saved_activation_bytes(net_bf16, fwd)
        # The plan (state and projector bytes) of lowrank's own row is made on weights in `dtype`.
        named = list((net_bf16 if dtype == "bf16" else net).named_parameters())
        opt = torch.optim.AdamW([p for _, p in named])
        roles = _roles(net)
        plan = make_plan([ParamInfo(n, p, [(opt, 0)], roles.get(n, "other")) for n, p in named], config)
    numels = [p.numel() for _, p in named]
    n = sum(numels)
    rows = []
    rows.append(
        MemoryEstimate(
            "eager AdamW fp32", 4 * n, 4 * n, 0, 8 * n + 4 * len(numels), activations=acts[torch.float32]
        )
    )
    rows.append(
        MemoryEstimate(
            "eager AdamW bf16", 2 * n, 2 * n, 0, 4 * n + 4 * len(numels), activations=acts[torch.bfloat16]
        )
    )
    rows.append(
        MemoryEstimate(
            "8-bit AdamW",
            4 * n,
            4 * n,
            0,
            sum(2 * _state8(k) for k in numels),
            activations=acts[torch.float32],
        )
    )
    galore = MemoryEstimate("GaLore (galore_torch)", 4 * n, 4 * n, activations=acts[torch.float32])
    elt = 2 if dtype == "bf16" else 4  # bytes per weight value in the rows below
    act = acts[torch.bfloat16 if dtype == "bf16" else torch.float32]
    tag = f", {dtype} weights"
    layer = MemoryEstimate(f"GaLore per-layer (paper){tag}", elt * n, activations=act)
    qgalore = MemoryEstimate(f"Q-GaLore (paper), INT8 weights{tag[:-8]}", activations=act)
    apollo = MemoryEstimate(f"APOLLO (paper){tag}", elt * n, activations=act)
    scratch: set[tuple[Any, ...]] = set()  # shared buffers: one per R shape, one test matrix per kept size
    lowrank = MemoryEstimate(f"lowrank {_describe(config)}{tag}", elt * n, activations=act)
    up = config.update_in_backward
    from lowrank_compile import projectors

    keeps_r = projectors.get(config.projector).refresh_from == "sketch"
    for pp in plan.params:
        numel = pp.numel
        for row in (layer, qgalore, apollo):  # per-layer updates: one layer's gradient at a time
            row.gradient_transient = max(row.gradient_transient, elt * numel)
        # Q-GaLore's INT8 weights: one byte per value plus an fp32 scale per group of 256.
        qgalore.weights += numel + 4 * -(-numel // 256)
        if pp.kind is Kind.PROJECTED and pp.rank is not None and pp.side is not None:
            m, k = pp.shape
            kept, reduced = (k, m) if pp.side == "left" else (m, k)
            galore.optimizer_states += 8 * pp.rank * kept + 4
            galore.projectors += 4 * pp.rank * reduced
            layer.optimizer_states += 2 * elt * pp.rank * kept
            layer.projectors += elt * pp.rank * reduced
            qgalore.optimizer_states += 2 * _state8(pp.rank * kept)
            qgalore.projectors += pp.rank * reduced // 2 + 8 * -(-pp.rank * reduced // 256)
            apollo.optimizer_states += 8 * pp.rank * kept  # fp32 moments of the projected gradient
            lowrank.gradients += 8  # sum(G^2), max|G|
            if not up or keeps_r:  # a sketch-refreshed projector keeps R (the sketch's warm start)
                lowrank.gradients += 4 * pp.rank * kept  # the R accumulator
            lowrank.gradient_transient = max(lowrank.gradient_transient, elt * numel)
            if config.reads_full_gradient and not up:  # Fira/FRUGAL/APOLLO read G at opt.step()
                lowrank.gradients += elt * numel
            if ("carrier",) not in scratch:  # the rule's parameter's shape carrier: one fp32 element
                scratch.add(("carrier",))
                lowrank.buffers += 4
            if config.clip_sketch and config.grad_accumulation == "projected" and not up:
                ck = config.clip_sketch  # the clip residual sketch (runtime/clip.py)
                lowrank.gradients += 4 * ck * reduced + 4 * ck + 4  # Y, per-column sums, sum ||P^T A||^2
                if ("omega", kept) not in scratch:  # its +-1 test matrix, one per kept size
                    scratch.add(("omega", kept))
                    lowrank.buffers += elt * ck * kept
        else:
            galore.optimizer_states += 8 * numel + 4
            layer.optimizer_states += 2 * elt * numel
            qgalore.optimizer_states += 2 * _state8(numel)
            apollo.optimizer_states += 8 * numel
            if up and pp.kind is Kind.FULL:  # updated inside the backward: its gradient is transient
                lowrank.gradient_transient = max(lowrank.gradient_transient, elt * numel)
            else:
                lowrank.gradients += elt * numel  # full-size buffer (FULL) or .grad (left to torch.optim)
        lowrank.optimizer_states += pp.state_bytes
        lowrank.projectors += pp.projector_bytes
    rows += [galore, layer, qgalore, apollo, lowrank]
    return rows


def _describe(config: LowRankConfig) -> str:
    rank = "none" if config.rank is None else config.rank
    proj = "" if config.projector == "svd" else f", {config.projector}"
    if config.projector_bits != 32:
        proj += f", {config.projector_bits}-bit projectors"
    if config.update_in_backward:
        proj += ", update in backward"
    method = "" if config.method == "galore" else f"{config.method}, "
    return f"({method}rank {rank}, {config.state_bits}-bit{proj})"


def estimate_table(rows: Sequence[MemoryEstimate], title: str = "") -> str:
    """A Markdown table in GiB (MiB below 1 GiB), one row per method."""

    def fmt(b: int) -> str:
        return f"{b / 2**30:.2f}G" if b >= 2**30 else f"{b / 2**20:.1f}M"

    head = ["method", *CATEGORIES, "grad transient", "total"]
    lines = ([title, ""] if title else []) + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = (
            [r.method] + [fmt(getattr(r, c)) for c in CATEGORIES] + [fmt(r.gradient_transient), fmt(r.total)]
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def explain(
    model: torch.nn.Module | None = None, run: Callable[[torch.nn.Module], Any] | None = None
) -> MemoryEstimate:
    """The backend's memory plan now, by category (bytes), for every parameter it has planned.

    Counts what the backend actually holds for the parameters it took over (states, projectors,
    gradient buffers, other buffers) and `.grad`-sized gradients for those it left to torch.optim.
    With `model` and `run` (a function that runs the model's forward and returns the loss), the
    activations are measured on fake copies of the inputs: `run` is executed under
    FakeTensorMode, so nothing is allocated.
    """
    from lowrank_compile.plan import Kind
    from lowrank_compile.runtime.state import lookup
    from lowrank_compile.runtime.state import registry_items

    est = MemoryEstimate("lowrank (as planned)")
    for p, pp in registry_items():
        est.weights += p.numel() * p.element_size()
        st = lookup(p)
        if pp.kind is Kind.TORCH or st is None:
            if p.requires_grad:
                est.gradients += p.numel() * p.element_size()
            est.optimizer_states += pp.state_bytes
            continue
        owned = st.owned_bytes()
        est.gradients += owned["gradients"] if st.proj is None else owned["gradients"] - _nbytes(st.proj.full)
        if st.proj is not None and st.config.reads_full_gradient and not st.config.update_in_backward:
            est.gradients += math.prod(pp.shape) * p.element_size()  # G, kept from backward to opt.step()
        est.projectors += owned["projectors"]
        est.optimizer_states += pp.state_bytes
        if st.proj is not None or st.config.update_in_backward:
            est.gradient_transient = max(est.gradient_transient, math.prod(pp.shape) * p.element_size())
    from lowrank_compile.runtime.state import scratch_bytes

    est.buffers = scratch_bytes()
    if model is not None and run is not None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            params = {n: mode.from_tensor(t) for n, t in model.named_parameters()}
            bufs = {n: mode.from_tensor(t) for n, t in model.named_buffers()}

            def fake_run(m: torch.nn.Module) -> Any:
                with torch.nn.utils.stateless._reparametrize_module(m, {**params, **bufs}):
                    return run(m)

            est.activations = saved_activation_bytes(model, fake_run, list(params.values()))
    return est


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()
