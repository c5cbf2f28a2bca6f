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

__all__ = [
    "OPTION_DOCS",
    "LowRankConfig",
    "LowRankOptionError",
    "LowRankUsageError",
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
