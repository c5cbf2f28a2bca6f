"""Step time and optimizer-state bytes, all contenders in one run, on the demo's LLaMA-style model.

    python benchmarks/bench_step.py [--layers 4 --hidden 256 --seq 128 --batch 8 --steps 30]

Contenders: eager AdamW; torch.compile (Inductor) of the whole step with AdamW; lowrank with
rank=None and 32-bit states. Each gets a fresh copy of the same model and the same batches.
Step time is the median of the timed steps after 3 warm-up steps; "first step" includes compilation.
Optimizer-state bytes count every tensor in opt.state, plus the backend's own states for lowrank.
Prints one Markdown table; `--record` appends it to benchmarks/RESULTS.md with device and date.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from _results import record  # noqa: E402
from train_llama import batches  # noqa: E402
from train_llama import build_model  # noqa: E402
from train_llama import load_corpus  # noqa: E402

import lowrank_compile  # noqa: E402


def run(name, model, data, args):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    if name == "inductor":
        step = torch.compile(step, backend="inductor")
    elif name.startswith("lowrank"):
        step = torch.compile(step, backend="lowrank", options={"rank": None, "state_bits": 32})
    it = batches(data, args.batch, args.seq, 0)
    times = []
    t0 = time.perf_counter()
    loss = step(next(it))
    first = time.perf_counter() - t0
    for i in range(args.steps + 3):
        ids = next(it)
        t0 = time.perf_counter()
        loss = step(ids)
        dt = time.perf_counter() - t0
        if i >= 3:
            times.append(dt)
    state = lowrank_compile.optimizer_state_bytes(opt)["total"]
    return {
        "contender": name,
        "step_ms": 1e3 * statistics.median(times),
        "first_s": first,
        "state_MB": state / 1e6,
        "loss": loss.item(),
    }


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    train, _ = load_corpus(2_000_000)
    base = build_model(args.layers, args.hidden, args.seq)
    n = sum(p.numel() for p in base.parameters())
    rows = [run(name, copy.deepcopy(base), train, args) for name in ("eager", "inductor", "lowrank")]
    eager = rows[0]
    lines = [
        f"model: LlamaForCausalLM {n / 1e6:.2f}M params, {args.layers} layers, hidden {args.hidden}, "
        f"batch {args.batch}x{args.seq}; {args.steps} timed steps",
        "",
        "| contender | step ms (median) | vs eager | first step s | opt-state MB | loss |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['contender']} | {r['step_ms']:.1f} | {r['step_ms'] / eager['step_ms']:.2f}x | "
            f"{r['first_s']:.1f} | {r['state_MB']:.2f} | {r['loss']:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.record:
        record("bench_step.py", table)


if __name__ == "__main__":
    main()
