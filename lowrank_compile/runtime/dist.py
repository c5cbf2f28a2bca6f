"""Data-parallel training (DDP): the backend reduces the gradients it holds.

A parameter the backend takes over under `DistributedDataParallel` leaves DDP's Reducer
(`adopt`): it is added to DDP's ignore list, marked `_ddp_ignored` (so Dynamo's DDPOptimizer
does not count it towards a bucket) and the Reducer is rebuilt without it. From then on no
bucket holds it, no `.grad` is zero-filled for it and DDP all-reduces nothing of it. Its
reduction is this module's, on a process group of its own with DDP's ranks:

- After every backward call that DDP would synchronise (`require_backward_grad_sync`, False
  under `no_sync()`), `after_backward` starts one asynchronous all-reduce per dtype over the
  buffers of that graph's parameters, flattened into one tensor. Under DDPOptimizer the
  forward is split per bucket, so the first reductions start while later pieces' backward
  still runs. `settle` waits for them; it runs before anything reads the buffers
  (`opt.step()`, `clip_grad_norm_`, GradScaler's unscale, the next backward call).
- What is reduced is what the backward accumulated: R (and the randomized sketch, the clip
  sketch), or the full buffer of a full-rank parameter. Linear buffers are averaged (sum / W).
  Sums of squares (‖G‖², the clip sketch's diagonal) are summed and divided by W², so they
  describe the average gradient as a sum of W contributions G_r / W, exactly as the clip
  estimator reads several backward calls (runtime/clip.py): the 2-norm of a projected
  gradient reduced over W > 1 ranks is an estimate, like one accumulated over several calls.
  A later reduction in the same window sums only what was added since the last one. max|G|
  is averaged with the linear buffers: it then carries only inf/NaN (GradScaler's check) and
  is not read as a norm, since a reduced gradient counts as several contributions.
- A state with contributions that no synchronised backward reduced (every call under
  `no_sync()`, or a gradient folded from `.grad`) is reduced at `opt.step()`: its projector
  and states must stay the same on every rank.
- The projector is the same on every rank: an svd/dct refresh inside the backward averages
  the full gradient first (full-size traffic, on refresh steps only: `refresh_op`); the
  randomized projector comes from the averaged sketch; seeds depend on names and counts only.
  With the `check_ranks` option every update compares projectors and parameters across
  ranks and raises `LowRankDistributedError` naming the first that differs.

The reductions use torch.distributed's public collectives; the Reducer surgery uses DDP's
private API, behind `_compat.rebuild_ddp_reducer`. torch.distributed is imported when a DDP
wrapper is first adopted, never by `import lowrank_compile`.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import TYPE_CHECKING
from typing import Any

import torch

if TYPE_CHECKING:
    from lowrank_compile.runtime.state import ParamState

__all__ = [
    "DataParallel",
    "LowRankDistributedError",
    "adopt",
    "after_backward",
    "average_",
    "check_ranks",
    "discard",
    "settle",
    "stats",
    "wait_for",
]

# Buffers of one dtype are flattened into tensors of at most this many bytes (DDP's default
# bucket size); a buffer larger than that is reduced in place on its own.
BUCKET_BYTES = 25 * 1024 * 1024


class LowRankDistributedError(RuntimeError):
    """Ranks disagree on something the backend keeps identical across them (`check_ranks`)."""


@dataclasses.dataclass(eq=False)
class DataParallel:
    """The backend's side of one DDP wrapper: its own process group and the reductions in flight."""

    ddp_ref: weakref.ref[Any]
    group: Any
    world: int
    gid: int  # index in _GROUPS, carried by the refresh op's code
    works: list[_Work] = dataclasses.field(default_factory=list)

    @property
    def syncing(self) -> bool:
        """True when DDP would synchronise gradients in this backward (False under `no_sync()`)."""
        ddp = self.ddp_ref()
        return bool(getattr(ddp, "require_backward_grad_sync", True))


@dataclasses.dataclass(eq=False)
class _Work:
    """One asynchronous all-reduce: the flat tensor, what it was made from, and how to scale back."""

    handle: Any
    flat: torch.Tensor | None  # None: `tensors[0]` was reduced in place
    tensors: list[torch.Tensor]
    quadratic: list[bool]
    states: list[ParamState]
    world: int


_GROUPS: list[DataParallel] = []
_BY_DDP: weakref.WeakKeyDictionary[Any, DataParallel] = weakref.WeakKeyDictionary()
_STATS = {"reductions": 0, "bytes": 0, "refresh_bytes": 0, "reducer_rebuilds": 0}


