"""One device run: every check and timing that needs a CUDA GPU, in one process, one report.

    python benchmarks/gpu_check.py --out DIR [--budget-s 420] [--tiny]

Written for a lent GPU machine with little device time: each section is guarded (a failure is
printed with its traceback and the next section runs), and a section that would start after
`--budget-s` seconds is skipped and says so. The report (markdown) goes to DIR/gpu_check.md and to
stdout; `--tiny` runs the same code on small sizes (on CPU under TRITON_INTERPRET=1 it checks the
script itself, not the device).

Sections, in order (cheapest and most important first):
1. env: versions, device, SM count.
2. ceilings: device-to-device copy bandwidth (bytes read + written) and a bf16 matmul rate.
3. kernels: the Triton 8-bit AdamW kernel and the GaLore up-projection kernel against their plain
   torch references on CUDA (fresh random inputs, odd shapes; the interpreter tests' tolerances).
4. update: the optimizer update alone at 4M and 16M values: Triton 8-bit kernel, its torch
   reference, torch AdamW (foreach, fused), lowrank's compiled update (rank=None; 32 and 8 bits);
   effective bandwidth against the measured copy bandwidth.
5. parity: the compiled step on CUDA against eager references (rank=None AdamW vs torch AdamW on a
   small Llama; projected GaLore vs the eager GaLore reference in float64).
6. step: LLaMA-130M (GaLore's config), bf16 weights: first-step (compile) time, median step time
   and peak `max_memory_allocated` for eager AdamW fused, Inductor + AdamW, lowrank defaults and
   lowrank state_bits=32, one contender at a time (peaks must not overlap).
"""

from __future__ import annotations

import argparse
import copy
import gc
import pathlib
import statistics
import sys
import time
import traceback
import warnings

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))

from bench_step import train_step  # noqa: E402
from helpers import worst_rel_err  # noqa: E402

import lowrank_compile  # noqa: E402

REPORT: list[str] = []
T0 = time.perf_counter()


