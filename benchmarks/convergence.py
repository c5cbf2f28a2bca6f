"""Convergence side by side: eager AdamW, galore_torch's GaLoreAdamW, and lowrank (defaults).

    python benchmarks/convergence.py [--steps 200 --layers 4 --hidden 128 --lr 3e-3] [--out DIR] [--record]
        [--runs eager_adamw,galore_torch,lowrank,lowrank_sparse,lowrank_projector_bits4,lowrank_fira,...]

`lowrank_<projector>` runs the defaults with options={"projector": <projector>},
`lowrank_projector_bits<b>` with options={"projector_bits": <b>}, and `lowrank_<method>`
(fira, frugal, apollo, apollo-mini) with options={"method": <method>} and that method's defaults.
A trailing `_state_bits32` (or `_state_bits8`) on a lowrank run also sets options={"state_bits": ...}.
`--runs methods` is every method beside eager AdamW and GaLore; `--runs methods-bits` is every
method (GaLore included) with 8-bit and with 32-bit states, beside eager AdamW. The table gives the optimizer
states each run holds after its last step (torch.optim's plus the backend's, 8-bit at their
stored size) and the median step time after the first 10 steps (compilation excluded; runs are
sequential, so on a shared machine only large differences mean anything).

The model and corpus are the demo's: a LlamaForCausalLM built from a config, trained on
Python's stdlib sources. Every run starts from the same weights and sees the same batches and
the same warmup+cosine schedule. galore_torch projects the same matrices the backend does (hidden
matmul weights, rank = 1/4 of the short side, scale 0.25, update_proj_gap 200, eps 1e-8).
Writes convergence.csv (step, run, train loss, val loss at eval steps) and convergence.png to
--out, prints a table, and with --record appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import pathlib
import sys
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from _results import record  # noqa: E402
from train_llama import batches  # noqa: E402
from train_llama import build_model  # noqa: E402
from train_llama import load_corpus  # noqa: E402

import lowrank_compile  # noqa: E402


def make_optimizer(name, model, lr):
    if name == "galore_torch":
        from galore_torch import GaLoreAdamW

        groups = [{"params": []}]
        for n, p in model.named_parameters():
            if p.dim() == 2 and n.split(".")[-2].endswith("proj"):
                groups.append(
                    {
                        "params": [p],
                        "rank": min(p.shape) // 4,
                        "update_proj_gap": 200,
                        "scale": 0.25,
                        "proj_type": "std",
                    }
                )
            else:
                groups[0]["params"].append(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return GaLoreAdamW(
                groups, lr=lr, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, no_deprecation_warning=True
            )
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))


def run(name, base, train, val, args):
    lowrank_compile.reset()
    model = copy.deepcopy(base)
    opt = make_optimizer(name, model, args.lr)
    warm = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)),
    )

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    fn = step
    if name.startswith("lowrank"):
        # "lowrank" is the defaults; "lowrank_<projector>" changes only the projector (sparse, ...),
        # "lowrank_projector_bits<b>" only how it is stored.
        suffix = name.split("_", 1)[1] if "_" in name else ""
        options: dict = {}
        for bits in ("8", "32"):
            if suffix == f"state_bits{bits}" or suffix.endswith(f"_state_bits{bits}"):
                options["state_bits"] = int(bits)
                suffix = suffix.removesuffix(f"state_bits{bits}").removesuffix("_")
        if suffix in lowrank_compile.config.METHODS:
            options["method"] = suffix
        elif suffix.startswith("projector_bits"):
            options["projector_bits"] = int(suffix.removeprefix("projector_bits"))
        elif suffix:
            options["projector"] = suffix
        fn = torch.compile(step, backend="lowrank", options=options)

    @torch.no_grad()
    def evaluate():
        vals = [
            model(input_ids=ids, labels=ids).loss.item()
            for ids, _ in zip(batches(val, 8, args.seq, 99), range(16))
        ]
        return sum(vals) / len(vals)

    it = batches(train, args.batch, args.seq, 0)
    rows = []
    times = []
    t0 = time.perf_counter()
    for i in range(args.steps):
        ids = next(it)
        ts = time.perf_counter()
        loss = fn(ids).item()
        times.append(time.perf_counter() - ts)
        sched.step()
        v = evaluate() if (i + 1) % args.eval_every == 0 or i + 1 == args.steps else None
        rows.append({"step": i + 1, "run": name, "train_loss": loss, "val_loss": v})
    state = lowrank_compile.optimizer_state_bytes(opt)["total"]
    steady = sorted(times[10:]) or times
    return rows, time.perf_counter() - t0, state, 1e3 * steady[len(steady) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--runs", default="eager_adamw,galore_torch,lowrank")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "out"))
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    train, val = load_corpus(4_000_000)
    base = build_model(args.layers, args.hidden, args.seq)
    n = sum(p.numel() for p in base.parameters())
    all_rows, summary = [], []
    names = args.runs.split(",")
    if names == ["methods"]:
        names = ["eager_adamw", "lowrank"] + [f"lowrank_{m}" for m in lowrank_compile.config.METHODS[1:]]
    elif names == ["methods-bits"]:
        names = ["eager_adamw"]
        for m in lowrank_compile.config.METHODS:
            base_name = "lowrank" if m == "galore" else f"lowrank_{m}"
            names += [base_name, f"{base_name}_state_bits32"]
    for name in names:
        rows, secs, state, step_ms = run(name, base, train, val, args)
        all_rows += rows
        last = rows[-1]
        train_tail = sum(r["train_loss"] for r in rows[-20:]) / min(20, len(rows))
        summary.append((name, rows[0]["train_loss"], train_tail, last["val_loss"], secs, state, step_ms))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "convergence.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "run", "train_loss", "val_loss"])
        w.writeheader()
        w.writerows(all_rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, *_ in summary:
            pts = [r for r in all_rows if r["run"] == name]
            ax.plot(
                [r["step"] for r in pts], [r["train_loss"] for r in pts], label=f"{name} (train)", alpha=0.6
            )
            ev = [r for r in pts if r["val_loss"] is not None]
            ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o--", label=f"{name} (val)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/byte)")
        ax.set_title(f"LlamaForCausalLM {n / 1e6:.2f}M params, lr {args.lr}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "convergence.png", dpi=120)
    except ImportError:  # pragma: no cover
        pass
    eager_val = next((s[3] for s in summary if s[0] == "eager_adamw"), None)
    lines = [
        f"model: LlamaForCausalLM {n / 1e6:.2f}M params ({args.layers} layers, hidden {args.hidden}), "
        f"batch {args.batch}x{args.seq}, {args.steps} steps, lr {args.lr} warmup+cosine, AdamW wd 0.1",
        "",
        "| run | first train loss | train loss (last 20) | final val loss | vs eager val | optimizer state B "
        "| step ms (median) | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, first, tail, vl, secs, state, step_ms in summary:
        rel = f"{100.0 * (vl - eager_val) / eager_val:+.1f}%" if eager_val else "-"
        lines.append(
            f"| {name} | {first:.3f} | {tail:.3f} | {vl:.3f} | {rel} | {state} | {step_ms:.1f} | {secs:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    print(f"wrote {out / 'convergence.csv'} and {out / 'convergence.png'}")
    if args.record:
        record("convergence.py", table)
    return summary


if __name__ == "__main__":
    main()