def stats() -> dict[str, int]:
    """Counters since the last reset: collectives started, bytes handed to them, Reducer rebuilds."""
    return dict(_STATS)


def reset() -> None:
    """Forget every data-parallel group (the process groups stay alive until torch destroys them)."""
    _GROUPS.clear()
    _BY_DDP.clear()
    for k in _STATS:
        _STATS[k] = 0


# ---------------------------------------------------------------------------- take-over
def adopt(ddp: Any, states: list[ParamState]) -> DataParallel:
    """Take `states`' parameters out of `ddp`'s Reducer and make this module reduce them."""
    import torch.distributed as dist

    dp = _BY_DDP.get(ddp)
    if dp is None:
        pg = ddp.process_group
        ranks = dist.get_process_group_ranks(pg)
        # A group of our own, so our collectives never interleave with the Reducer's buckets.
        # Every rank plans the same graph, so every rank creates it at the same point.
        group = dist.new_group(ranks=ranks, backend=dist.get_backend(pg))
        dp = DataParallel(weakref.ref(ddp), group, len(ranks), len(_GROUPS))
        _GROUPS.append(dp)
        _BY_DDP[ddp] = dp
    wanted = {id(st.param): st for st in states if st.param is not None}
    names: set[str] = set()
    for module_name, module in ddp.module.named_modules():
        for param_name, p in module.named_parameters(recurse=False):
            if id(p) in wanted:
                names.add(f"{module_name}.{param_name}")  # the Reducer's spelling (root: ".w")
    for st in states:
        st.dp = dp
        p = st.param
        if p is not None:
            p._ddp_ignored = True  # type: ignore[attr-defined]  # read by Dynamo's DDPOptimizer when it splits graphs
    if not names <= ddp.parameters_to_ignore:
        _rebuild_reducer(ddp, names)
    return dp


def _rebuild_reducer(ddp: Any, names: set[str]) -> None:
    """Rebuild DDP's Reducer without the parameters `names` (private DDP API: `_compat`)."""
    from lowrank_compile import _compat

    _compat.rebuild_ddp_reducer(ddp, names)
    _STATS["reducer_rebuilds"] += 1


# ---------------------------------------------------------------------------- reduction
def _by_group(states: Any) -> list[tuple[DataParallel, list[ParamState]]]:
    """`states` under DDP, grouped by their data-parallel group (in first-seen order)."""
    by_dp: dict[int, tuple[DataParallel, list[ParamState]]] = {}
    for st in states:
        if st.dp is not None:
            by_dp.setdefault(id(st.dp), (st.dp, []))[1].append(st)
    return list(by_dp.values())


def after_backward(states: list[ParamState]) -> None:
    """Called after each backward call: start reducing what it added, if DDP synchronises now."""
    for dp, sts in _by_group(states):
        for st in sts:
            st.unreduced = True
        if dp.syncing:
            _launch(dp, sts, async_op=True)


def _launch(dp: DataParallel, states: list[ParamState], async_op: bool) -> None:
    import torch.distributed as dist

    _wait(dp, states)
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[torch.Tensor, bool, ParamState]]] = {}
    for st in states:
        quads = st.quadratic_buffers()
        if st.quad_base is not None:
            for t, b in zip(quads, st.quad_base):
                t.sub_(b)  # a second reduction in the window sums only what was added since
        for t, quad in [(t, False) for t in st.gradient_buffers()] + [(t, True) for t in quads]:
            groups.setdefault((t.device, t.dtype), []).append((t, quad, st))
        st.unreduced = False
    for items in groups.values():
        for chunk in _chunks(items):
            tensors = [t for t, _, _ in chunk]
            flat = None if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])
            target = tensors[0] if flat is None else flat
            handle = dist.all_reduce(target, group=dp.group, async_op=True)
            _STATS["reductions"] += 1
            _STATS["bytes"] += target.numel() * target.element_size()
            owners = list({id(s): s for *_, s in chunk}.values())
            dp.works.append(_Work(handle, flat, tensors, [q for _, q, _ in chunk], owners, dp.world))
            for st in owners:
                st.in_flight = True
    if not async_op:
        _wait(dp, None)


def _chunks(items: list[tuple[torch.Tensor, bool, Any]]) -> list[list[tuple[torch.Tensor, bool, Any]]]:
    out: list[list[tuple[torch.Tensor, bool, Any]]] = []
    cur: list[tuple[torch.Tensor, bool, Any]] = []
    size = 0
    for item in items:
        nbytes = item[0].numel() * item[0].element_size()
        if nbytes >= BUCKET_BYTES:
            out.append([item])
            continue
        if cur and size + nbytes > BUCKET_BYTES:
            out.append(cur)
            cur, size = [], 0
        cur.append(item)
        size += nbytes
    if cur:
        out.append(cur)
    return out


