"""Soak: thousands of compiled steps; memory must stay flat and nothing may recompile after warm-up.

    python benchmarks/soak.py [--steps 2000 --every 100 --record]

The demo's LLaMA-style model (small), trained with the backend's defaults (rank 1/4, 8-bit
states) plus the things a real loop does every step: a cosine LR schedule, gradient clipping,
and a projector refresh every 50 steps (so ~40 refreshes happen in 2000 steps). Every
`--every` steps it samples:
- RSS of the process (MB, from /proc/self/statm);
- bytes held by the backend: optimizer states, projectors and gradient buffers;
- Dynamo's graph count and the backend's compiled-graph count.
Prints one table; `--record` appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from _results import record  # noqa: E402
from train_llama import batches  # noqa: E402
from train_llama import build_model  # noqa: E402
from train_llama import load_corpus  # noqa: E402

import lowrank_compile  # noqa: E402

OPTIONS = {"update_gap": 50}  # defaults otherwise: rank 0.25, 8-bit states, svd


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def backend_bytes(opt: torch.optim.Optimizer) -> int:
    from lowrank_compile.runtime.binding import binding_of

    b = binding_of(opt)
    if b is None:
        return 0
    from lowrank_compile.runtime.state import scratch_bytes

    held = b.state_bytes() + scratch_bytes()
    for st in b.states:
        held += sum(st.owned_bytes().values())
    return held


def graph_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    from lowrank_compile.backend import all_backends

    return int(counters["stats"]["unique_graphs"]), sum(len(b.graphs) for b in all_backends())


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    train, _ = load_corpus(1_000_000)
    model = build_model(args.layers, args.hidden, args.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        return loss.detach()

    cstep = torch.compile(step, backend="lowrank", options=OPTIONS)
    it = batches(train, args.batch, args.seq, 0)
    rows = []
    t0 = time.perf_counter()
    last = t0
    for i in range(1, args.steps + 1):
        loss = cstep(next(it))
        if i == 1 or i % args.every == 0:
            now = time.perf_counter()
            dynamo, ours = graph_counts()
            rows.append((i, loss.item(), rss_mb(), backend_bytes(opt) / 2**20, dynamo, ours, now - last))
            last = now
    warm = next(r for r in rows if r[0] >= min(200, args.steps))
    final = rows[-1]
    n = sum(p.numel() for p in model.parameters())
    lines = [
        f"model: LlamaForCausalLM {n / 1e6:.2f}M params, {args.layers} layers, hidden {args.hidden}, "
        f"batch {args.batch}x{args.seq}; options {OPTIONS} (defaults otherwise), cosine LR, clip 1.0",
        "",
        "| step | loss | RSS MB | backend MB | Dynamo graphs | lowrank graphs | s since last row |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {s} | {lo:.3f} | {r:.1f} | {b:.2f} | {d} | {g} | {dt:.1f} |" for s, lo, r, b, d, g, dt in rows
    ]
    lines += [
        "",
        f"after warm-up (step {warm[0]} -> {final[0]}): RSS {final[2] - warm[2]:+.1f} MB, backend "
        f"{final[3] - warm[3]:+.2f} MB, Dynamo graphs +{final[4] - warm[4]}, lowrank graphs "
        f"+{final[5] - warm[5]}; total {time.perf_counter() - t0:.0f} s",
    ]
    table = "\n".join(lines)
    print(table)
    if args.record:
        record("soak.py", table)
    lowrank_compile.reset()
    return table


if __name__ == "__main__":
    main()
