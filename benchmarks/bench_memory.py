"""Peak memory, step time and optimizer-state bytes of every contender, side by side in one run.

    python benchmarks/bench_memory.py [--layers 8 --hidden 512 --seq 128 --batch 2 --steps 10 --record]
        [--vocab 256 --intermediate N --heads N] [--only CONTENDER ...]

The demo's LLaMA-style model (default: 8 layers, hidden 512, 25.6M parameters), the same seed,
batches and lr for every contender:

- the floor: weights plus an Inductor-compiled forward and backward whose gradients are dropped
  by hooks the moment they exist, no optimizer at all (what any method needs); "above floor" is
  a contender's peak minus the floor's;
- eager AdamW; torch.compile (Inductor) of the whole step with AdamW (foreach; fused is CUDA-only);
- galore_torch's GaLoreAdamW, and its per-layer variant (one optimizer per parameter, stepped
  from a post-accumulate-grad hook, so gradients are freed layer by layer);
- torchao.optim.AdamW8bit; bitsandbytes AdamW8bit;
- lowrank with 32-bit and with 8-bit (default) states, and 8-bit with the seeded projectors
  (`projector="sparse"`, `"gaussian"`: nothing stored) or with `projector_bits=4`, and 8-bit with
  `update_in_backward=True` (each parameter updated inside the backward, no gradient buffers);
- eager AdamW and lowrank 8-bit with activation checkpointing (transformers' default);
- lowrank 8-bit with clip_grad_norm_(1.0), without and with 4 micro-batches of gradient
  accumulation (the same micro-batch, so the same activations): the clip norm under accumulation
  comes from the projected buffers and the residual sketch, with no full-size gradient buffer.

GaLore and lowrank project the same matrices (attention and MLP weights) at rank 1/4 of the short
side with scale 0.25 and a refresh every 200 steps.

Peak memory (CPU): the profiler's allocation events from before the model is built through step
`--steps`, summed in time order, give the bytes live at every moment; a step's peak is the
largest value inside it. This is everything the CPU allocator hands out: weights, gradients,
optimizer states, projectors, activations and temporaries. Step time is measured afterwards,
without the profiler: the median of `--steps` more steps. "first step s" includes compilation.
Optimizer-state bytes count every tensor an optimizer holds (8-bit states at stored size,
GaLore's projectors excluded and reported separately, as lowrank's are).
"""

from __future__ import annotations

import argparse
import gc
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile
from torch.profiler import record_function

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from _results import record  # noqa: E402
from train_llama import batches  # noqa: E402
from train_llama import build_model  # noqa: E402
from train_llama import load_corpus  # noqa: E402

import lowrank_compile  # noqa: E402

CONTENDERS = [
    "floor",
    "eager AdamW",
    "inductor AdamW",
    "galore_torch",
    "galore_torch per-layer",
    "torchao AdamW8bit",
    "bnb AdamW8bit",
    "lowrank 32-bit",
    "lowrank 8-bit",
    "lowrank 8-bit sparse",
    "lowrank 8-bit gaussian",
    "lowrank 8-bit 4-bit projectors",
    "lowrank 8-bit in backward",
    "lowrank 8-bit sparse in backward",
    "eager AdamW + activation checkpointing",
    "lowrank 8-bit + activation checkpointing",
    "lowrank 8-bit + clipping",
    "lowrank 8-bit + accumulation 4 + clipping",
]
CKPT = " + activation checkpointing"
CLIP = " + clipping"
ACCUM = " + accumulation 4"
LR, GAP, SCALE = 1e-3, 200, 0.25


def projected_names(model: torch.nn.Module) -> list[str]:
    """The matrices GaLore's own scripts project: attention and MLP weights."""
    return [n for n, p in model.named_parameters() if p.dim() == 2 and ("self_attn" in n or "mlp" in n)]


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Plain tensors inside an optimizer-state value (tensor subclasses flattened)."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return [t for n in names for t in _tensors(getattr(obj, n))]
        return [obj]
    return []  # step counts, galore_torch's projector object (counted apart), ...


def _galore_projector_bytes(opts: list[torch.optim.Optimizer]) -> int:
    total = 0
    for opt in opts:
        for st in opt.state.values():
            proj = st.get("projector")
            m = getattr(proj, "ortho_matrix", None)
            if isinstance(m, torch.Tensor):
                total += m.numel() * m.element_size()
    return total


