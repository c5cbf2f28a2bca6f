"""Graph passes, one file each. `PASSES` maps each pass name to its class, imported lazily.

The order in which they run is not here: it is in `lowrank_compile.pipeline`, one linear
function with the reason for each position.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["PASSES", "get_pass"]

# name -> "module:Class"; a test checks that every key equals the class's `name`.
PASSES: dict[str, str] = {
    "consume-grads": "lowrank_compile.passes.consume_grads:ConsumeGradients",
    "hoist-scalars": "lowrank_compile.passes.hoist_scalars:HoistScalars",
}


def get_pass(name: str) -> Any:
    """Import and return the pass class registered under `name`."""
    try:
        target = PASSES[name]
    except KeyError:
        raise KeyError(f"unknown pass {name!r}; known passes: {', '.join(PASSES)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)
