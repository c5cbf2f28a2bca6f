"""The projection R = G P with a stored projector and with the seeded ones, side by side in one run.

    python benchmarks/bench_projectors.py [--steps 30] [--record]

Shapes: the projected matrices of the issue's 23M LLaMA (hidden 512, intermediate 1376, rank 1/4
of the short side), plus one 4096 x 4096 matrix at rank 1024 for scale. Contenders, timed
interleaved in one process (medians):

- stored: a d x r fp32 matrix, one GEMM (what svd/randomized do);
- sparse / gaussian regenerated: one compiled function (Inductor) that generates P from its key
  and runs the GEMM, as the backend's graphs do (the generator is the backend's own);
- sparse via CSR: the same sparse P as a torch CSR tensor, `torch.sparse.mm` (exploiting the
  ~1/sqrt(short) density);
- sparse via gather: R[:, j] = sum over the nonzeros of column j, as index_select + index_add_.

Also printed: the bytes each keeps between steps (the seeded ones keep none), and for
`projector_bits` the error of a stored svd projector against fp32 (`quantization_table`).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _results import record  # noqa: E402

from lowrank_compile import projectors  # noqa: E402
from lowrank_compile.projectors.randomized import random_orthonormal  # noqa: E402
from lowrank_compile.projectors.seeded import seed_key  # noqa: E402
from lowrank_compile.projectors.svd import svd_projector  # noqa: E402

SHAPES = [(512, 512, 128), (1376, 512, 128), (512, 1376, 128), (4096, 4096, 1024)]


def contenders(m: int, n: int, r: int):
    """name -> (fn computing R for a gradient G of shape m x n, bytes kept between steps)."""
    short = min(m, n)
    d = n  # R = G P with P n x r (the side "right"; the left side is the same GEMM transposed)
    key = torch.tensor([seed_key(12345, 1)])
    stored = random_orthonormal(d, r, 0)
    sp = projectors.get("sparse").generate(key, d, r, short, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparse CSR is "beta"
        csr_t = sp.t().contiguous().to_sparse_csr()
    nz = sp.nonzero()
    rows, cols = nz[:, 0], nz[:, 1]
    vals = sp[rows, cols]

    def regen(kind):
        @torch.compile(dynamic=False)
        def f(g, k):
            return g @ projectors.get(kind).generate(k, d, r, short, torch.float32)

        return lambda g: f(g, key)

    def gather(g):
        out = torch.zeros(m, r)
        return out.index_add_(1, cols, g.index_select(1, rows) * vals)

    return (
        {
            "stored fp32 GEMM": (lambda g: g @ stored, stored.numel() * 4),
            "sparse regenerated + GEMM": (regen("sparse"), 0),
            "gaussian regenerated + GEMM": (regen("gaussian"), 0),
            "sparse CSR mm": (lambda g: torch.sparse.mm(csr_t, g.t()).t(), None),
            "sparse gather/index_add": (gather, None),
        },
        sp,
        rows.numel(),
    )


def quantization_table() -> list[str]:
    """`projector_bits`: error and bytes of the stored svd projector against fp32's.

    The gradient is a 1376 x 512 matrix of rank-64 signal (singular values 1..0.1) plus noise at
    10% of its energy; P is its rank-128 right SVD projector. "energy" is the fraction of G's
    energy inside the stored projector's span (||G Q||^2 / ||G||^2, Q an orthonormal basis of
    it), and "orthonormality" is ||P^T P - I||_2 of P as stored.
    """
    from lowrank_compile.runtime import projector_quant as pq

    gen = torch.Generator().manual_seed(0)
    m, n, r = 1376, 512, 128
    u = torch.linalg.qr(torch.randn(m, 64, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, 64, generator=gen)).Q
    g = u @ torch.diag(torch.linspace(1, 0.1, 64)) @ v.t()
    noise = torch.randn(m, n, generator=gen)
    g = g + noise * (math.sqrt(0.1) * g.norm() / noise.norm())
    p = svd_projector(g, r, "right")
    base = float((g @ p).norm() ** 2 / g.norm() ** 2)
    out = [
        f"projector_bits on a {m}x{n} gradient's rank-{r} svd projector "
        f"(fp32 captures {base:.4f} of its energy)",
        "",
        "| bits | bytes vs fp32 | rel. Frobenius error of P | max abs error | orthonormality | "
        "energy captured | vs fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for bits in (32, 16, 8, 4):
        back = p if bits == 32 else pq.roundtrip(p, bits)
        q = torch.linalg.qr(back.double()).Q.float()
        e = float((g @ q).norm() ** 2 / g.norm() ** 2)
        ortho = float(torch.linalg.matrix_norm(back.t() @ back - torch.eye(r), 2))
        out.append(
            f"| {bits} | {pq.stored_bytes(n, r, bits) / (4 * n * r):.3f} | "
            f"{float((back - p).norm() / p.norm()):.2e} | {float((back - p).abs().max()):.2e} | "
            f"{ortho:.2e} | {e:.4f} | {e / base:.4f} |"
        )
    return out


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    lines = [
        f"R = G P, medians of {args.steps} interleaved calls per contender; ms (bytes kept between steps)",
        "",
    ]
    names = None
    table_rows = []
    for m, n, r in SHAPES:
        g = torch.randn(m, n)
        cs, sp, nnz = contenders(m, n, r)
        ref = g @ sp
        for name, (fn, _) in cs.items():  # warm up (compiles) and check every contender's result
            out = fn(g)
            if "sparse" in name:
                assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max())), name
        times: dict[str, list[float]] = {k: [] for k in cs}
        for _ in range(args.steps):
            for name, (fn, _) in cs.items():
                t0 = time.perf_counter()
                fn(g)
                times[name].append(time.perf_counter() - t0)
        names = list(cs)
        cells = []
        for name, (_, kept) in cs.items():
            ms = 1e3 * statistics.median(times[name])
            kept_s = "-" if kept is None else f"{kept / 2**10:.0f} KiB"
            cells.append(f"{ms:.2f} ({kept_s})")
        density = nnz / sp.numel()
        table_rows.append(
            f"| {m}x{n}, r {r} | {density:.3f} (1/s = {1 / math.sqrt(min(m, n)):.3f}) | "
            + " | ".join(cells)
            + " |"
        )
    assert names is not None
    lines.append("| G, rank | sparse density | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---|" * len(names))
    lines += table_rows
    lines += ["", *quantization_table()]
    table = "\n".join(lines)
    print(table)
    if args.record:
        record("bench_projectors.py", table)
    return table


if __name__ == "__main__":
    main()