def state_bytes(opts: list[torch.optim.Optimizer]) -> tuple[int, int]:
    """(optimizer-state bytes, projector bytes) over `opts`."""
    total = 0
    for opt in opts:
        for st in opt.state.values():
            for v in st.values():
                total += sum(t.numel() * t.element_size() for t in _tensors(v))
    proj = _galore_projector_bytes(opts)
    for opt in opts:
        b = lowrank_compile.optimizer_state_bytes(opt)
        total += b["backend"]
        proj += b["projectors"]
    return total, proj


def make_contender(name: str, model: torch.nn.Module) -> tuple[Callable[[torch.Tensor], Any], list[Any]]:
    """The training step of contender `name` on `model`, and the optimizers it uses.

    "... + activation checkpointing": transformers' `gradient_checkpointing_enable()` (its default,
    reentrant) on the model, then the contender as without it.
    """
    if name.endswith(CKPT):
        model.train()
        model.gradient_checkpointing_enable()
        # transformers >= 5.25 wraps attention in the `kernels` context variable; without this
        # Dynamo runs each checkpointed decoder layer eagerly (and the backend says so).
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
        name = name[: -len(CKPT)]
    clip = name.endswith(CLIP)
    name = name.removesuffix(CLIP)
    accum = 4 if name.endswith(ACCUM) else 1
    name = name.removesuffix(ACCUM)
    proj = set(projected_names(model))
    params = dict(model.named_parameters())
    # One rank for the group: 1/4 of the hidden size, the short side of every projected matrix.
    rank = model.config.hidden_size // 4
    galore_groups = [
        {"params": [p for n, p in params.items() if n not in proj]},
        {
            "params": [p for n, p in params.items() if n in proj],
            "rank": rank,
            "update_proj_gap": GAP,
            "scale": SCALE,
            "proj_type": "std",
        },
    ]
    if name == "floor":
        # No optimizer: each gradient is dropped the moment autograd has accumulated it.
        for p in params.values():
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))

        def fwd_bwd(ids: torch.Tensor) -> torch.Tensor:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss.detach()

        return torch.compile(fwd_bwd), []
    if name == "galore_torch per-layer":
        from galore_torch import GaLoreAdamW

        opts: dict[torch.Tensor, Any] = {}
        for n, p in params.items():
            group = {"params": [p]}
            if n in proj:
                group.update(rank=rank, update_proj_gap=GAP, scale=SCALE, proj_type="std")
            opts[p] = GaLoreAdamW([group], lr=LR, weight_decay=0.0)

        def hook(p: torch.Tensor) -> None:
            opts[p].step()
            opts[p].zero_grad()

        for p in params.values():
            p.register_post_accumulate_grad_hook(hook)

        def layer_step(ids: torch.Tensor) -> torch.Tensor:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss.detach()

        return layer_step, list(opts.values())
    if name == "galore_torch":
        from galore_torch import GaLoreAdamW

        opt: Any = GaLoreAdamW(galore_groups, lr=LR, weight_decay=0.0)
    elif name == "torchao AdamW8bit":
        from torchao.optim import AdamW8bit

        opt = AdamW8bit(model.parameters(), lr=LR, weight_decay=0.0)
    elif name == "bnb AdamW8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(model.parameters(), lr=LR, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)

    def step(ids: torch.Tensor) -> torch.Tensor:
        if accum == 1:
            # No loop: a graph break inside a loop makes Dynamo compile the model's forward as a
            # frame of its own, whose outputs (logits, the KV cache) then get zero-filled
            # gradients in the backward (21 MB here) that the floor's step does not have.
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        for _ in range(accum if accum > 1 else 0):  # the same micro-batch size, so the same activations
            loss = model(input_ids=ids, labels=ids).loss / accum
            loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return loss.detach() * accum

    if name == "inductor AdamW":
        return torch.compile(step), [opt]
    if name.startswith("lowrank"):
        bits = 32 if "32" in name else 8
        options = {"rank": 0.25, "scale": SCALE, "update_gap": GAP, "state_bits": bits}
        for projector in ("sparse", "gaussian"):
            if f" {projector}" in name:
                options["projector"] = projector
        if name.endswith(" in backward"):
            options["update_in_backward"] = True
        if name.endswith(" 4-bit projectors"):
            options["projector_bits"] = 4
        return torch.compile(step, backend="lowrank", options=options), [opt]
    return step, [opt]


