"""What the backend keeps per parameter it takes over, and the process-wide registry of it.

The registry is keyed weakly by parameter identity, so a model that goes away takes its
states with it. A `ParamState` refers to its parameter only weakly. It holds a detached view
of the parameter's storage, which the update writes through.

Gradient accumulators, by kind and step:

- full kind: the backward accumulates `grad` (full size); the update runs on it.
- projected, steady step: the backward accumulates R = proj(G), ||G||^2 and max|G|; the update
  runs on R.
- projected, svd/dct refresh step: the backward accumulates `full` (full size, this step only);
  the update first takes a new P from it and sets R = proj(full).
- projected, randomized refresh step: the backward accumulates R with the old P plus the sketch
  Y = A Omega; the new P comes from Y and takes over after the update.

`fresh` is True while no gradient has arrived since the last zero_grad (eager: `.grad is None`).
"""

from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from lowrank_compile import projectors
from lowrank_compile.config import LowRankConfig
from lowrank_compile.plan import Kind
from lowrank_compile.plan import ParamPlan
from lowrank_compile.projectors.seeded import seed_key
from lowrank_compile.runtime import projector as proj_math

if TYPE_CHECKING:
    from lowrank_compile.runtime.binding import OptimizerBinding

__all__ = ["ParamState", "Projection", "compute_dtype", "decided", "lookup", "register", "registry_clear"]

# Q-GaLore's adaptive refresh: the last SIM_WINDOW cosine similarities between successive top
# singular vectors; when their mean reaches SIM_THRESHOLD the layer's gap doubles.
SIM_WINDOW = 3
SIM_THRESHOLD = 0.4


