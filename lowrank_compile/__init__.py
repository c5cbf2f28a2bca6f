"""lowrank_compile: a torch.compile backend for memory-efficient training.

    step = torch.compile(step, backend="lowrank", options={"rank": None, "state_bits": 32})

Importing this package is cheap: it loads neither Dynamo, Inductor nor triton, and does not
touch CUDA. The backend itself is registered through the `torch_dynamo_backends` entry point.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any

from lowrank_compile.config import OPTION_DOCS
from lowrank_compile.config import LowRankConfig
from lowrank_compile.config import LowRankOptionError
from lowrank_compile.config import LowRankUsageError
from lowrank_compile.config import parse_options

if TYPE_CHECKING:
    import torch

    from lowrank_compile.plan import Plan
    from lowrank_compile.runtime.clip import ClipReport

__all__ = [
    "OPTION_DOCS",
    "LowRankConfig",
    "LowRankOptionError",
    "LowRankUsageError",
    "bind",
    "clip_report",
    "current_plan",
    "explain",
    "optimizer_state_bytes",
    "parse_options",
    "reset",
]

__version__ = "0.1.0"


def reset() -> None:
    """Forget every plan, unbind every optimizer and reset Dynamo (see `backend.reset`)."""
    from lowrank_compile.backend import reset as _reset

    _reset()


def bind(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Name the optimizer the backend binds, where discovery cannot tell; returns `opt`.

    The backend finds the optimizer of a graph's parameters by itself, and sees through the
    usual wrappers (accelerate, Lightning, containers, wrappers forwarding `param_groups`). When
    two optimizers still list the same parameters, it leaves them to torch.optim and warns;
    `bind(opt)` before the first compiled step says which one really updates them. Raises
    `LowRankUsageError` for an object that is not a torch.optim.Optimizer, or when the
    parameters were already planned without it (call `reset()` first).
    """
    from lowrank_compile.discovery import bind as _bind
    from lowrank_compile.runtime.state import decided

    stale = [
        pp.name
        for group in getattr(opt, "param_groups", [])
        for p in group["params"]
        if (pp := decided(p)) is not None and pp.reason.startswith("listed by more than one")
    ]
    if stale:
        raise LowRankUsageError(
            f"lowrank_compile.bind: {', '.join(stale[:4])} were already planned without a bound optimizer "
            "(left to torch.optim); call bind(opt) before the first compiled step, or "
            "lowrank_compile.reset() first"
        )
    return _bind(opt)


def clip_report() -> ClipReport | None:
    """What the last `clip_grad_norm_` over taken-over parameters measured (None before one).

    The norm, which parameters' norms were estimated (gradient accumulated in low-rank form),
    and the estimate's relative standard error.
    """
    from lowrank_compile.runtime.clip import report

    return report()


def current_plan() -> Plan:
    """The plan of every live parameter any `lowrank` graph has seen so far."""
    from lowrank_compile.plan import Plan
    from lowrank_compile.runtime.state import registry_items

    return Plan([pp for _, pp in registry_items()])


def explain(model: torch.nn.Module | None = None, run: Any = None) -> Any:
    """The backend's memory plan by category; see `lowrank_compile.memory.explain`."""
    from lowrank_compile.memory import explain as _explain

    return _explain(model, run)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Measured optimizer-state bytes of `opt`: torch.optim's own plus the backend's.

    Counts every tensor in `opt.state` and the backend's states for the parameters it took over
    from `opt` (8-bit states at their stored size: codes and per-block absmax), so it can be
    compared with an eager optimizer's `opt.state`. `projectors` (the GaLore projection
    matrices, or DCT indices) is reported separately and is not part of `total`.
    """
    from lowrank_compile.runtime.binding import binding_of

    def tensor_bytes(states: Any) -> int:
        total = 0
        for st in states.values():
            for v in st.values():
                if hasattr(v, "element_size") and hasattr(v, "numel"):
                    total += v.numel() * v.element_size()
        return total

    torch_bytes = tensor_bytes(opt.state)
    binding = binding_of(opt)
    backend_bytes = binding.state_bytes() if binding is not None else 0
    projectors = sum(st.owned_bytes()["projectors"] for st in binding.states) if binding is not None else 0
    return {
        "torch": torch_bytes,
        "backend": backend_bytes,
        "total": torch_bytes + backend_bytes,
        "projectors": projectors,  # GaLore projectors (not optimizer states; reported beside them)
    }
