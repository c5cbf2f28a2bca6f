"""Step time of the whole training step, every contender interleaved in one process.

    python benchmarks/bench_step.py [--layers 6 --hidden 512 --intermediate 1376 --vocab 4096
                                     --heads 8 --batch 4 --seq 128 --steps 12] [--record]

The model is the step-time issue's LlamaForCausalLM (23M parameters by default), fp32. Contenders:
eager AdamW (foreach, torch's default), eager AdamW `fused=True`, torch.compile (Inductor) of the
whole step with AdamW, and the `lowrank` backend with its defaults (rank 1/4, 8-bit states),
`state_bits=32`, and `rank=None, state_bits=32`, and the first two with `clip_stats="always"`
(the backward that forms every projected gradient, as before the lean variant). Each gets a copy
of the same model and the same batches. All are built and compiled first (the "first step s"
column is the first call: trace and compile for the compiled ones, with whatever Inductor cache
the machine has; "steps 2-4 s" is the three warm-up steps, where the update and the backward
variants used after the first step compile), then the timed steps run round-robin, one step of
each contender per round, so a noisy neighbour slows all of them alike. The table shows medians,
and each contender's ratio to Inductor + AdamW in the same run.
`--cold` runs each compile with a fresh Inductor cache directory (first-compile comparison).
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from _results import record  # noqa: E402
from train_llama import batches  # noqa: E402
from train_llama import build_model  # noqa: E402
from train_llama import load_corpus  # noqa: E402

import lowrank_compile  # noqa: E402

CONTENDERS: dict[str, tuple[str | None, dict | None, dict]] = {
    # name: (backend, lowrank options, AdamW kwargs)
    "eager AdamW": (None, None, {}),
    "eager AdamW fused": (None, None, {"fused": True}),
    "Inductor + AdamW": ("inductor", None, {}),
    "lowrank defaults": ("lowrank", {}, {}),
    "lowrank state_bits=32": ("lowrank", {"state_bits": 32}, {}),
    "lowrank rank=None state_bits=32": ("lowrank", {"rank": None, "state_bits": 32}, {}),
    # The backward as it was before the lean variant: statistics for clip_grad_norm_ every step.
    "lowrank defaults clip_stats=always": ("lowrank", {"clip_stats": "always"}, {}),
    "lowrank state_bits=32 clip_stats=always": ("lowrank", {"state_bits": 32, "clip_stats": "always"}, {}),
}


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, backend: str | None, options: dict | None):
    """The causal-LM training step (forward, backward, step, zero_grad), compiled by `backend` if any."""

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    if backend == "inductor":
        return torch.compile(step, backend="inductor")
    if backend == "lowrank":
        return torch.compile(step, backend="lowrank", options=options)
    return step


def make_step(name: str, model: torch.nn.Module):
    backend, options, kw = CONTENDERS[name]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, **kw)
    return train_step(model, opt, backend, options), opt


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--only", default="", help="comma-separated contender names (default: all)")
    ap.add_argument("--cold", action="store_true", help="a fresh Inductor cache for each compile")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    names = [n for n in CONTENDERS if not args.only or n in args.only.split(",")]
    torch.manual_seed(0)
    train, _ = load_corpus(2_000_000)
    base = build_model(args.layers, args.hidden, args.seq, args.vocab, args.intermediate, args.heads)
    nparams = sum(p.numel() for p in base.parameters())
    data = list(zip(range(args.steps + 4), batches(train, args.batch, args.seq, 0)))
    runs = {}
    for name in names:
        if args.cold:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lowrank-bench-")
        step, opt = make_step(name, copy.deepcopy(base))
        t0 = time.perf_counter()
        step(data[0][1])
        first = time.perf_counter() - t0
        runs[name] = {"step": step, "opt": opt, "first": first, "warm": 0.0, "times": [], "loss": None}
    for i, ids in data[1:]:
        for name in names:
            r = runs[name]
            t0 = time.perf_counter()
            loss = r["step"](ids)
            dt = time.perf_counter() - t0
            if i > 3:  # three warm-up rounds (the lowrank update compiles at the first two steps)
                r["times"].append(dt)
            else:  # what compiles after the first step (update, later backward variants) shows here
                r["warm"] += dt
            r["loss"] = loss
    ref = runs.get("Inductor + AdamW")
    ref_ms = 1e3 * statistics.median(ref["times"]) if ref else None
    lines = [
        f"model: LlamaForCausalLM {nparams / 1e6:.1f}M params, {args.layers} layers, "
        f"hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}, {args.heads} heads; "
        f"batch {args.batch}x{args.seq}, fp32; medians of {args.steps - 3} steps, interleaved in one "
        f"process; threads {torch.get_num_threads()}",
        "",
        "| contender | step ms (median) | vs Inductor + AdamW | first step s | steps 2-4 s | opt-state MB "
        "| loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        r = runs[name]
        ms = 1e3 * statistics.median(r["times"])
        state = lowrank_compile.optimizer_state_bytes(r["opt"])["total"] / 1e6
        ratio = f"{ms / ref_ms:.2f}x" if ref_ms else "-"
        lines.append(
            f"| {name} | {ms:.0f} | {ratio} | {r['first']:.1f} | {r['warm']:.1f} | {state:.1f} "
            f"| {r['loss'].item():.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.record:
        record("bench_step.py", table)


if __name__ == "__main__":
    main()