@dataclass(eq=False)
class Projection:
    """GaLore state of one projected parameter (G is m x n)."""

    side: proj_math.Side
    rank: int
    method: str  # svd | randomized | dct | sparse | gaussian
    shape: tuple[int, int]
    # d x r projector (svd/randomized); empty for dct (the shared basis' columns `index`) and for
    # the seeded projectors (regenerated from `key`).
    p: torch.Tensor
    r_acc: torch.Tensor  # low-rank gradient accumulator
    sq: torch.Tensor  # 0-d: sum of G^2 over the step's backward calls
    amax: torch.Tensor  # 0-d: max |G| over the step's backward calls
    # The rule's parameter (R-shaped), zero before each update: made inside the update's graph
    # (`torch.zeros_like(virtual)`, which Inductor fuses away), so this holds one element
    # (`shape_carrier`: a stride-0 view) and only gives the shape and dtype.
    virtual: torch.Tensor
    basis: torch.Tensor | None = None  # dct: the shared d x d basis
    index: torch.Tensor | None = None  # dct: the r chosen columns
    # sparse/gaussian: (1,) int64, the 32-bit key the projector is generated from
    # (projectors.seeded.seed_key(seed_base, refreshes)), a graph input; `seed_base` comes from the name.
    key: torch.Tensor | None = None
    seed_base: int = 0
    # projector_bits < 32 (runtime/projector_quant.py): the matrix as codes + per-group
    # [scale, lo]; `p` is then empty.
    pbits: int = 32
    pcodes: torch.Tensor | None = None
    pqparams: torch.Tensor | None = None
    # Quantized projectors in a refresh step: the current matrix dequantized once for the
    # refresh op's pass-through input (runtime/refresh_op.py), dropped once installed.
    src_cache: torch.Tensor | None = None
    full: torch.Tensor | None = None  # full-size accumulator, svd/dct refresh steps only
    omega: torch.Tensor | None = None  # randomized: e x k test matrix of the sketch Y = A Omega
    sketch_y: torch.Tensor | None = None  # randomized: d x k
    pending_p: torch.Tensor | None = None  # randomized: projector that takes over after this update
    # Clip residual sketch (consume_project's `clip`, runtime/clip.py), this step's only; its
    # e x k test matrix is shared by every parameter of the same e (`clip_test_matrix`).
    clip_y: torch.Tensor | None = None  # d x k: sum over calls of A_i clip_omega
    clip_diag: torch.Tensor | None = None  # (k,): sum over calls of column sums of (E_i clip_omega)^2
    sq_r: torch.Tensor | None = None  # 0-d: sum over calls of ||P^T A_i||^2
    # svd/dct refresh inside backward (consume-grads "refresh" mode): the new projector (or dct
    # indices), made on the step's first backward call and installed by refresh.prepare.
    refresh_buf: torch.Tensor | None = None
    bwd_refreshed: bool = False
    refresh_code_now: int = 0  # the code fed to the backward call being prepared
    has_p: bool = False  # a projector exists (False before the first refresh)
    updates: int = 0  # updates applied so far (GaLore's `step` for this parameter)
    next_refresh: int = 0
    gap: int = 200
    refreshes: int = 0
    sims: collections.deque = field(default_factory=lambda: collections.deque(maxlen=SIM_WINDOW))

    @property
    def reduced(self) -> int:
        """The dimension the projector reduces (d)."""
        return self.shape[0] if self.side == "left" else self.shape[1]

    @property
    def kept(self) -> int:
        """The dimension kept at full size (e)."""
        return self.shape[1] if self.side == "left" else self.shape[0]

    def refresh_due(self) -> bool:
        """True when the coming update refreshes the projector."""
        return self.updates >= self.next_refresh

    @property
    def kind(self) -> projectors.Projector:
        """The projector kind (`projector` option): how it is stored and refreshed."""
        return projectors.get(self.method)

    @property
    def seeded(self) -> bool:
        """True for the projectors that are regenerated from a key and never stored."""
        return self.key is not None

    def projector(self) -> torch.Tensor:
        """The current d x r projector (gathered from the basis for dct, generated when seeded)."""
        if self.basis is not None and self.index is not None:
            return self.basis.index_select(1, self.index)
        if self.key is not None:
            return self.seeded_matrix(self.key)
        if self.pcodes is not None:
            from lowrank_compile.runtime import projector_quant

            assert self.pqparams is not None
            return projector_quant.dequantize(
                self.pcodes, self.pqparams, self.pbits, self.reduced, self.rank, self.p.dtype
            )
        return self.p

    def set_matrix(self, new: torch.Tensor) -> None:
        """Store `new` (d x r) as the projector matrix (quantized under `projector_bits` < 32)."""
        if self.pcodes is None:
            self.p.copy_(new.to(self.p.dtype))
            return
        from lowrank_compile.runtime import projector_quant

        assert self.pqparams is not None
        codes, qparams = projector_quant.quantize(new, self.pbits)
        self.pcodes.copy_(codes)
        self.pqparams.copy_(qparams)

    def current_matrix_input(self) -> torch.Tensor:
        """The current projector as the refresh op's pass-through input (kept for the step if quantized)."""
        if self.pcodes is None:
            return self.p
        if self.src_cache is None:
            self.src_cache = self.projector()
        return self.src_cache

    def seeded_matrix(self, key: torch.Tensor) -> torch.Tensor:
        """The seeded projector for `key`, in the projector's dtype (`p`'s)."""
        return self.kind.generate(key, self.reduced, self.rank, min(self.shape), self.p.dtype)

    def sync_key(self) -> None:
        """Point `key` at the projector of refresh number `refreshes` (seeded projectors)."""
        assert self.key is not None
        self.key.fill_(seed_key(self.seed_base, self.refreshes))

    def low_rank_shape(self) -> tuple[int, int]:
        """Shape of R."""
        m, n = self.shape
        return (self.rank, n) if self.side == "left" else (m, self.rank)


