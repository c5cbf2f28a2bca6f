"""Data-parallel training with the lowrank backend: plain DDP code, the step compiled.

    torchrun --nproc_per_node 2 examples/train_ddp.py            # CPU, gloo
    torchrun --nproc_per_node 2 examples/train_ddp.py --steps 20 --accumulate 2

The backend takes the projected matrices out of DDP's Reducer and all-reduces their low-rank
gradients itself (README: Data parallel). Rank 0 prints the loss, the bytes the backend handed to
collectives and whether every rank holds the same parameters.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import LlamaConfig
from transformers import LlamaForCausalLM

import lowrank_compile
from lowrank_compile.runtime import dist as lowrank_dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--accumulate", type=int, default=1, help="micro-batches per step (no_sync)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    @torch.compile(backend="lowrank", options={"update_gap": 5})
    def forward_backward(ids):
        loss = ddp(input_ids=ids, labels=ids).loss / args.accumulate
        loss.backward()
        return loss

    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own data
    for step in range(args.steps):
        total = 0.0
        for micro in range(args.accumulate):
            ids = torch.randint(0, 256, (4, 32), generator=gen)
            if micro < args.accumulate - 1:
                with ddp.no_sync():  # reduced once, at the last micro-batch
                    total += float(forward_backward(ids))
            else:
                total += float(forward_backward(ids))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if rank == 0:
            print(f"step {step:3d}  loss {total:.4f}")

    # Every rank holds the same parameters (the backend's check_ranks option checks it every update).
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    copies = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    if rank == 0:
        taken = len(lowrank_compile.current_plan().taken_over())
        stats = lowrank_dist.stats()
        print(
            f"ranks identical: {all(torch.equal(c, flat) for c in copies)}; "
            f"bytes to collectives: {stats['bytes'] / 1e6:.2f} MB in {stats['reductions']} all-reduces, "
            f"{stats['refresh_bytes'] / 1e6:.2f} MB for svd refreshes; parameters taken over: {taken}"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
