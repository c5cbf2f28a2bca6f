"""Step time under schedulers that change betas, momentum or weight decay every step.

    python benchmarks/bench_schedules.py [--hidden 128 --layers 2 --seq 64 --batch 4 --steps 20 --record]

A small HF Llama (vocab 256), the step compiled with the lowrank defaults, one model per
contender, the contenders' steps interleaved in one process (this machine is shared and noisy):

- AdamW, constant lr (the reference);
- AdamW + OneCycleLR (max_lr 3e-3; cycle_momentum cycles betas[0] every step);
- AdamW + a per-step cosine weight-decay schedule (0.1 -> 0.01);
- SGD (momentum 0.9) + CyclicLR (cycle_momentum cycles the momentum every step).

Reported: the median step time of steps after the first two (compilation), its ratio to the
constant run, and the frames Dynamo compiled after warm-up (0 = no recompiles).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time

import torch
from torch._dynamo.utils import counters

# examples/train_llama.build_model, here and in spawned workers (they re-import this module).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    from train_llama import build_model

    torch.manual_seed(0)
    base = build_model(
        a.layers, a.hidden, a.seq, intermediate=2 * a.hidden, heads=4, kv_heads=2, attn="eager"
    )
    total = a.steps + 2

    def wd_schedule(opt):
        class WD:
            t = 0

            def step(self):
                self.t += 1
                for g in opt.param_groups:
                    g["weight_decay"] = 0.01 + 0.045 * (1 + math.cos(math.pi * self.t / total))

        return WD()

    contenders = {
        "AdamW, constant lr": (lambda ps: torch.optim.AdamW(ps, lr=1e-3), None),
        "AdamW + OneCycleLR (betas cycled)": (
            lambda ps: torch.optim.AdamW(ps, lr=1e-3),
            lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=3e-3, total_steps=total + 1),
        ),
        "AdamW + weight-decay schedule": (
            lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1),
            wd_schedule,
        ),
        "SGD + CyclicLR (momentum cycled)": (
            lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
            lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=4),
        ),
    }
    runs = {}
    for name, (make_opt, make_sched) in contenders.items():
        model = copy.deepcopy(base)
        opt = make_opt(model.parameters())
        sched = make_sched(opt) if make_sched else None

        def step(ids, model=model, opt=opt):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()

        runs[name] = (torch.compile(step, backend="lowrank"), sched, [], [])
    gen = torch.Generator().manual_seed(1)
    for i in range(total):
        ids = torch.randint(0, 256, (a.batch, a.seq), generator=gen)
        for fn, sched, times, frames in runs.values():
            before = counters["frames"]["total"]
            t0 = time.perf_counter()
            fn(ids)
            if sched is not None:
                sched.step()
            dt = time.perf_counter() - t0
            if i >= 2:
                times.append(dt)
                frames.append(counters["frames"]["total"] - before)
    ref = statistics.median(next(iter(runs.values()))[2])
    lines = [
        f"HF Llama hidden {a.hidden}, {a.layers} layers, vocab 256, batch {a.batch} x {a.seq}; "
        f"lowrank defaults; median of {a.steps} steps after 2 warm-up steps, contenders interleaved",
        "",
        "| contender | step ms (median) | vs constant | frames compiled after warm-up |",
        "|---|---|---|---|",
    ]
    for name, (_, _, times, frames) in runs.items():
        t = statistics.median(times)
        lines.append(f"| {name} | {t * 1e3:.1f} | {t / ref:.2f}x | {sum(frames)} |")
    table = "\n".join(lines)
    print(table)
    if a.record:
        sys.path.insert(0, os.path.dirname(__file__))
        from _results import record

        record("bench_schedules.py", table)


if __name__ == "__main__":
    main()