def step_peaks(prof: Any, steps: int) -> list[int]:
    """Peak live bytes inside each `step_i` range, from the profiler's allocation events."""
    from lowrank_compile._compat import allocation_events

    events = prof.profiler.kineto_results.events()
    mem = allocation_events(prof)
    spans = {}
    for e in events:
        if e.name().startswith("bench_step_"):
            spans[int(e.name().rsplit("_", 1)[1])] = (e.start_ns(), e.start_ns() + e.duration_ns())
    peaks = [0] * steps
    live = 0
    for t, b in mem:
        live += b
        for i, (a, z) in spans.items():
            if a <= t <= z and live > peaks[i]:
                peaks[i] = live
    return peaks


def run(name: str, args: argparse.Namespace, data: torch.Tensor) -> dict[str, Any]:
    torch._dynamo.reset()
    lowrank_compile.reset()
    gc.collect()
    it = batches(data, args.batch, args.seq, 0)
    ids = [next(it) for _ in range(2 * args.steps)]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(0)
        model = build_model(
            args.layers, args.hidden, args.seq, args.vocab, args.intermediate, args.heads, args.heads
        )
        step, opts = make_contender(name, model)
        t0 = time.perf_counter()
        for i in range(args.steps):
            with record_function(f"bench_step_{i}"):
                loss = step(ids[i])
            if i == 0:
                first = time.perf_counter() - t0
    peaks = step_peaks(prof, args.steps)
    del prof
    times = []
    for i in range(args.steps, 2 * args.steps):
        t0 = time.perf_counter()
        loss = step(ids[i])
        times.append(time.perf_counter() - t0)
    states, projectors = state_bytes(opts)
    nparams = sum(p.numel() for p in model.parameters())
    return {
        "name": name,
        "ms": 1e3 * statistics.median(times),
        "first": first,
        "peak_first": peaks[0],
        "peak_last": peaks[-1],
        "state": states,
        "proj": projectors,
        "loss": float(loss),
        "params": nparams,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=None, help="MLP width (default 8/3 x hidden)")
    ap.add_argument("--heads", type=int, default=None, help="attention heads (default hidden / 32)")
    ap.add_argument("--steps", type=int, default=10, help="profiled steps, then as many timed steps")
    ap.add_argument("--only", nargs="*", default=None, help="run only these contenders")
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    train, _ = load_corpus(4_000_000)
    rows = []
    for name in args.only or CONTENDERS:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.append(run(name, args, train))
    eager = next((r for r in rows if r["name"] == "eager AdamW"), rows[0])
    floor = next((r for r in rows if r["name"] == "floor"), None)
    mb = 2**20

    def above(r: dict[str, Any]) -> str:
        """Peak above the floor's (MB), and as a fraction of eager AdamW's."""
        if floor is None:
            return "- | -"
        a, e = r["peak_last"] - floor["peak_last"], eager["peak_last"] - floor["peak_last"]
        return f"{a / mb:.1f} | {a / e:.2f}x" if e > 0 else f"{a / mb:.1f} | -"

    lines = [
        f"model: LlamaForCausalLM {rows[0]['params'] / 1e6:.1f}M params, {args.layers} layers, hidden "
        f"{args.hidden}, batch {args.batch}x{args.seq}; peaks over steps 1..{args.steps} (profiled), "
        f"step time = median of {args.steps} unprofiled steps after them",
        "",
        "| contender | step ms | vs eager | first step s | peak MB step 1 | peak MB step "
        f"{args.steps} | peak vs eager | above floor MB | vs eager above floor | "
        f"step 1 / step {args.steps} | opt-state MB | projectors MB | loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['ms']:.0f} | {r['ms'] / eager['ms']:.2f}x | {r['first']:.1f} | "
            f"{r['peak_first'] / mb:.1f} | {r['peak_last'] / mb:.1f} | "
            f"{r['peak_last'] / eager['peak_last']:.0%} | {above(r)} | "
            f"{r['peak_first'] / r['peak_last']:.3f} | "
            f"{r['state'] / mb:.2f} | {r['proj'] / mb:.2f} | {r['loss']:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.record:
        record("bench_memory.py", table)
    return rows


if __name__ == "__main__":
    main()
