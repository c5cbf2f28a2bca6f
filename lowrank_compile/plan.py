"""The per-parameter plan: what the backend takes over, what it leaves to torch.optim, and why.

`make_plan` is a pure function of the parameters, their owners and the config, so it can be
tested and printed without compiling anything.
"""

from __future__ import annotations

import enum
import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lowrank_compile import projectors
from lowrank_compile.config import LowRankConfig
from lowrank_compile.optimizers import rule_for
from lowrank_compile.optimizers import supported_names

__all__ = ["Kind", "ParamPlan", "Plan", "make_plan", "revisable"]

FROZEN = "requires_grad=False"
NO_OPTIMIZER = "no torch.optim optimizer holds it"


class Kind(str, enum.Enum):
    """How one parameter is trained."""

    PROJECTED = "projected"  # taken over: gradient projected to rank r in backward, states r-sized
    FULL = "full"  # taken over: gradient consumed in backward, full-rank states owned by the backend
    TORCH = "torch"  # left to torch.optim, untouched

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ParamPlan:
    """The decision for one parameter."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: Kind
    reason: str
    optimizer: str | None
    group: int | None
    rank: int | None
    state_bytes: int  # optimizer-state bytes under this plan (backend's or torch.optim's)
    eager_state_bytes: int  # what eager torch.optim with the same optimizer would keep
    role: str = "other"  # from roles.param_roles: matmul / output / embedding / conv / other
    side: str | None = None  # projected: "left" (P is m x r) or "right" (P is n x r)
    method: str | None = None  # projected: the method (lowrank_compile/methods) that updates it
    projector_bytes: int = 0  # projected: bytes of the stored projector
    # True when the user probably expected the backend to take the parameter over (unsupported
    # optimizer or settings, no optimizer found): the backend warns once about these.
    surprising: bool = False

    @property
    def numel(self) -> int:
        """Number of elements of the parameter."""
        return math.prod(self.shape)

    @property
    def taken_over(self) -> bool:
        """True when the backend owns this parameter's gradient and update."""
        return self.kind is not Kind.TORCH


@dataclass
class Plan:
    """All parameter decisions of one compiled program, in discovery order."""

    params: list[ParamPlan]

    def taken_over(self) -> list[ParamPlan]:
        """The parameters the backend owns."""
        return [p for p in self.params if p.taken_over]

    def state_bytes(self) -> tuple[int, int]:
        """(optimizer-state bytes under the plan, bytes eager torch.optim would keep)."""
        return sum(p.state_bytes for p in self.params), sum(p.eager_state_bytes for p in self.params)

    def table(self) -> str:
        """A fixed-width text table, one row per parameter, and a totals line."""
        header = ("name", "shape", "kind", "method", "rank", "optimizer", "state B", "eager B", "reason")
        rows = [
            (
                p.name,
                "x".join(map(str, p.shape)) or "scalar",
                str(p.kind),
                p.method or "-",
                "-" if p.rank is None else f"{p.rank} {p.side}",
                "-" if p.optimizer is None else f"{p.optimizer}[{p.group}]",
                str(p.state_bytes),
                str(p.eager_state_bytes),
                p.reason,
            )
            for p in self.params
        ]
        ours, eager = self.state_bytes()
        proj = sum(p.projector_bytes for p in self.params)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        ratio = f" ({100.0 * ours / eager:.1f}% of eager)" if eager else ""
        lines.append(
            f"optimizer state: {ours} B under the plan vs {eager} B eager{ratio}; projectors: {proj} B"
        )
        return "\n".join(lines)


@dataclass(frozen=True)
class ParamInfo:
    """What `make_plan` needs to know about one parameter."""

    name: str
    param: torch.Tensor
    owners: Sequence[tuple[torch.optim.Optimizer, int]]
    role: str = "other"
    wrapper: str | None = None  # the sharding wrapper it is trained under (FSDP), if any