@dataclass(eq=False)
class ParamState:
    """The backend's side of one taken-over parameter."""

    plan: ParamPlan
    config: LowRankConfig
    param_ref: weakref.ref[torch.Tensor]
    # The parameter's storage seen as a plain tensor: the update writes through it.
    view: torch.Tensor
    # Full-size gradient accumulator (full kind only).
    grad: torch.Tensor | None
    group: int
    proj: Projection | None = None
    # Optimizer states, in the rule's order: fp32 tensors, or 8-bit QStates (None before the build).
    ostate: dict[str, Any] | None = None
    binding: OptimizerBinding | None = None
    fresh: bool = True
    backward_calls: int = 0
    calls_since_zero: int = 0
    # States loaded from a checkpoint, moved into `ostate` when the update is next built
    # (runtime/checkpoint.py); `pending_first`: the rule's first step has still to run.
    pending_state: dict[str, Any] | None = None
    pending_first: bool = False
    # Keys of `ostate` that are scalars (step counters), stored (1,) float64.
    scalar_keys: tuple[str, ...] = ()
    # The method's own states (lowrank_compile/methods: `Method.state_shapes`), compute dtype;
    # `pending_mstate`: loaded from a checkpoint, moved into `mstate` with `pending_state`.
    mstate: dict[str, torch.Tensor] = field(default_factory=dict)
    pending_mstate: dict[str, torch.Tensor] | None = None
    # Updates applied so far: the salt of the 8-bit settle rule's rounding (runtime/quant.py).
    # Saved in checkpoints, so a resumed run rounds as the uninterrupted one.
    rounds: int = 0
    _salt: torch.Tensor | None = None
    # Data-parallel reduction (runtime/dist.py): the DDP group, whether the buffers hold
    # contributions no reduction has summed yet or that one is in flight, over how many ranks
    # the window's gradient was averaged, and the sums of squares after the last reduction.
    dp: Any = None
    unreduced: bool = False
    in_flight: bool = False
    reduced_world: int = 1
    quad_base: list[torch.Tensor] | None = None
    # update_in_backward: the op's name for this state (runtime/update_op.py), and whether the
    # backward already updated the parameter since the last opt.step().
    token: int = 0
    done: bool = False
    # clip_stats="auto" (backend.py's "lean" variant): whether the parameter has been updated,
    # whether a clip ever read its gradient (both saved in checkpoints), and whether the step's
    # backward skipped the statistics (sum(G^2), max|G|) that clip_grad_norm_ needs.
    stepped: bool = False
    clip_seen: bool = False
    no_stats: bool = False

    def lean_ok(self) -> bool:
        """True when this parameter's backward may skip the statistics clip_grad_norm_ reads."""
        return self.config.clip_stats == "auto" and self.stepped and not self.clip_seen

    def contributions(self) -> int:
        """How many gradients the buffers sum (backward calls, times ranks once reduced)."""
        return self.calls_since_zero * self.reduced_world

    def salt_tensor(self) -> torch.Tensor:
        """`rounds` as a (1,) int64 tensor on the parameter's device (a graph input, no recompiles)."""
        if self._salt is None:
            self._salt = torch.zeros(1, dtype=torch.int64, device=self.view.device)
        self._salt.fill_(self.rounds)
        return self._salt

    @classmethod
    def create(cls, p: torch.Tensor, plan: ParamPlan, config: LowRankConfig) -> ParamState:
        """Allocate the state for parameter `p` under `plan`."""
        assert plan.group is not None
        proj = None
        grad = None
        if plan.kind is Kind.PROJECTED:
            assert plan.rank is not None and plan.side in ("left", "right")
            proj = _make_projection(p, plan, config)
        elif not config.update_in_backward:
            # update_in_backward: the update reads the graph's gradient; no buffer (`ensure_accumulators`).
            grad = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
        return cls(
            plan=plan,
            config=config,
            param_ref=weakref.ref(p),
            view=p.detach(),
            grad=grad,
            group=plan.group,
            proj=proj,
        )

    @property
    def param(self) -> torch.Tensor | None:
        """The parameter, or None once it has been freed."""
        return self.param_ref()

    @property
    def projected(self) -> bool:
        """True for GaLore-projected parameters."""
        return self.proj is not None

    # ------------------------------------------------------------- inputs of the backward graph
    def input_for(self, role: str) -> torch.Tensor:
        """The tensor fed to the backward graph for placeholder `role` (see consume-grads)."""
        if role == "grad":
            if self.proj is None:
                assert self.grad is not None
                return self.grad
            if self.proj.full is None:
                self.proj.full = torch.zeros(self.view.shape, dtype=self.view.dtype, device=self.view.device)
            return self.proj.full
        if role == "token":
            from lowrank_compile.runtime.update_op import token_of

            return constant(torch.device("cpu"), token_of(self))
        pj = self.proj
        assert pj is not None, role
        if role == "proj":
            return pj.p
        if role in ("pcodes", "pqparams"):
            t = getattr(pj, role)
            assert t is not None, role
            return t
        if role == "pkey":
            from lowrank_compile.runtime.refresh import advance_seeded

            advance_seeded(self)
            assert pj.key is not None
            return pj.key
        if role == "basis":
            if pj.basis is None:  # svd in refresh mode: the op takes an empty basis
                return torch.zeros(0, device=self.view.device, dtype=self.view.dtype)
            return pj.basis
        if role == "index":
            assert pj.index is not None
            return pj.index
        if role == "rgrad":
            return pj.r_acc
        if role == "sq":
            return pj.sq
        if role == "amax":
            return pj.amax
        if role.startswith("refresh_"):
            return self._refresh_input(role)
        if role == "clip_omega":
            return self.clip_omega()
        if role in ("clip_y", "clip_diag", "sq_r"):
            self._ensure_clip_sketch()
            t = getattr(pj, role)
            assert t is not None
            return t
        if role in ("omega", "sketch_y"):
            self._ensure_sketch()
            t = getattr(pj, role)
            assert t is not None
            return t
        raise KeyError(role)

    def _refresh_input(self, role: str) -> torch.Tensor:
        """Inputs of consume-grads' "refresh" mode (see runtime/refresh_op.py).

        Asked in the order code, src, dst on every backward call. The first backward call that
        finds the parameter due (since the last update or zero_grad) refreshes; later ones pass
        the chosen projector through.
        """
        from lowrank_compile.runtime import refresh_op

        pj = self.proj
        assert pj is not None
        current = pj.index if pj.index is not None else pj.current_matrix_input()
        due = pj.refresh_due()
        if role == "refresh_code":
            code = refresh_op.PASS
            if due and not pj.bwd_refreshed:
                code = refresh_op.REFRESH if pj.has_p else refresh_op.REFRESH_FIRST
                if self.dp is not None:  # average the gradient over the ranks first
                    code = refresh_op.with_group(code, self.dp.gid)
                pj.bwd_refreshed = True
                if pj.refresh_buf is None:
                    pj.refresh_buf = torch.empty_like(current)
            pj.refresh_code_now = code
            return constant(self.view.device, code)
        buf = pj.refresh_buf if due and pj.bwd_refreshed else None
        if role == "refresh_src":
            return buf if buf is not None and pj.refresh_code_now == refresh_op.PASS else current
        if role == "refresh_dst":
            return buf if buf is not None else current
        raise KeyError(role)

    def _ensure_sketch(self) -> None:
        """Make this refresh step's test matrix and sketch accumulator (once per step)."""
        pj = self.proj
        assert pj is not None
        if pj.omega is not None:
            return
        k = pj.kind.sketch_width(pj.rank, pj.reduced)
        dev, dt = self.view.device, self.view.dtype
        gen = torch.Generator(device="cpu").manual_seed(_seed(self.plan.name, pj.refreshes))
        omega = torch.randn(pj.kept, k, generator=gen)
        if pj.has_p and bool(torch.isfinite(pj.r_acc).all()) and pj.r_acc.abs().sum() > 0:
            # Warm start: the row space of the last projected gradient (one subspace iteration).
            rows = pj.r_acc if pj.side == "left" else pj.r_acc.t()  # r x e
            q = torch.linalg.qr(rows.t().double().cpu()).Q.float()
            scale = omega[:, q.shape[1] :].norm(dim=0).mean() if k > q.shape[1] else torch.tensor(1.0)
            omega[:, : q.shape[1]] = q * scale
        pj.omega = omega.to(device=dev, dtype=dt)
        pj.sketch_y = torch.zeros(pj.reduced, k, device=dev, dtype=compute_dtype(dt))

    def _ensure_clip_sketch(self) -> None:
        """Allocate the clip residual sketch's buffers once (its test matrix: `clip_test_matrix`)."""
        pj = self.proj
        assert pj is not None
        if pj.clip_y is None:
            k = self.config.clip_sketch
            dev, dt = self.view.device, self.view.dtype
            pj.clip_y = torch.zeros(pj.reduced, k, device=dev, dtype=compute_dtype(dt))
            pj.clip_diag = torch.zeros(k, device=dev, dtype=_stat_dtype(dt))
            pj.sq_r = torch.zeros((), device=dev, dtype=_stat_dtype(dt))

    def clip_omega(self) -> torch.Tensor:
        """This accumulation window's +-1 test matrix (e x k) for the clip sketch."""
        pj = self.proj
        assert pj is not None
        cfg, v = self.config, self.view
        return clip_test_matrix(pj.kept, cfg.clip_sketch, v.dtype, v.device, self.rounds)

    def clip_k(self) -> int:
        """Width of this parameter's clip residual sketch (0 = none).

        0 for full-rank parameters and under `grad_accumulation="full"` (the full buffer is exact).
        """
        pj = self.proj
        if pj is None or self.config.keeps_full_gradient:
            return 0
        return self.config.clip_sketch

    def clip_buffers(self) -> tuple[torch.Tensor, ...] | None:
        """(clip_omega, clip_y, clip_diag, sq_r) for eager accumulation, or None when the sketch is off."""
        if self.clip_k() == 0:
            return None
        self._ensure_clip_sketch()
        pj = self.proj
        assert pj is not None and pj.clip_y is not None and pj.clip_diag is not None and pj.sq_r is not None
        return (self.clip_omega(), pj.clip_y, pj.clip_diag, pj.sq_r)

    def accumulated_projector(self) -> torch.Tensor:
        """The d x r projector this step's R is accumulated with (the new one after a backward refresh)."""
        pj = self.proj
        assert pj is not None
        if pj.bwd_refreshed and pj.refresh_buf is not None:
            if pj.basis is not None:
                return pj.basis.index_select(1, pj.refresh_buf)
            if pj.pcodes is not None:  # as the backward's refresh consumer: P as stored
                from lowrank_compile.runtime.projector_quant import roundtrip

                return roundtrip(pj.refresh_buf, pj.pbits)
            return pj.refresh_buf
        return pj.projector()

    # ------------------------------------------------------------- eager-side accumulation
    def ensure_accumulators(self) -> None:
        """Allocate the gradient buffers `update_in_backward` does without (for an eager gradient)."""
        if self.proj is None:
            if self.grad is None:
                self.grad = torch.zeros(self.view.shape, dtype=self.view.dtype, device=self.view.device)
            return
        pj = self.proj
        low = pj.low_rank_shape()
        if tuple(pj.r_acc.shape) != low:
            pj.r_acc = torch.zeros(low, dtype=compute_dtype(self.view.dtype), device=self.view.device)

    def release_accumulators(self) -> None:
        """`update_in_backward`: drop the gradient buffers once the update has read them.

        A randomized projector keeps R: the next refresh's sketch starts from its row space.
        """
        if self.proj is None:
            self.grad = None
            return
        pj = self.proj
        pj.full = None
        if pj.kind.refresh_from != "sketch":
            pj.r_acc = shared_scratch((0,), pj.r_acc.dtype, pj.r_acc.device)  # empty: no bytes

    def accumulate(self, g: torch.Tensor) -> None:
        """Add a gradient computed outside the compiled backward (what autograd left in .grad)."""
        g = g.detach()
        self.ensure_accumulators()
        if self.fresh:
            self.no_stats = False  # the eager consumers below compute the statistics
        if self.proj is None:
            assert self.grad is not None
            if self.fresh:
                self.grad.copy_(g)
            else:
                self.grad.add_(g)
        else:
            from lowrank_compile.passes.consume_grads import consume_full
            from lowrank_compile.passes.consume_grads import consume_project
            from lowrank_compile.passes.consume_grads import consume_stats
            from lowrank_compile.runtime.refresh import advance_seeded

            pj = self.proj
            advance_seeded(self)
            refreshing = pj.refresh_due()
            fresh = constant(g.device, self.fresh)
            # The consumers the compiled backward runs, called eagerly.
            if self.config.keeps_full_gradient or (
                refreshing and pj.kind.refresh_from == "gradient" and not pj.bwd_refreshed
            ):
                consume_full(g, fresh, self.input_for("grad"))
                consume_stats(g, fresh, pj.sq, pj.amax)
            else:
                extra: list[torch.Tensor] = []
                sketch = refreshing and pj.kind.refresh_from == "sketch"
                if sketch:
                    self._ensure_sketch()
                    assert pj.omega is not None and pj.sketch_y is not None
                    extra += [pj.omega.to(g.dtype), pj.sketch_y]
                clip = self.clip_buffers()
                extra += list(clip or ())
                proj = self.accumulated_projector().to(g.dtype)
                left = pj.side == "left"
                consume_project(
                    g,
                    fresh,
                    proj,
                    pj.r_acc,
                    pj.sq,
                    pj.amax,
                    *extra,
                    left=left,
                    sketch=sketch,
                    clip=clip is not None,
                    orthonormal=pj.kind.orthonormal,
                )
        self.fresh = False
        self.calls_since_zero += 1
        if self.dp is not None:
            self.unreduced = True

    def gradient_buffers(self) -> list[torch.Tensor]:
        """The buffers linear in this step's gradient, for loss-scale unscaling and inf checks.

        Projection is linear, so an inf/NaN in G reaches R, and it always reaches max|G|. The sum
        of squares is not linear (it scales by the square) and is left to the caller.
        """
        if self.proj is None:
            assert self.grad is not None
            return [self.grad]
        pj = self.proj
        bufs = [pj.r_acc, pj.amax] + [t for t in (pj.full, pj.sketch_y, pj.clip_y) if t is not None]
        return bufs

    def quadratic_buffers(self) -> list[torch.Tensor]:
        """The buffers quadratic in this step's gradient (sums of squares): they scale by a factor squared."""
        pj = self.proj
        if pj is None:
            return []
        return [t for t in (pj.sq, pj.clip_diag, pj.sq_r) if t is not None]

    def zero_grad(self, set_to_none: bool) -> None:
        """Eager `zero_grad` semantics: forget the gradient, or zero it when there is one."""
        if self.dp is not None:
            from lowrank_compile.runtime import dist

            dist.discard(self)
        if self.fresh:
            return
        self.calls_since_zero = 0
        if set_to_none:
            self.fresh = True
            if self.proj is not None:
                self._drop_step_buffers()
            return
        if self.proj is None:
            assert self.grad is not None
            self.grad.zero_()
            return
        pj = self.proj
        for t in (pj.r_acc, pj.sq, pj.amax, pj.full, pj.sketch_y, pj.clip_y, pj.clip_diag, pj.sq_r):
            if t is not None:
                t.zero_()
        # A projector chosen from the discarded gradient is forgotten: the next backward chooses.
        pj.refresh_buf, pj.bwd_refreshed, pj.src_cache = None, False, None

    def _drop_step_buffers(self) -> None:
        pj = self.proj
        assert pj is not None
        pj.full = None
        pj.omega = pj.sketch_y = None
        pj.refresh_buf, pj.bwd_refreshed, pj.src_cache = None, False, None

    def owned_bytes(self) -> dict[str, int]:
        """Bytes of the tensors this state owns, by category."""

        def nbytes(*ts: torch.Tensor | None) -> int:
            return sum(t.numel() * t.element_size() for t in ts if t is not None)

        if self.proj is None:
            return {"gradients": nbytes(self.grad), "projectors": 0}
        pj = self.proj
        projector = nbytes(pj.index) if pj.index is not None else nbytes(pj.p, pj.pending_p)
        projector += nbytes(pj.refresh_buf, pj.pcodes, pj.pqparams, pj.src_cache)
        return {
            "gradients": nbytes(
                pj.r_acc, pj.sq, pj.amax, pj.full, pj.sketch_y, pj.clip_y, pj.clip_diag, pj.sq_r
            ),
            "projectors": projector + nbytes(pj.omega),
            "virtual": 0,  # one element: see `shape_carrier`
        }


