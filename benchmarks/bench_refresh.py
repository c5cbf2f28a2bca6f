"""Projector refresh: time per layer and energy captured, svd vs randomized vs dct, in one run.

    python benchmarks/bench_refresh.py [--shapes 512x512,512x1376,...] [--repeat 3] [--record]

Time per layer: the work done at a refresh for one m x n gradient, rank r = 1/4 of the short side.
- svd: fp32 SVD of G, then R = proj(G);
- randomized: the step-time part (SVD of the d x 2r sketch Y); the per-backward part
  (Y += A Omega) is reported separately, because it is added to that step's backward;
- dct: scores Q^T A, top-r, R = proj(G).
Energy: on real gradients of the demo's LLaMA-style model after a few AdamW steps, the fraction
||P^T G||^2 / ||G||^2 each method captures, relative to exact SVD (min and median over layers).
Prints one Markdown table per part; `--record` appends them to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
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

from lowrank_compile.projectors.dct import dct_basis  # noqa: E402
from lowrank_compile.projectors.dct import dct_indices  # noqa: E402
from lowrank_compile.projectors.randomized import range_finder  # noqa: E402
from lowrank_compile.projectors.randomized import sketch_sizes  # noqa: E402
from lowrank_compile.projectors.svd import svd_projector  # noqa: E402
from lowrank_compile.runtime import projector as pm  # noqa: E402


def timed(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def refresh_times(shape, repeat):
    m, n = shape
    r = max(1, min(m, n) // 4)
    side = pm.choose_side(shape, "std")
    g = torch.randn(m, n)
    a = g if side == "left" else g.t()
    d, e = a.shape
    omega = torch.randn(e, sketch_sizes(r, d, e))
    y = a @ omega
    basis = dct_basis(d)

    def svd():
        p = svd_projector(g, r, side)
        pm.project(g, p, side)

    def rand_step():
        range_finder(y, r)

    def rand_backward():
        a @ omega

    def dct():
        idx = dct_indices(g, basis, r, side)
        pm.project(g, basis[:, idx], side)

    def project_only():  # what a steady backward does anyway
        pm.project(g, basis[:, :r], side)

    return {
        "shape": f"{m}x{n}",
        "rank": r,
        "svd_ms": 1e3 * timed(svd, repeat),
        "rand_step_ms": 1e3 * timed(rand_step, repeat),
        "rand_bwd_ms": 1e3 * timed(rand_backward, repeat),
        "dct_ms": 1e3 * timed(dct, repeat),
        "project_ms": 1e3 * timed(project_only, repeat),
    }


def real_gradients(steps):
    torch.manual_seed(0)
    train, _ = load_corpus(1_000_000)
    model = build_model(4, 256, 128)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    it = batches(train, 8, 128, 0)
    for _ in range(steps):
        ids = next(it)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    ids = next(it)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.dim() == 2 and "proj" in n}


def energies(grads):
    rows = {"randomized": [], "dct": []}
    gen = torch.Generator().manual_seed(0)
    for g in grads.values():
        m, n = g.shape
        r = max(1, min(m, n) // 4)
        side = pm.choose_side((m, n), "std")
        a = g if side == "left" else g.t()
        d, e = a.shape
        exact = pm.energy_captured(g, svd_projector(g, r, side), side)
        omega = torch.randn(e, sketch_sizes(r, d, e), generator=gen)
        p = range_finder(a @ omega, r)
        rows["randomized"].append(pm.energy_captured(g, p, side) / exact)
        idx = dct_indices(g, dct_basis(d), r, side)
        rows["dct"].append(pm.energy_captured(g, dct_basis(d)[:, idx], side) / exact)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="512x512,512x1376,1024x1024,1024x2736,2048x2048")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = [refresh_times(s, args.repeat) for s in shapes]
    lines = [
        "Refresh time per layer (ms, best of repeats), rank = short side / 4",
        "",
        "| layer | rank | svd | randomized (at step) | randomized (per backward) | dct | projection GEMM |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["shape"], str(r["rank"])] + [
            f"{r[k]:.1f}" for k in ("svd_ms", "rand_step_ms", "rand_bwd_ms", "dct_ms", "project_ms")
        ]
        lines.append("| " + " | ".join(cells) + " |")
    grads = real_gradients(args.train_steps)
    en = energies(grads)
    lines += [
        "",
        f"Energy captured vs exact SVD on real gradients ({len(grads)} matrices of the demo LLaMA, "
        f"hidden 256, after {args.train_steps} AdamW steps), cold start",
        "",
        "| method | min | median | max |",
        "|---|---|---|---|",
    ]
    for name, vals in en.items():
        lines.append(f"| {name} | {min(vals):.3f} | {statistics.median(vals):.3f} | {max(vals):.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.record:
        record("bench_refresh.py", table)


if __name__ == "__main__":
    main()
