"""Data-parallel training on 2 gloo ranks of this CPU: bytes handed to collectives and step time.

    python benchmarks/bench_ddp.py [--hidden 256 --layers 2 --seq 64 --batch 4 --steps 8 --record]

One HF Llama (vocab 256), the same seed and data for every contender, on each of 2 ranks
(`torch.multiprocessing.spawn`, one thread per rank):

- eager DDP with AdamW (the Reducer all-reduces every gradient);
- DDP with the forward compiled by Inductor (the same compiled region as lowrank's), AdamW;
- DDP with PowerSGD (torch's `powerSGD_hook`, matrix_approximation_rank 4, error feedback,
  compression from step 2), AdamW;
- lowrank (defaults: rank 1/4, 8-bit states, svd refresh every 200 steps), the forward compiled,
  AdamW: projected matrices leave the Reducer and the backend all-reduces R (runtime/dist.py).

Bytes: every tensor handed to a `c10d` op from the backward to the end of the step, counted by a
TorchDispatchMode (it sees DDP's Reducer and Python calls on the training thread), plus
`dist.all_reduce` calls from other threads (PowerSGD's callbacks), in a steady step (no svd
refresh, PowerSGD compressing). Step time: the median of `--steps` steps after
warm-up, the contenders' steps interleaved in one process pair.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode

# examples/train_llama.build_model, here and in spawned workers (they re-import this module).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))


def _nbytes(x: object) -> int:
    ts = x if isinstance(x, (list, tuple)) else [x]
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


class Bytes(TorchDispatchMode):
    """c10d ops dispatched on this thread, plus Python collectives called from other threads.

    A dispatch mode is thread-local: PowerSGD's later all-reduces run in future callbacks on the
    process group's threads, where only the Python-level `dist.all_reduce` wrapper sees them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self._thread = threading.get_ident()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional") and "barrier" not in func.__name__:
            self.n += _nbytes(args[0])
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        original = dist.all_reduce

        def all_reduce(tensor, *args, **kwargs):
            if threading.get_ident() != self._thread:
                self.n += _nbytes(tensor)
            return original(tensor, *args, **kwargs)

        self._original = original
        dist.all_reduce = all_reduce
        return super().__enter__()

    def __exit__(self, *exc):
        dist.all_reduce = self._original
        return super().__exit__(*exc)


def _worker(rank: int, store: str, a: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    from train_llama import build_model

    torch.manual_seed(0)
    base = build_model(
        a.layers, a.hidden, a.seq, intermediate=2 * a.hidden, heads=4, kv_heads=2, attn="eager"
    )
    runs = {}
    for name in ("eager DDP", "DDP + PowerSGD rank 4", "DDP + Inductor", "lowrank"):
        model = copy.deepcopy(base)
        ddp = DDP(model)
        if name.startswith("DDP + PowerSGD"):
            state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2)
            ddp.register_comm_hook(state, psgd.powerSGD_hook)
        fwd = (lambda d: lambda ids: d(input_ids=ids, labels=ids).loss)(ddp)
        if name == "lowrank":
            fwd = torch.compile(fwd, backend="lowrank")
        elif name == "DDP + Inductor":
            fwd = torch.compile(fwd)
        runs[name] = (model, fwd, torch.optim.AdamW(model.parameters(), lr=1e-3), [], [])
    gen = torch.Generator().manual_seed(1 + rank)
    for step in range(a.steps + 3):
        ids = torch.randint(0, 256, (a.batch, a.seq), generator=gen)
        for _model, fwd, opt, times, nbytes in runs.values():
            t0 = time.perf_counter()
            loss = fwd(ids)
            counter = Bytes()
            with counter:
                loss.backward()
                opt.step()
                opt.zero_grad()
            if step >= 3:
                times.append(time.perf_counter() - t0)
                nbytes.append(counter.n)
    if rank == 0:
        rows = [(n, statistics.median(r[4]), statistics.median(r[3])) for n, r in runs.items()]
        torch.save(rows, out)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    out = os.path.join(tmp, "rows.pt")
    mp.spawn(_worker, args=(os.path.join(tmp, "store"), a, out), nprocs=2)
    rows = torch.load(out)
    eager = rows[0][1]
    lines = [
        f"HF Llama hidden {a.hidden}, {a.layers} layers, vocab 256, batch {a.batch} x {a.seq} tokens per "
        f"rank, 2 gloo ranks (1 thread each), median of {a.steps} steps",
        "",
        "| contender | bytes to collectives per step | vs eager DDP | step ms |",
        "|---|---|---|---|",
    ]
    for name, nbytes, t in rows:
        lines.append(f"| {name} | {nbytes / 1e6:.3f} MB | {nbytes / eager:.3f} | {t * 1e3:.0f} |")
    table = "\n".join(lines)
    print(table)
    if a.record:
        sys.path.insert(0, os.path.dirname(__file__))
        from _results import record

        record("bench_ddp.py", table)


if __name__ == "__main__":
    main()