def _state_bytes(numel: int, elt: int, state_bits: int) -> int:
    """Bytes of one optimizer state of `numel` values as the backend stores it."""
    from lowrank_compile.runtime.quant import BLOCK
    from lowrank_compile.runtime.quant import MIN_QUANT_NUMEL

    if state_bits == 8 and numel >= MIN_QUANT_NUMEL:
        blocks = -(-numel // BLOCK)
        return blocks * BLOCK + 4 * blocks  # uint8 codes (padded to whole blocks) + fp32 absmax
    return numel * elt


def _method_state_bytes(
    name: str,
    opt: torch.optim.Optimizer,
    config: LowRankConfig,
    shape: tuple[int, ...],
    side: Any,
    rule_keys: tuple[tuple[str, bool], ...],
    dtype: torch.dtype,
) -> int:
    """Bytes of the method's own states of a projected parameter (checks the method accepts `opt`)."""
    from lowrank_compile import methods
    from lowrank_compile.config import LowRankOptionError
    from lowrank_compile.runtime.state import compute_dtype

    method = methods.make(config)
    if method.name != "galore" and type(opt).__name__ not in methods.OPTIMIZERS:
        raise LowRankOptionError(
            f"lowrank option 'method': {method.name!r} is defined for {' and '.join(methods.OPTIMIZERS)}; "
            f"{name} is trained by {type(opt).__name__}; accepted values with this optimizer: 'galore'"
        )
    size = torch.empty((), dtype=compute_dtype(dtype)).element_size()
    own = method.state_shapes((shape[0], shape[1]), side, rule_keys)
    return sum(math.prod(s.shape) * (8 if s.counter else size) for s in own)


def _matches(name: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def _short_side(shape: tuple[int, ...]) -> int:
    return min(shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (shape[0] if shape else 1)


def plan_param(info: ParamInfo, config: LowRankConfig) -> ParamPlan:
    """Decide how one parameter is trained (see the README's "What the backend takes over")."""
    p = info.param
    shape = tuple(p.shape)
    elt = p.element_size()

    def decide(
        kind: Kind,
        reason: str,
        opt: torch.optim.Optimizer | None = None,
        group: int | None = None,
        surprising: bool = False,
        rank: int | None = None,
        side: str | None = None,
    ) -> ParamPlan:
        eager = ours = proj = 0
        if opt is not None and group is not None:
            rule = rule_for(opt)
            if rule is not None:
                per = rule.states_per_param(opt.param_groups[group])
                counter = 1 if rule.step_counter else 0
                eager = per * p.numel() * elt + 4 * counter  # torch.optim: fp32 step counter
                ours = eager
                if kind is not Kind.TORCH:
                    numel = p.numel()
                    if kind is Kind.PROJECTED and rank is not None:
                        m, n = shape
                        kept = n if side == "left" else m
                        reduced = m if side == "left" else n
                        numel = rank * kept
                        proj = projectors.stored_bytes(
                            config.projector, reduced, rank, elt, config.projector_bits
                        )
                    # The backend's step counter is float64 (8 B).
                    ours = per * _state_bytes(numel, elt, config.state_bits) + 8 * counter
                    if kind is Kind.PROJECTED and rank is not None:
                        keys = (("step", True),) * counter + tuple((f"s{i}", False) for i in range(per))
                        ours += _method_state_bytes(info.name, opt, config, shape, side, keys, p.dtype)
        return ParamPlan(
            method=config.method if kind is Kind.PROJECTED else None,
            name=info.name,
            shape=shape,
            dtype=p.dtype,
            kind=kind,
            reason=reason,
            optimizer=type(opt).__name__ if opt is not None else None,
            group=group,
            rank=rank,
            state_bytes=ours,
            eager_state_bytes=eager,
            surprising=surprising,
            role=info.role,
            side=side,
            projector_bytes=proj,
        )

    if not p.requires_grad:
        return decide(Kind.TORCH, FROZEN)
    if info.wrapper is not None:
        return decide(
            Kind.TORCH,
            f"trained under {info.wrapper}, whose gradient hooks need .grad (the backend does not "
            "consume gradients under sharding wrappers yet)",
            surprising=True,
        )
    if not info.owners:
        return decide(Kind.TORCH, NO_OPTIMIZER, surprising=True)
    if len(info.owners) > 1:
        names = ", ".join(type(o).__name__ for o, _ in info.owners)
        return decide(
            Kind.TORCH,
            f"listed by more than one optimizer/param group ({names}); if one forwards to the other, "
            "name the real one with lowrank_compile.bind(opt) before the first compiled step",
            surprising=True,
        )
    opt, group = info.owners[0]
    rule = rule_for(opt)
    if rule is None:
        return decide(
            Kind.TORCH,
            f"optimizer {type(opt).__name__} is not supported (supported: {', '.join(supported_names())})",
            opt,
            group,
            surprising=True,
        )
    why = rule.unsupported(opt, opt.param_groups[group])
    if why is not None:
        return decide(Kind.TORCH, f"{rule.name} with {why}", opt, group, surprising=True)
    if config.exclude and _matches(info.name, config.exclude):
        return decide(Kind.TORCH, "matched by option exclude", opt, group)
    if not p.dtype.is_floating_point or p.is_sparse or p.is_complex():
        return decide(Kind.TORCH, f"dtype/layout {p.dtype}/{p.layout} not supported", opt, group)
    if p.dim() < 2:
        return decide(Kind.TORCH, "1-D (bias/norm): too small to matter", opt, group)
    short = _short_side(shape)
    if short < config.min_dim:
        return decide(Kind.TORCH, f"short side {short} < min_dim={config.min_dim}", opt, group)
    if config.rank is None:
        return decide(Kind.FULL, "full-rank state in the backend (rank=None)", opt, group)
    # Projection targets: the include globs when given, else hidden matmul weights.
    if config.include:
        target = _matches(info.name, config.include)
        why_not = "not matched by option include"
    else:
        target = info.role == "matmul"
        why_not = {
            "output": "output layer: kept full-rank",
            "embedding": "embedding: kept full-rank",
            "conv": "conv kernel: kept full-rank",
        }.get(info.role, "not a matmul weight: kept full-rank")
    if not target:
        return decide(Kind.FULL, why_not, opt, group)
    if p.dim() != 2:
        return decide(Kind.FULL, f"{p.dim()}-D: only matrices are projected", opt, group)
    rank = config.resolved_rank(shape)
    assert rank is not None
    if rank >= short:
        return decide(Kind.FULL, f"rank {rank} >= short side {short}: kept full-rank", opt, group)
    from lowrank_compile.runtime.projector import choose_side

    side = choose_side((shape[0], shape[1]), config.proj_type)
    what = "matched by option include" if config.include else "hidden matmul weight"
    return decide(Kind.PROJECTED, f"{what}: rank {rank} of {short}", opt, group, rank=rank, side=side)


def revisable(pp: ParamPlan, p: torch.Tensor) -> bool:
    """True when a parameter left to torch.optim may be taken over now.

    That is the case once a frozen parameter trains again, or for a parameter that no optimizer
    held when it was planned (it may since have been added with `add_param_group`).
    """
    return pp.kind is Kind.TORCH and ((pp.reason == FROZEN and p.requires_grad) or pp.reason == NO_OPTIMIZER)


def make_plan(infos: Sequence[ParamInfo], config: LowRankConfig) -> Plan:
    """Plan every parameter in `infos` under `config`."""
    return Plan([plan_param(i, config) for i in infos])