def say(line: str = "") -> None:
    print(line, flush=True)
    REPORT.append(line)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: torch.device, repeat: int = 20, warmup: int = 3) -> float:
    """Median seconds of `fn()` (CUDA events on a GPU, a synchronised host clock otherwise)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(repeat):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


# --- 1. env -----------------------------------------------------------------------------------
def sec_env(dev, args):
    import transformers

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "-"
    py = sys.version.split()[0]
    say(f"torch {torch.__version__}, triton {tv}, transformers {transformers.__version__}, python {py}")
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        say(f"device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
    say(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


# --- 2. ceilings ------------------------------------------------------------------------------
CEIL: dict[str, float] = {}


def sec_ceilings(dev, args):
    n = (1 << 20) if args.tiny else (1 << 28)  # 1 GiB of fp32
    a = torch.randn(n, device=dev)
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), dev)
    CEIL["copy"] = 8 * n / t
    say(f"copy bandwidth: {CEIL['copy'] / 1e9:.0f} GB/s (read + write, {4 * n / 2**30:.2f} GiB buffer)")
    if dev.type == "cuda":
        k = 256 if args.tiny else 8192
        x = torch.randn(k, k, device=dev, dtype=torch.bfloat16)
        y = torch.randn(k, k, device=dev, dtype=torch.bfloat16)
        t = timed(lambda: x @ y, dev, repeat=10)
        say(f"bf16 matmul {k}^3: {2 * k**3 / t / 1e12:.0f} TFLOP/s (random data)")


# --- 3. kernels -------------------------------------------------------------------------------
def sec_kernels(dev, args):
    from lowrank_compile.runtime import quant
    from lowrank_compile.runtime.kernels.adamw8bit import adamw8bit_applicable
    from lowrank_compile.runtime.kernels.adamw8bit import adamw8bit_reference
    from lowrank_compile.runtime.kernels.adamw8bit import adamw8bit_update
    from lowrank_compile.runtime.kernels.galore_update import galore_update
    from lowrank_compile.runtime.kernels.galore_update import galore_update_reference

    hp = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
    shapes = [(1,), (37, 129), (4097,), (300, 17), (2, 256, 3)] + ([] if args.tiny else [(4096, 1024)])
    say("adamw8bit Triton kernel vs reference (4 steps; sparse gradients over six decades):")
    # The interpreter tests' (atol, rtol) for p (tests/interp/test_triton_kernels.py explains them).
    tol = {torch.float32: (1e-7, 1e-6), torch.bfloat16: (4e-3, 1.6e-2)}
    say(
        "| shape | dtype | max abs dp | p outside (atol, rtol) | m codes differ | v codes differ (max step) "
        "| m absmax equal |"
    )
    say("|---|---|---|---|---|---|---|")
    seed = int(time.time()) % 100000  # fresh inputs each run (METHOD.md); printed to reproduce
    say(f"(seed {seed})")
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator(device="cpu").manual_seed(seed + sum(shape))
            p0 = (torch.randn(shape, generator=g) * 0.1).to(dtype).to(dev)
            pk, pr = p0.clone(), p0.clone()
            sts = [quant.QState.zeros(shape, s, dev, sqrt=not s) for s in (True, False, True, False)]
            mk, vk, mr, vr = sts
            scale = (10.0 ** (-6 * torch.rand(shape, generator=g))).to(dev)
            worst_a, outside = 0.0, 0
            mdiff = vdiff = vmax = 0
            for step in range(1, 5):
                grad = torch.randn(shape, generator=g).to(dev) * 0.01 * scale
                grad = (grad * (torch.rand(shape, generator=g) < 0.6).to(dev)).to(dtype)
                assert adamw8bit_applicable(pk, grad, mk, vk)
                adamw8bit_update(pk, grad, mk, vk, step=step, salt=step, **hp)
                adamw8bit_reference(pr, grad, mr, vr, step=step, salt=step, **hp)
                d = (pk.float() - pr.float()).abs()
                worst_a = max(worst_a, d.max().item())
                atol, rtol = tol[dtype]
                outside += int((d > atol + rtol * pr.float().abs()).sum())
                mdiff += int((mk.codes != mr.codes).sum())
                vd = (vk.codes.int() - vr.codes.int()).abs()
                vdiff += int((vd > 0).sum())
                vmax = max(vmax, int(vd.max()))
            same_abs = bool(torch.equal(mk.absmax, mr.absmax))
            n = pk.numel() * 4
            say(
                f"| {'x'.join(map(str, shape))} | {str(dtype)[6:]} | {worst_a:.2e} | {outside}/{n} "
                f"| {mdiff}/{n} | {vdiff}/{n} ({vmax}) | {same_abs} |"
            )
    say("")
    say("galore_update Triton kernel (W <- W*decay + scale*A@B) vs the fp64 product: fp32, the update's")
    say("relative error; bf16, the share of elements that differ from the exact result rounded to bf16")
    say("| m x n, r | dtype | kernel | torch reference |")
    say("|---|---|---|---|")
    sizes = [(37, 53, 7), (5, 129, 37), (1, 1, 1)] + (
        [] if args.tiny else [(4096, 1024, 256), (2048, 5461, 512)]
    )
    for m, n, r in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator(device="cpu").manual_seed(seed + m * n + r)
            w0 = (torch.randn(m, n, generator=g) * 0.1).to(dtype).to(dev)
            a = torch.randn(m, r, generator=g).to(dtype).to(dev)
            b = (torch.randn(r, n, generator=g) * 1e-3).to(dev)
            exact = w0.double() * (1 - 1e-4) + 0.25 * (a.double() @ b.double())
            wk, wr = w0.clone(), w0.clone()
            galore_update(wk, a, b, decay=1 - 1e-4, scale=0.25)
            galore_update_reference(wr, a, b, decay=1 - 1e-4, scale=0.25)
            if dtype == torch.float32:
                upd = (exact - w0.double()).norm().item()
                ek = (wk.double() - exact).norm().item() / upd
                er = (wr.double() - exact).norm().item() / upd
            else:
                rounded = exact.to(dtype)
                ek = (wk != rounded).float().mean().item()
                er = (wr != rounded).float().mean().item()
            say(f"| {m}x{n}, {r} | {str(dtype)[6:]} | {ek:.2e} | {er:.2e} |")


# --- 4. update --------------------------------------------------------------------------------
def _lowrank_update(shape, dev, bits, kernel="auto"):
    lowrank_compile.reset()
    p = torch.nn.Parameter(torch.randn(shape, device=dev) * 0.1)
    g = torch.randn(shape, device=dev) * 0.01
    opt = torch.optim.AdamW([p], lr=1e-3)
    options = {"rank": None, "state_bits": bits, "update_kernel": kernel}
    fwbw = torch.compile(lambda: (p * g).sum().backward(), backend="lowrank", options=options)
    fwbw()  # the gradient now sits in the backend's buffer; each step() applies it again
    return opt.step, (p, g, opt)


def sec_update(dev, args):
    from lowrank_compile.runtime import quant
    from lowrank_compile.runtime.kernels.adamw8bit import adamw8bit_reference
    from lowrank_compile.runtime.kernels.adamw8bit import adamw8bit_update

    hp = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
    sizes = [(256, 256)] if args.tiny else [(4096, 1024), (4096, 4096)]
    say("| values | contender | ms | bytes/value | GB/s | of copy |")
    say("|---|---|---|---|---|---|")
    for shape in sizes:
        n = shape[0] * shape[1]
        a = torch.randn(n, device=dev)
        b = torch.empty_like(a)
        tc = timed(lambda a=a, b=b: b.copy_(a), dev)
        copy_bw = 8 * n / tc
        rows = [("copy_ (fp32)", tc, 8)]
        p = torch.randn(shape, device=dev) * 0.1
        gr = torch.randn(shape, device=dev) * 0.01
        m, v = quant.QState.zeros(shape, True, dev), quant.QState.zeros(shape, False, dev, sqrt=True)
        count = [0]

        def kern(p=p, gr=gr, m=m, v=v, count=count):
            count[0] += 1
            adamw8bit_update(p, gr, m, v, step=count[0], salt=count[0], **hp)

        def ref(p=p, gr=gr, m=m, v=v, count=count):
            count[0] += 1
            adamw8bit_reference(p, gr, m, v, step=count[0], salt=count[0], **hp)

        b8 = 16 + 8 / quant.BLOCK  # p, g read; p written (4 B each); 2 codes read+written; absmax
        if dev.type == "cuda":
            rows.append(("Triton adamw8bit kernel", timed(kern, dev), b8))
        rows.append(("adamw8bit reference (eager torch)", timed(ref, dev, repeat=5), b8))
        for foreach, fused in ((True, False), (False, True)):
            if fused and dev.type != "cuda" and not hasattr(torch.optim, "AdamW"):
                continue
            q = torch.nn.Parameter(torch.randn(shape, device=dev) * 0.1)
            q.grad = torch.randn(shape, device=dev) * 0.01
            o = torch.optim.AdamW([q], lr=1e-3, foreach=foreach, fused=fused or None)
            rows.append(
                (f"torch AdamW {'fused' if fused else 'foreach'} (fp32 states)", timed(o.step, dev), 28)
            )
        from lowrank_compile.runtime import binding

        for bits, kernel in ((32, "auto"), (8, "inductor"), (8, "auto")):
            binding.KERNEL_UPDATES.clear()
            fn, keep = _lowrank_update(shape, dev, bits, kernel)
            t = timed(fn, dev)
            how = "Triton kernel" if sum(binding.KERNEL_UPDATES.values()) else "Inductor"
            rows.append((f"lowrank step(), {bits}-bit states, {how}", t, 28 if bits == 32 else b8))
            del keep
        for name, t, bpv in rows:
            bw = bpv * n / t
            gbs, share = bw / 1e9, bw / copy_bw
            say(f"| {n / 1e6:.1f}M | {name} | {1e3 * t:.3f} | {bpv:.2f} | {gbs:.0f} | {share:.0%} |")


# --- 5. parity --------------------------------------------------------------------------------
def _small_llama(dev):
    from train_llama import build_model

    torch.manual_seed(0)
    return build_model(2, 64, 32, 128, 176, 4).to(dev)


def sec_parity(dev, args):
    from lowrank_compile.plan import Kind

    # (a) rank=None, 32-bit: the compiled update is torch.optim.AdamW's rule; fp32, 5 steps.
    lowrank_compile.reset()
    base = _small_llama(dev)
    em, cm = copy.deepcopy(base), copy.deepcopy(base)
    eo = torch.optim.AdamW(em.parameters(), lr=1e-3, weight_decay=0.1)
    co = torch.optim.AdamW(cm.parameters(), lr=1e-3, weight_decay=0.1)
    cstep = train_step(cm, co, "lowrank", {"rank": None, "state_bits": 32})
    gen = torch.Generator(device="cpu").manual_seed(1)
    worst = 0.0
    for _ in range(5):
        ids = torch.randint(0, 128, (2, 32), generator=gen).to(dev)
        em(input_ids=ids, labels=ids).loss.backward()
        eo.step()
        eo.zero_grad()
        cstep(ids)
        worst = max(worst, worst_rel_err(cm, em)[0])
    plan = lowrank_compile.current_plan()
    kinds = [str(p.kind) for p in plan.params]
    full = sum(k == str(Kind.FULL) for k in kinds)
    say(f"(a) rank=None state_bits=32 vs eager AdamW, small Llama fp32, 5 steps: worst rel diff {worst:.2e} "
        f"(taken over: {full}/{len(kinds)} full)")  # fmt: skip

    # (b) projected GaLore (AdamW rule) vs the eager GaLore reference, float64 MLP, 7 steps.
    from galore_reference import GaLoreReference
    from models import mlp
    from models import mlp_batch
    from models import mlp_loss

    lowrank_compile.reset()
    projected = ["0.weight", "2.weight"]
    base = mlp().double().to(dev)
    rm, cm2 = copy.deepcopy(base), copy.deepcopy(base)
    ro = torch.optim.AdamW(rm.parameters(), lr=1e-2, weight_decay=0.1)
    co2 = torch.optim.AdamW(cm2.parameters(), lr=1e-2, weight_decay=0.1)
    ref = GaLoreReference(rm, ro, projected, 8, 3, 0.25, "std", "adamw")

    def step2(batch):
        mlp_loss(cm2, batch).backward()
        co2.step()
        co2.zero_grad()

    cstep2 = torch.compile(
        step2, backend="lowrank", options={"rank": 8, "update_gap": 3, "state_bits": 32, "min_dim": 4}
    )
    worst = 0.0
    for i in range(7):
        x, y = mlp_batch(i)
        batch = (x.double().to(dev), y.to(dev))
        mlp_loss(rm, batch).backward()
        ref.step()
        ref.zero_grad()
        cstep2(batch)
        worst = max(worst, worst_rel_err(cm2, rm)[0])
    proj = sorted(p.name for p in lowrank_compile.current_plan().params if p.kind == Kind.PROJECTED)
    say(f"(b) GaLore rank 8 vs the eager GaLore reference, float64 MLP on {dev.type}, 7 steps: worst rel "
        f"diff "
        f"{worst:.2e} (projected: {proj})")  # fmt: skip


# --- 6. step ----------------------------------------------------------------------------------
STEP_CONTENDERS = {
    "eager AdamW fused": (None, None, {"fused": True}),
    "Inductor + AdamW": ("inductor", None, {}),
    "lowrank defaults": ("lowrank", {}, {}),
    "lowrank state_bits=32": ("lowrank", {"state_bits": 32}, {}),
}


def sec_step(dev, args):
    from train_llama import build_model

    cfg = (2, 128, 64, 512, 344, 4) if args.tiny else (12, 768, 256, 32000, 2048, 12)
    batch, seq = (2, 64) if args.tiny else (8, 256)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    base = build_model(*cfg).to(dtype)
    nparams = sum(p.numel() for p in base.parameters())
    gen = torch.Generator(device="cpu").manual_seed(0)
    data = [torch.randint(0, cfg[3], (batch, seq), generator=gen).to(dev) for _ in range(4)]
    say(f"model: LlamaForCausalLM {nparams / 1e6:.0f}M params (layers {cfg[0]}, hidden {cfg[1]}, "
        f"intermediate {cfg[4]}, vocab {cfg[3]}), bf16 weights, batch {batch}x{seq}; "
        f"median of {args.steps} steps after 3 warm-up steps; one contender at a time")  # fmt: skip
    say("| contender | first step s | step ms | peak GiB | after-step GiB | opt-state MiB | loss |")
    say("|---|---|---|---|---|---|---|")
    for name, (backend, options, kw) in STEP_CONTENDERS.items():
        if args.contenders and name not in args.contenders.split(","):
            continue
        if time.perf_counter() - T0 > args.budget_s:
            say(f"| {name} | skipped: past the time budget | | | | | |")
            continue
        try:
            lowrank_compile.reset()
            torch._dynamo.reset()
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            model = copy.deepcopy(base).to(dev)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, **kw)
            step = train_step(model, opt, backend, options)
            t = time.perf_counter()
            step(data[0])
            sync(dev)
            first = time.perf_counter() - t
            for i in range(3):
                step(data[1 + i % 3])
            sync(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()

            def one(step=step, k=[0]):  # noqa: B006 - the step counter of this contender
                k[0] += 1
                return step(data[k[0] % 4])

            ms = 1e3 * timed(one, dev, repeat=args.steps, warmup=0)
            peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
            after = torch.cuda.memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
            state = lowrank_compile.optimizer_state_bytes(opt)["total"] / 2**20
            loss = one().item()
            say(f"| {name} | {first:.1f} | {ms:.1f} | {peak:.2f} | {after:.2f} | {state:.0f} | {loss:.3f} |")
            if args.profile and dev.type == "cuda":
                PROFILES.append((name, _profile(one, dev, args.out, name)))
            del model, opt, step
        except Exception as e:  # noqa: BLE001 - one contender's failure must not hide the others
            say(f"| {name} | failed: {type(e).__name__}: {str(e)[:200]} | | | | | |")
            traceback.print_exc()


PROFILES: list[tuple[str, str]] = []


def _profile(one, dev, out, name) -> str:
    """Kernels per step and their device time over 3 steps (torch.profiler); full table to a file."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            one()
        sync(dev)
    avg = prof.key_averages()
    key = "self_device_time_total" if hasattr(avg[0], "self_device_time_total") else "self_cuda_time_total"
    sort = "device_time_total" if key == "self_device_time_total" else "cuda_time_total"
    table = avg.table(sort_by=sort, row_limit=25)
    fname = "profile_" + "".join(c if c.isalnum() else "_" for c in name) + ".txt"
    pathlib.Path(out, fname).write_text(table)
    kernels = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    busy = sum(getattr(e, key.replace("_total", ""), 0) or 0 for e in kernels) / 1e3 / 3
    top = sorted(avg, key=lambda e: -(getattr(e, key) or 0))[:6]
    tops = "; ".join(f"{e.key[:48]} {getattr(e, key) / 1e3 / 3:.2f} ms x{e.count // 3}" for e in top)
    return f"{len(kernels) // 3} device events per step, {busy:.1f} ms device time per step; top: {tops}"


