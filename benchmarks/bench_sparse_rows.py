"""8-bit states on sparse-gradient rows (issue #18): the embedding of a byte-level LM, side by side.

    python benchmarks/bench_sparse_rows.py [--steps 20] [--record]

The run the issue reported: LlamaForCausalLM (hidden 128, 2 layers, vocabulary of 256 bytes),
batch 4x64 of the stdlib's sources (the demo's corpus), AdamW lr 1e-3, the same weights and
batches for every contender. Printed per contender: the largest change of any embedding element
against eager fp32 AdamW after the last step, and against the same backend configuration with
32-bit states (the reference for the 8-bit part alone: GaLore itself differs from AdamW), the
LM head's, and the bytes of the embedding's optimizer states.

A second table: dense random gradients (the 8-bit issue's drift protocol), mean |p - p_fp32| after
20 steps, for lowrank, bitsandbytes and torchao.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from _results import record  # noqa: E402
from train_llama import batches  # noqa: E402
from train_llama import build_model  # noqa: E402
from train_llama import load_corpus  # noqa: E402

import lowrank_compile  # noqa: E402
from lowrank_compile.runtime import quant  # noqa: E402
from lowrank_compile.runtime.state import lookup  # noqa: E402

# name -> (optimizer kind, backend options or None for eager, reference run for "vs 32-bit")
CONTENDERS = {
    "eager AdamW fp32": ("torch", None, None),
    "bitsandbytes AdamW8bit": ("bnb", None, "eager AdamW fp32"),
    "torchao AdamW8bit": ("torchao", None, "eager AdamW fp32"),
    "lowrank rank=None, 32-bit": ("torch", {"rank": None, "state_bits": 32}, "eager AdamW fp32"),
    "lowrank rank=None, 8-bit": ("torch", {"rank": None}, "lowrank rank=None, 32-bit"),
    "lowrank rank=None, 8-bit, embedding 32-bit": (
        "torch",
        {"rank": None, "exclude": ["*embed_tokens*"]},
        "lowrank rank=None, 32-bit",
    ),
    "lowrank defaults, 32-bit states": ("torch", {"state_bits": 32}, "eager AdamW fp32"),
    "lowrank defaults (8-bit)": ("torch", {}, "lowrank defaults, 32-bit states"),
    "lowrank defaults, embedding 32-bit": (
        "torch",
        {"exclude": ["*embed_tokens*"]},
        "lowrank defaults, 32-bit states",
    ),
}


def _optimizer(kind: str, params, lr: float) -> torch.optim.Optimizer:
    if kind == "bnb":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr)
    if kind == "torchao":
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr)


def _embedding_state_bytes(opt: torch.optim.Optimizer, p: torch.Tensor) -> int:
    st = lookup(p)
    if st is not None and st.ostate:
        return sum(
            v.nbytes() if isinstance(v, quant.QState) else v.numel() * v.element_size()
            for k, v in st.ostate.items()
        )
    total = 0
    for v in opt.state.get(p, {}).values():
        if hasattr(v, "codes") and hasattr(v, "scale"):  # torchao's 8-bit tensor subclass
            total += v.codes.numel() * v.codes.element_size() + v.scale.numel() * v.scale.element_size()
        elif torch.is_tensor(v):
            total += v.numel() * v.element_size()
    return total


def run_lm(steps: int) -> tuple[list[tuple], str]:
    train, _ = load_corpus(2_000_000)
    torch.manual_seed(0)
    base = build_model(layers=2, hidden=128, seq=64)
    it = batches(train, 4, 64, seed=0)
    data = [next(it) for _ in range(steps)]
    finals = {}
    rows = []
    for name, (kind, options, ref) in CONTENDERS.items():
        lowrank_compile.reset()
        m = copy.deepcopy(base)
        opt = _optimizer(kind, m.parameters(), 1e-3)

        def step(ids, m=m, opt=opt):
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        if options is not None:
            step = torch.compile(step, backend="lowrank", options=options)
        for ids in data:
            step(ids)
        emb, head = m.model.embed_tokens.weight.detach(), m.lm_head.weight.detach()
        finals[name] = (emb.clone(), head.clone())
        e32, h32 = finals["eager AdamW fp32"]
        vs_eager = (emb - e32).abs().max().item()
        vs_ref = (emb - finals[ref][0]).abs().max().item() if ref else 0.0
        head_err = (head - h32).abs().max().item()
        nbytes = _embedding_state_bytes(opt, m.model.embed_tokens.weight)
        rows.append((name, vs_eager, ref or "-", vs_ref, head_err, nbytes))
    table = [
        f"model: LlamaForCausalLM hidden 128, 2 layers, vocab 256 (bytes), batch 4x64 stdlib sources, "
        f"{steps} steps, AdamW lr 1e-3 wd 0.01",
        "",
        "| run | embedding max \\|w - w_fp32\\| | reference for the 8-bit part "
        "| embedding max \\|w - w_ref\\| | lm_head max \\|w - w_fp32\\| | embedding state bytes |",
        "|---|---|---|---|---|---|",
    ]
    for name, a, ref, b, h, nbytes in rows:
        table.append(f"| {name} | {a:.3g} | {ref} | {b:.3g} | {h:.3g} | {nbytes} |")
    return rows, "\n".join(table)


def run_dense(steps: int = 20) -> str:
    """The 8-bit issue's drift protocol: injected dense gradients, mean |p - p_fp32| (tests/test_8bit.py)."""
    shapes = [(256, 128), (512, 256), (100, 300)]
    gen = torch.Generator().manual_seed(0)
    grads = [[torch.randn(s, generator=gen) * 0.01 for s in shapes] for _ in range(steps)]
    torch.manual_seed(0)
    base = [torch.randn(s) * 0.1 for s in shapes]
    hp = {"lr": 1e-3, "weight_decay": 0.01}

    def run(kind: str) -> list[torch.Tensor]:
        lowrank_compile.reset()
        ps = [torch.nn.Parameter(b.clone()) for b in base]
        opt = _optimizer(kind if kind != "lowrank" else "torch", ps, hp["lr"])
        for group in opt.param_groups:
            group["weight_decay"] = hp["weight_decay"]
        box: dict = {}

        def step() -> None:
            sum((p * g).sum() for p, g in zip(ps, box["g"])).backward()
            opt.step()
            opt.zero_grad()

        fn = (
            torch.compile(step, backend="lowrank", options={"rank": None, "state_bits": 8, "min_dim": 4})
            if kind == "lowrank"
            else step
        )
        for gs in grads:
            box["g"] = gs
            fn()
        return [p.detach() for p in ps]

    ref = run("torch")
    out = ["| run | mean \\|p - p_fp32\\| (worst of 3 tensors) |", "|---|---|"]
    for kind in ("lowrank", "bnb", "torchao"):
        err = max((a - b).abs().mean().item() for a, b in zip(run(kind), ref))
        out.append(f"| {kind} | {err:.4g} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = ap.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, lm = run_lm(args.steps)
        dense = run_dense()
    text = lm + "\n\nDense random gradients, 20 steps:\n\n" + dense
    print(text)
    if args.record:
        record("bench_sparse_rows.py", text)


if __name__ == "__main__":
    main()