def _finish(work: _Work) -> None:
    work.handle.wait()
    w = work.world
    if work.flat is None:
        pieces = [work.tensors[0]]
    else:
        pieces = list(torch.split(work.flat, [t.numel() for t in work.tensors]))
    for t, piece, quad in zip(work.tensors, pieces, work.quadratic):
        if piece is not t:
            t.copy_(piece.view(t.shape))
        t.div_(w * w if quad else w)


def _settled(st: ParamState, world: int) -> None:
    """After every work of `st` finished: add back the window's base, and keep the new one."""
    st.in_flight = False
    st.reduced_world = world
    quads = st.quadratic_buffers()
    if st.quad_base is not None:
        for t, b in zip(quads, st.quad_base):
            t.add_(b)
    st.quad_base = [t.clone() for t in quads]


def _wait(dp: DataParallel, states: list[ParamState] | None) -> None:
    """Finish the reductions in flight (all of `dp`'s, when any of `states` is among them)."""
    if not dp.works:
        return
    if states is not None and not any(st.in_flight for st in states):
        return
    works, dp.works = dp.works, []
    done: dict[int, ParamState] = {}
    for work in works:
        _finish(work)
        done.update((id(st), st) for st in work.states)
    for st in done.values():
        _settled(st, dp.world)


def wait_for(states: list[ParamState]) -> None:
    """Finish the reductions in flight that write into any of `states`' buffers."""
    for dp, _ in _by_group(states):
        _wait(dp, states)


def settle(states: list[ParamState] | None = None) -> None:
    """Make the buffers of `states` (default: all) hold the average over ranks, before they are read.

    Waits for the reductions in flight, and reduces now whatever no synchronised backward did.
    """
    for dp in list(_GROUPS):
        _wait(dp, None)
    pending = [
        st for st in (states if states is not None else _all_states()) if st.unreduced and not st.fresh
    ]
    for dp, sts in _by_group(pending):
        _launch(dp, sts, async_op=False)


def discard(st: ParamState) -> None:
    """zero_grad: wait for the reductions that still write into the buffers, and forget the window."""
    if st.dp is not None:
        if st.in_flight:
            _wait(st.dp, None)
        st.unreduced = False
        st.quad_base = None
        st.reduced_world = 1


def _all_states() -> list[ParamState]:
    from lowrank_compile.runtime.state import registry_states

    return [st for st in registry_states() if st.dp is not None]


def average_(g: torch.Tensor, gid: int) -> torch.Tensor:
    """A copy of `g` averaged over group `gid`'s ranks (the svd/dct refresh inside the backward)."""
    import torch.distributed as dist

    dp = _GROUPS[gid]
    out = g.detach().clone()
    dist.all_reduce(out, group=dp.group)
    _STATS["refresh_bytes"] += out.numel() * out.element_size()
    return out.div_(dp.world)


# ---------------------------------------------------------------------------- checks
def check_ranks(states: list[ParamState]) -> None:
    """Raise `LowRankDistributedError` when a projector or parameter differs between ranks."""
    import torch.distributed as dist

    for dp, sts in _by_group(states):
        rows = []
        for st in sts:
            ts = [st.view] + ([st.proj.projector()] if st.proj is not None and st.proj.has_p else [])
            pad = [torch.zeros(2, dtype=torch.float64)] * (2 - len(ts))
            rows.append(torch.stack([_digest(t) for t in ts] + pad))
        mine = torch.stack(rows)
        gathered = [torch.empty_like(mine) for _ in range(dp.world)]
        dist.all_gather(gathered, mine, group=dp.group)
        for r, other in enumerate(gathered):
            diff = (other != mine).any(dim=-1)
            if bool(diff.any()):
                i, what = (int(x) for x in diff.nonzero()[0])
                kind = "parameter" if what == 0 else "projector"
                raise LowRankDistributedError(
                    f"lowrank check_ranks: the {kind} of {sts[i].plan.name!r} differs between this rank "
                    f"({dist.get_rank()}) and rank {dist.get_process_group_ranks(dp.group)[r]}"
                )


def _digest(t: torch.Tensor) -> torch.Tensor:
    """Two float64 sums that differ when any element differs in practice (plain and position-weighted)."""
    x = t.detach().reshape(-1).to(torch.float64).cpu()
    w = torch.arange(1, x.numel() + 1, dtype=torch.float64)
    return torch.stack([x.sum(), (x * w).sum()])