_CONSTANTS: dict[tuple[torch.device, type, int], torch.Tensor] = {}


def constant(device: torch.device, value: bool | int) -> torch.Tensor:
    """A cached 0-d tensor holding `value` (bool or int64): the backward graph's flag and code inputs."""
    key = (device, type(value), int(value))  # the type keeps True and 1 apart
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = torch.tensor(value, device=device)
    return t


def compute_dtype(dt: torch.dtype) -> torch.dtype:
    """The dtype the update computes in: fp32 for bf16/fp16 parameters, else the parameter's own."""
    return torch.float32 if dt in (torch.bfloat16, torch.float16) else dt


def _stat_dtype(dt: torch.dtype) -> torch.dtype:
    """The dtype of the ||G||^2 and max|G| accumulators: fp32, or the parameter's when wider."""
    return torch.float64 if dt == torch.float64 else torch.float32


def _seed(name: str, refresh: int) -> int:
    import zlib

    return (zlib.crc32(name.encode()) * 1_000_003 + refresh) % (2**63)


def name_seed(name: str) -> int:
    """The 32-bit seed of a parameter's seeded projectors: a function of its name only."""
    return _seed(name, 0) & 0xFFFFFFFF


def _make_projection(p: torch.Tensor, plan: ParamPlan, config: LowRankConfig) -> Projection:
    assert plan.rank is not None and plan.side in ("left", "right")
    side: proj_math.Side = "left" if plan.side == "left" else "right"
    m, n = p.shape
    shape = (int(m), int(n))
    r = plan.rank
    d = m if side == "left" else n
    low = (r, n) if side == "left" else (m, r)
    dev, dt = p.device, p.dtype
    basis = index = None
    key = None
    kind = projectors.get(config.projector)
    pmat = kind.initial(d, r, _seed(plan.name, -1), dev, dt)  # empty unless stored as a matrix
    if kind.storage == "basis":
        basis = kind.shared_basis(d, dt, dev)
        index = torch.arange(r, device=dev)  # the first r columns until the first refresh
    elif kind.storage == "seeded":
        key = torch.zeros(1, device=dev, dtype=torch.int64)
    # update_in_backward: R is a graph temporary unless the kind keeps it (a sketch's warm start).
    in_step = not config.update_in_backward or kind.refresh_from == "sketch"
    pcodes = pqparams = None
    if config.projector_bits != 32:
        from lowrank_compile.runtime import projector_quant

        pcodes, pqparams = projector_quant.quantize(pmat, config.projector_bits)
        pmat = torch.zeros(0, device=dev, dtype=dt)  # the codes hold it
    return Projection(
        side=side,
        rank=r,
        method=config.projector,
        shape=shape,
        p=pmat,
        # Low-rank accumulators and the rule's parameter in the compute dtype (fp32 for bf16/fp16
        # parameters); the projector stays in the parameter's dtype for the GEMMs.
        # update_in_backward: R is a graph temporary (the randomized sketch's warm start keeps one).
        r_acc=torch.zeros(low, device=dev, dtype=compute_dtype(dt))
        if in_step
        else shared_scratch((0,), compute_dtype(dt), dev),
        sq=torch.zeros((), device=dev, dtype=_stat_dtype(dt)),
        amax=torch.zeros((), device=dev, dtype=_stat_dtype(dt)),
        virtual=shape_carrier(low, compute_dtype(dt), dev),
        basis=basis,
        index=index,
        key=key,
        seed_base=name_seed(plan.name),
        pbits=config.projector_bits,
        pcodes=pcodes,
        pqparams=pqparams,
        gap=config.update_gap,
    )


