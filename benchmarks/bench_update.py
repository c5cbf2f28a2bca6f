"""The optimizer update alone: lowrank (fp32 and 8-bit states) vs torch, torchao and bitsandbytes.

    python benchmarks/bench_update.py [--sizes 1024x1024,4096x1024] [--repeat 10] [--record]

For one parameter of each size, with its gradient in place, every contender runs `opt.step()`
`--repeat` times after 3 warm-up steps; the table shows the median. Bandwidth is the bytes an
ideal implementation must move per element (read p, g, states; write p, states: fp32 AdamW 28 B,
8-bit AdamW 16 B + absmax), divided by the time. It is reported beside the machine's copy
bandwidth, measured with `copy_` on the same size (8 B per fp32 element).
Contenders: eager AdamW (foreach off / on); torch.compile (Inductor) of AdamW.step; lowrank
(rank=None) with 32-bit and 8-bit states; lowrank 8-bit on a gradient whose every other row is
zero (an embedding's pattern: the 8-bit settle rule runs, which a gradient without zeros skips);
torchao AdamW8bit; bitsandbytes AdamW8bit.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from _results import record

import lowrank_compile


def _median_time(fn, repeat):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def contender(name, shape):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape) * 0.1)
    g = torch.randn(shape) * 0.01
    if "zero rows" in name:
        g[::2] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "torchao AdamW8bit":
            from torchao.optim import AdamW8bit

            opt = AdamW8bit([p], lr=1e-3)
        elif name == "bitsandbytes AdamW8bit":
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        else:
            opt = torch.optim.AdamW([p], lr=1e-3, foreach=(name == "eager AdamW foreach"))
    if name.startswith("lowrank"):
        lowrank_compile.reset()
        bits = 8 if "8-bit" in name else 32
        fwbw = torch.compile(
            lambda: (p * g).sum().backward(), backend="lowrank", options={"rank": None, "state_bits": bits}
        )
        fwbw()  # the gradient is now in the backend's buffer; step() re-applies it each call
        return lambda: opt.step()
    p.grad = g
    if name == "torch.compile AdamW":
        step = torch.compile(opt.step, backend="inductor")
        return lambda: step()
    return lambda: opt.step()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1024x1024,4096x1024")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    names = [
        "eager AdamW",
        "eager AdamW foreach",
        "torch.compile AdamW",
        "lowrank 32-bit",
        "lowrank 8-bit",
        "lowrank 8-bit, zero rows",
        "torchao AdamW8bit",
        "bitsandbytes AdamW8bit",
    ]
    lines = [
        "| size | contender | update ms (median) | effective GB/s | copy GB/s |",
        "|---|---|---|---|---|",
    ]
    for spec in args.sizes.split(","):
        shape = tuple(int(v) for v in spec.split("x"))
        n = shape[0] * shape[1]
        x = torch.randn(n)
        y = torch.empty_like(x)
        copy_s = _median_time(lambda x=x, y=y: y.copy_(x), args.repeat)
        copy_bw = 8 * n / copy_s / 1e9
        for name in names:
            fn = contender(name, shape)
            t = _median_time(fn, args.repeat)
            per_elem = 16 + 8 / 256 if "8bit" in name.replace("-", "") else 28
            lines.append(
                f"| {spec} | {name} | {1e3 * t:.2f} | {per_elem * n / t / 1e9:.1f} | {copy_bw:.1f} |"
            )
    table = "\n".join(lines)
    print(table)
    if args.record:
        record("bench_update.py", table)


if __name__ == "__main__":
    main()
