"""Train a small LLaMA-style model with the `lowrank` backend on real text (what `make demo` runs).

The corpus is the bytes of Python's own standard library sources, present on every machine:
files sorted by path, every 10th one held out for validation, the rest for training. The
model is `transformers.LlamaForCausalLM` built from a config (random init, nothing downloaded).
The training step is the ordinary one; only the `torch.compile` line names the backend.

At the end it prints the final losses, the median step time, and the optimizer-state bytes of
the lowrank run next to those of eager AdamW on an identical copy run for a few steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import statistics
import sys
import sysconfig
import time

import torch

DEFAULT_OPTIONS: dict = {}  # the backend's defaults (see README "Options")


def load_corpus(max_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of the stdlib's .py files, sorted by path; every 10th file goes to validation."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    parts: tuple[list[bytes], list[bytes]] = ([], [])
    total = 0
    files = [p for p in sorted(root.rglob("*.py")) if not {"site-packages", "test", "tests"} & set(p.parts)]
    for i, path in enumerate(files):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        parts[i % 10 == 9].append(data)
        total += len(data)
        if total >= max_bytes:
            break

    def as_tensor(chunks: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()

    return as_tensor(parts[0]), as_tensor(parts[1])


def batches(data: torch.Tensor, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        yield torch.stack([data[s : s + seq] for s in starts.tolist()])


def build_model(
    layers: int,
    hidden: int,
    seq: int,
    vocab: int = 256,
    intermediate: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    attn: str = "sdpa",
) -> torch.nn.Module:
    """A LlamaForCausalLM from a config (random init): the demo's model and the benchmarks'.

    Defaults: 8/3 x hidden MLP (a multiple of 8), one head per 32 channels, as many KV heads.
    """
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM

    heads = heads or max(1, hidden // 32)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or int(hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=seq,
        attn_implementation=attn,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def tensor_bytes(states) -> int:
    return sum(
        v.numel() * v.element_size() for st in states.values() for v in st.values() if torch.is_tensor(v)
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eager-steps", type=int, default=10, help="steps of the eager AdamW reference")
    ap.add_argument("--corpus-bytes", type=int, default=4_000_000)
    ap.add_argument("--options", type=json.loads, default=DEFAULT_OPTIONS, help="backend options as JSON")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    train, val = load_corpus(args.corpus_bytes)
    model = build_model(args.layers, args.hidden, args.seq)
    eager_model = copy.deepcopy(model)
    n_params = sum(p.numel() for p in model.parameters())

    def make(m):
        opt = torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
        warmup = max(1, args.steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: (
                min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
            ),
        )
        return opt, sched

    opt, sched = make(model)

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    @torch.no_grad()
    def evaluate(m, n=8):
        losses = [
            m(input_ids=ids, labels=ids).loss.item()
            for ids, _ in zip(batches(val, args.batch, args.seq, 99), range(n))
        ]
        return sum(losses) / len(losses)

    cstep = torch.compile(step, backend="lowrank", options=args.options)
    it = batches(train, args.batch, args.seq, 0)
    times, losses, evals = [], [], []
    t_first = None
    try:
        from tqdm import tqdm

        bar = tqdm(range(args.steps), disable=args.no_progress, desc="lowrank", unit="step")
    except ImportError:  # pragma: no cover
        bar = range(args.steps)
    for i in bar:
        ids = next(it)
        t0 = time.perf_counter()
        loss = cstep(ids)
        sched.step()
        dt = time.perf_counter() - t0
        if i == 0:
            t_first = dt
        else:
            times.append(dt)
        losses.append(loss.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if args.eval_every and ((i + 1) % args.eval_every == 0 or i + 1 == args.steps):
            evals.append((i + 1, evaluate(model)))

    import lowrank_compile

    ours = lowrank_compile.optimizer_state_bytes(opt)

    # Eager AdamW on an identical copy, for the state bytes and the step time of the alternative.
    eopt, esched = make(eager_model)
    eit = batches(train, args.batch, args.seq, 0)
    etimes = []
    for i in range(args.eager_steps):
        ids = next(eit)
        t0 = time.perf_counter()
        loss = eager_model(input_ids=ids, labels=ids).loss
        loss.backward()
        eopt.step()
        eopt.zero_grad()
        esched.step()
        if i:
            etimes.append(time.perf_counter() - t0)
    eager_bytes = tensor_bytes(eopt.state)

    taken = lowrank_compile.current_plan().taken_over()
    summary = {
        "params": n_params,
        "options": args.options,
        "steps": args.steps,
        "train_loss_first": losses[0],
        "train_loss_last10": statistics.mean(losses[-10:]),
        "val_loss": evals[-1][1] if evals else None,
        "val_curve": evals,
        "first_step_s": t_first,
        "step_s_median": statistics.median(times) if times else None,
        "eager_step_s_median": statistics.median(etimes) if etimes else None,
        "state_bytes_lowrank": ours,
        "state_bytes_eager_adamw": eager_bytes,
        "params_taken_over": len(taken),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print()
        opts = args.options or "defaults"
        print(f"model: LlamaForCausalLM, {n_params / 1e6:.2f}M parameters; backend options {opts}")
        kinds = {k: sum(1 for p in taken if p.kind.value == k) for k in ("projected", "full")}
        split = f"{kinds['projected']} projected, {kinds['full']} full-rank"
        print(f"parameters taken over by the backend: {len(taken)} ({split})")
        print(f"train loss: {losses[0]:.3f} -> {summary['train_loss_last10']:.3f} (mean of last 10)")
        if evals:
            print("val loss:   " + "  ".join(f"step {s}: {v:.3f}" for s, v in evals))
        if times:
            print(
                f"step time:  {1e3 * summary['step_s_median']:.1f} ms median (first step incl. compile "
                f"{t_first:.1f} s); eager AdamW "
                f"{1e3 * (summary['eager_step_s_median'] or float('nan')):.1f} ms"
            )
        print(
            f"optimizer state: lowrank {ours['total'] / 1e6:.2f} MB (backend {ours['backend'] / 1e6:.2f} MB, "
            f"torch.optim {ours['torch'] / 1e6:.2f} MB) vs eager AdamW {eager_bytes / 1e6:.2f} MB "
            f"({100.0 * ours['total'] / max(eager_bytes, 1):.1f}%); GaLore projectors "
            f"{ours['projectors'] / 1e6:.2f} MB"
        )
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