_STATES: WeakIdKeyDictionary = WeakIdKeyDictionary()
_DECIDED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def lookup(p: torch.Tensor) -> ParamState | None:
    """The state of a taken-over parameter, or None."""
    return _STATES.get(p)


def decided(p: torch.Tensor) -> ParamPlan | None:
    """The plan made for `p` by an earlier graph, if any (taken over or not)."""
    return _DECIDED.get(p)


def register(p: torch.Tensor, plan: ParamPlan, state: ParamState | None) -> None:
    """Record the plan for `p`, and its state when it is taken over."""
    _DECIDED[p] = plan
    if state is not None:
        _STATES[p] = state


def registry_items() -> list[tuple[torch.Tensor, ParamPlan]]:
    """Every live parameter with a plan, in no particular order."""
    return list(_DECIDED.items())


def registry_states() -> list[ParamState]:
    """Every live taken-over parameter's state."""
    return list(_STATES.values())


_SCRATCH: dict[tuple[tuple[int, ...], torch.dtype, torch.device], torch.Tensor] = {}


def shape_carrier(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `shape` that holds one element (stride 0): the update reads only its shape and dtype."""
    return shared_scratch((), dtype, device).expand(tuple(int(d) for d in shape))


def shared_scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One zeroed buffer per (shape, dtype, device), shared by every parameter that needs it."""
    key = (tuple(int(d) for d in shape), dtype, torch.device(device))
    t = _SCRATCH.get(key)
    if t is None:
        t = _SCRATCH[key] = torch.zeros(key[0], dtype=dtype, device=device)
    return t


def scratch_bytes() -> int:
    """Bytes of the shared scratch buffers and clip test matrices."""
    return sum(t.numel() * t.element_size() for t in _SCRATCH.values()) + sum(
        t.numel() * t.element_size() for _, t in _CLIP_OMEGA.values()
    )


_CLIP_OMEGA: dict[tuple[int, int, torch.dtype, torch.device], tuple[int, torch.Tensor]] = {}


def clip_test_matrix(e: int, k: int, dtype: torch.dtype, device: torch.device, rounds: int) -> torch.Tensor:
    """The clip sketch's e x k test matrix (entries +-1) for update count `rounds`.

    A pure function of its arguments: one tensor is kept per (e, k, dtype, device), drawn again
    when `rounds` changes, so every parameter with the same e shares it within a window, and a
    resumed run (`rounds` travels in checkpoints) draws what the uninterrupted one drew.
    """
    key = (int(e), int(k), dtype, torch.device(device))
    hit = _CLIP_OMEGA.get(key)
    if hit is not None and hit[0] == rounds:
        return hit[1]
    gen = torch.Generator(device="cpu").manual_seed((e * 1_000_003 + rounds) * 7919 + k)
    signs = torch.randint(0, 2, (e, k), generator=gen, dtype=torch.int8)
    t = (signs * 2 - 1).to(device=device, dtype=dtype)
    _CLIP_OMEGA[key] = (rounds, t)
    return t


def registry_clear() -> None:
    """Forget every plan and state (used by `lowrank_compile.reset`)."""
    _SCRATCH.clear()
    _CLIP_OMEGA.clear()
    _STATES.clear()
    _DECIDED.clear()