def sec_profile_report(dev, args):
    for name, line in PROFILES:
        say(f"- {name}: {line}")


SECTIONS = [
    ("env", sec_env),
    ("ceilings", sec_ceilings),
    ("kernels", sec_kernels),
    ("update", sec_update),
    ("parity", sec_parity),
    ("step", sec_step),
    ("profile", sec_profile_report),
]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--only", default="", help="comma-separated section names")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--contenders", default="", help="comma-separated step contenders (default: all)")
    ap.add_argument("--profile", action="store_true", help="profile each step contender (3 steps)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    warnings.simplefilter("ignore")
    if "lowrank" not in torch._dynamo.list_backends(exclude_tags=()):
        # A checkout that is not pip-installed has no entry point: register the same function.
        from lowrank_compile.backend import lowrank_backend

        torch._dynamo.register_backend(name="lowrank")(lowrank_backend)
    for name, fn in SECTIONS:
        if args.only and name not in args.only.split(","):
            continue
        say("")
        say(f"## {name} (t = {time.perf_counter() - T0:.0f} s)")
        if time.perf_counter() - T0 > args.budget_s:
            say("skipped: past the time budget")
            continue
        try:
            fn(dev, args)
        except Exception as e:  # noqa: BLE001 - report and go on: the lease is short
            say(f"FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
    say("")
    say(f"total {time.perf_counter() - T0:.0f} s")
    pathlib.Path(args.out, "gpu_check.md").write_text("\n".join(REPORT) + "\n")


if __name__ == "__main__":
    main()
