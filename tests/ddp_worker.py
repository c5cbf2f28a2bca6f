"""Worker for tests/test_ddp.py: 2 gloo ranks on CPU, started with torch.multiprocessing.spawn.

Each scenario writes what the test compares under OUT_DIR/<scenario>.<rank>.pt. The test runs
the single-process references itself.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(__file__))

from models import llama  # noqa: E402

import lowrank_compile  # noqa: E402
from lowrank_compile.runtime.state import lookup  # noqa: E402

WORLD = 2
# One decoder layer (2.6 MB of fp32 parameters) still splits at DDP's 1 MB first bucket: two pieces, so
# the overlap of reductions with the backward is exercised; a second layer cost ~10 s of compile per rank.
LLAMA = {"hidden": 256, "layers": 1}
OPTS = {"update_gap": 3, "rank": 0.25}
STEPS = 6
SEQ, ROWS = 32, 4  # the joint batch; rank r trains its slice of ROWS / WORLD sequences


def joint_batch(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(4000 + i)
    return torch.randint(0, 96, (ROWS, SEQ), generator=g)


def shard(ids: torch.Tensor, rank: int) -> torch.Tensor:
    per = ids.shape[0] // WORLD
    return ids[rank * per : (rank + 1) * per]


class CollectiveBytes(TorchDispatchMode):
    """Bytes of the tensors handed to c10d / _c10d_functional ops (it sees DDP's Reducer too)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns = func.namespace
        if ns in ("c10d", "_c10d_functional"):
            name = func.__name__
            if "barrier" not in name:
                first = args[0]
                ts = first if isinstance(first, (list, tuple)) else [first]
                n = sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))
                self.bytes += n
                self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def scenario_llama(rank: int, out: str, bits: int = 8) -> None:
    """Taken over, no .grad after backward, identical ranks, bytes against eager DDP."""
    model = llama(**LLAMA)
    eager_model = copy.deepcopy(model)
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    @torch.compile(backend="lowrank", options={**OPTS, "state_bits": bits})
    def forward(ids):
        return ddp(input_ids=ids, labels=ids).loss

    eager_ddp = DDP(eager_model)
    eager_opt = torch.optim.AdamW(eager_model.parameters(), lr=1e-3)
    report: dict = {"grads_after_backward": [], "bytes": {}}
    for i in range(STEPS):
        ids = shard(joint_batch(i), rank)
        loss = forward(ids)
        # Counted from the backward to the end of the step. A TorchDispatchMode around a compiled
        # frame makes Dynamo run that frame eagerly, so the forward stays outside (DDP's forward
        # only broadcasts buffers, the same in both runs).
        counter = CollectiveBytes()
        with counter:
            loss.backward()
            report["grads_after_backward"].append(
                sorted(n for n, p in model.named_parameters() if lookup(p) is not None and p.grad is not None)
            )
            opt.step()
            opt.zero_grad()
        if i == 4:  # updates 0 and 3 refresh (update_gap 3); update 4 is steady
            report["bytes"]["lowrank"] = counter.bytes
            report["ops"] = counter.ops
            eager_loss = eager_ddp(input_ids=ids, labels=ids).loss
            eager_counter = CollectiveBytes()
            with eager_counter:
                eager_loss.backward()
                eager_opt.step()
                eager_opt.zero_grad()
            report["bytes"]["eager"] = eager_counter.bytes
    report["taken"] = sorted(n for n, p in model.named_parameters() if lookup(p) is not None)
    report["projected"] = sorted(
        n for n, p in model.named_parameters() if lookup(p) is not None and lookup(p).projected
    )
    report["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    from lowrank_compile.runtime import dist as lowrank_dist

    report["stats"] = lowrank_dist.stats()
    torch.save(report, os.path.join(out, f"llama{bits}.{rank}.pt"))


# ----------------------------------------------------------------------------- small MLP
class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(128, 128)
        self.b = torch.nn.Linear(128, 128)
        self.c = torch.nn.Linear(128, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


MLP_OPTS = {"rank": 8, "update_gap": 3, "min_dim": 8}
MICRO, MLP_STEPS, CKPT_AT, MAX_NORM = 16, 6, 3, 0.02  # MICRO rows per rank and micro-batch


def mlp_micro(step: int, micro: int) -> torch.Tensor:
    """The joint micro-batch `micro` of `step` (all ranks' rows)."""
    g = torch.Generator().manual_seed(5000 + 10 * step + micro)
    return torch.randn(WORLD * MICRO, 128, generator=g)


def mlp_loss(model, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean()


def scenario_accumulate(rank: int, out: str, options: dict, clip: float | None, tag: str) -> None:
    """`no_sync()` over 2 micro-batches, then clip_grad_norm_ under DDP."""
    model = MLP()
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step_fn = torch.compile(lambda x: (mlp_loss(ddp, x) / 2).backward(), backend="lowrank", options=options)
    norms = []
    for i in range(MLP_STEPS):
        with ddp.no_sync():
            step_fn(shard(mlp_micro(i, 0), rank))
        step_fn(shard(mlp_micro(i, 1), rank))
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        opt.zero_grad()
    rep = lowrank_compile.clip_report()
    report = {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "norms": norms,
        "rel_std": None if rep is None else rep.rel_std,
        "estimated": None if rep is None else list(rep.estimated),
        "taken": sorted(n for n, p in model.named_parameters() if lookup(p) is not None),
    }
    torch.save(report, os.path.join(out, f"{tag}.{rank}.pt"))


def scenario_checkpoint(rank: int, out: str, resume: bool) -> None:
    """Rank 0 saves after step CKPT_AT; `resume`: fresh processes load it on every rank and go on."""
    model = MLP()
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    path = os.path.join(out, "ckpt.pt")
    first = 0
    if resume:
        sd = torch.load(path, weights_only=False)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["opt"])
        first = CKPT_AT

    @torch.compile(backend="lowrank", options=MLP_OPTS)
    def step_fn(x):
        mlp_loss(ddp, x).backward()

    for i in range(first, MLP_STEPS):
        step_fn(shard(mlp_micro(i, 0), rank))
        opt.step()
        opt.zero_grad()
        if not resume and i + 1 == CKPT_AT and rank == 0:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
        if not resume and i + 1 == CKPT_AT:
            dist.barrier()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save(params, os.path.join(out, f"ckpt_{'resumed' if resume else 'full'}.{rank}.pt"))


def _train_mlp_ddp(rank: int, options: dict, **adamw) -> MLP:
    """MLP_STEPS plain steps of the MLP under DDP on this rank's shard; returns the local model."""
    model = MLP()
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **adamw)

    @torch.compile(backend="lowrank", options=options)
    def step_fn(x):
        mlp_loss(ddp, x).backward()

    for i in range(MLP_STEPS):
        step_fn(shard(mlp_micro(i, 0), rank))
        opt.step()
        opt.zero_grad()
    return model


def scenario_projector(rank: int, out: str, projector: str) -> None:
    """randomized / dct under DDP with optimize_ddp=False (one graph, real parameters) and check_ranks."""
    torch._dynamo.config.optimize_ddp = False
    try:
        model = _train_mlp_ddp(rank, {**MLP_OPTS, "projector": projector, "check_ranks": True})
    finally:
        torch._dynamo.config.optimize_ddp = True
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save(params, os.path.join(out, f"proj_{projector}.{rank}.pt"))


def scenario_method(rank: int, out: str, method: str) -> None:
    """A method other than GaLore under DDP (its update reads the averaged full gradient)."""
    options = {**MLP_OPTS, "method": method, "check_ranks": True}
    model = _train_mlp_ddp(rank, options, weight_decay=0.01)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    st = lookup(model.a.weight)
    report = {"params": params, "method": st.binding.method.name, "projector": st.proj.method}
    torch.save(report, os.path.join(out, f"method_{method}.{rank}.pt"))


def scenario_scaler(rank: int, out: str) -> None:
    """GradScaler: an inf on rank 1 only makes every rank skip that step and lower the scale."""
    model = MLP()
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    @torch.compile(backend="lowrank", options=MLP_OPTS)
    def step_fn(x):
        scaler.scale(mlp_loss(ddp, x)).backward()

    snapshots, scales = [], []
    for i in range(4):
        x = shard(mlp_micro(i, 0), rank)
        if i == 2 and rank == 1:
            x = x.clone()
            x[0, 0] = float("inf")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        step_fn(x)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        snapshots.append(all(torch.equal(before[n], p) for n, p in model.named_parameters()))
        scales.append(float(scaler.get_scale()))
    report = {
        "unchanged": snapshots,
        "scales": scales,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "taken": sorted(n for n, p in model.named_parameters() if lookup(p) is not None),
    }
    torch.save(report, os.path.join(out, f"scaler.{rank}.pt"))


def scenario_diverged(rank: int, out: str) -> None:
    """check_ranks: a parameter changed on rank 1 only is reported on every rank, by name."""
    from lowrank_compile.runtime.dist import LowRankDistributedError

    model = MLP()
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    @torch.compile(backend="lowrank", options={**MLP_OPTS, "check_ranks": True})
    def step_fn(x):
        mlp_loss(ddp, x).backward()

    message = None
    for i in range(3):
        step_fn(shard(mlp_micro(i, 0), rank))
        if i == 1 and rank == 1:
            with torch.no_grad():
                model.b.weight[0, 0] += 1e-3
        try:
            opt.step()
        except LowRankDistributedError as err:
            message = str(err)
            break
        opt.zero_grad()
    torch.save({"message": message, "step": i}, os.path.join(out, f"diverged.{rank}.pt"))


def scenario_in_backward(rank: int, out: str) -> None:
    """update_in_backward under DDP: refused at take-over, before any update, naming the option."""
    model = MLP()
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.compile(backend="lowrank", options={**MLP_OPTS, "update_in_backward": True})
    def step_fn(x):
        mlp_loss(ddp, x).backward()

    error = None
    try:
        step_fn(shard(mlp_micro(0, 0), rank))
        opt.step()
    except Exception as err:  # noqa: BLE001 (the report carries its type and text)
        error = (type(err).__name__, str(err))
    unchanged = all(torch.equal(before[n], p) for n, p in model.named_parameters())
    torch.save({"error": error, "unchanged": unchanged}, os.path.join(out, f"in_backward.{rank}.pt"))


SCENARIOS = {
    "llama8": lambda r, o: scenario_llama(r, o, 8),
    "llama32": lambda r, o: scenario_llama(r, o, 32),
    # Exact path: full-size buffers, so the clip norm is exact and svd refreshes see the whole step.
    "accum_full": lambda r, o: scenario_accumulate(
        r, o, {**MLP_OPTS, "grad_accumulation": "full"}, MAX_NORM, "accum_full"
    ),
    # Defaults: projected accumulation; the clip norm of several contributions is an estimate.
    "accum_default": lambda r, o: scenario_accumulate(r, o, MLP_OPTS, 1e6, "accum_default"),
    "ckpt_full": lambda r, o: scenario_checkpoint(r, o, False),
    "proj_randomized": lambda r, o: scenario_projector(r, o, "randomized"),
    "proj_dct": lambda r, o: scenario_projector(r, o, "dct"),
    "method_apollo": lambda r, o: scenario_method(r, o, "apollo"),
    "method_gradnorm": lambda r, o: scenario_method(r, o, "gradnorm"),
    "scaler": scenario_scaler,
    "diverged": scenario_diverged,
    "in_backward": scenario_in_backward,
    "ckpt_resumed": lambda r, o: scenario_checkpoint(r, o, True),
}


def run(rank: int, store: str, out: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        for name in names:
            lowrank_compile.reset()
            torch.manual_seed(0)
            SCENARIOS[name](rank, out)
    finally:
        dist.destroy_process_group()
