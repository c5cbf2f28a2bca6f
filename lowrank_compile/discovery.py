"""Find the optimizers and modules that own a graph's parameters.

Dynamo hands the backend real `nn.Parameter` objects among a graph's example inputs, but not
the optimizer that updates them nor their names. A single scan of the objects the garbage
collector tracks finds both. It runs once per graph that brings parameters not seen before.
"""

from __future__ import annotations

import gc
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field

import torch
from torch import nn

__all__ = ["Owners", "bind", "distributed_wrapper", "find_owners", "wrapped_optimizers"]

# Attributes through which optimizer wrappers reach the optimizer they forward to: accelerate's
# AcceleratedOptimizer (`optimizer`), Lightning's LightningOptimizer (`_optimizer`), torchtitan's
# OptimizersContainer and similar containers (`optimizers`, one per model part).
_INNER_ATTRS = ("optimizer", "_optimizer")
_CHILDREN_ATTR = "optimizers"


@dataclass
class Owners:
    """What the scan found for a set of parameters (keyed by `id(param)`)."""

    optimizers: dict[int, list[tuple[torch.optim.Optimizer, int]]] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    # Parameters held by a module that declares its output layer (transformers'
    # `get_output_embeddings()`), and the parameters of those declared output layers.
    in_declaring_model: set[int] = field(default_factory=set)
    declared_outputs: set[int] = field(default_factory=set)
    # Parameters trained under a sharding wrapper (FSDP), with the wrapper's class name.
    wrappers: dict[int, str] = field(default_factory=dict)
    # Parameters trained under DistributedDataParallel, with the DDP module (runtime/dist.py).
    ddp: dict[int, nn.Module] = field(default_factory=dict)

    def declared_hidden(self, p: torch.Tensor) -> bool:
        """True when `p`'s model names its output layer and `p` is not in it."""
        return id(p) in self.in_declaring_model and id(p) not in self.declared_outputs

    def optimizer_of(self, p: torch.Tensor) -> list[tuple[torch.optim.Optimizer, int]]:
        """Every (optimizer, param-group index) that lists `p`."""
        return self.optimizers.get(id(p), [])

    def wrapper_of(self, p: torch.Tensor) -> str | None:
        """The sharding wrapper `p` is trained under (FSDP, see `distributed_wrapper`), or None."""
        return self.wrappers.get(id(p))

    def ddp_of(self, p: torch.Tensor) -> nn.Module | None:
        """The DistributedDataParallel module `p` is trained under, or None."""
        return self.ddp.get(id(p))

    def name_of(self, p: torch.Tensor, fallback: str) -> str:
        """The parameter's name in its outermost module, or `fallback`."""
        return self.names.get(id(p), fallback)


def _tracked_objects() -> list[object]:
    found: list[object] = []
    # isinstance() on some module-level proxies fires deprecation warnings; they are not ours.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, (torch.optim.Optimizer, nn.Module)):
                    found.append(obj)
            except ReferenceError:  # a dead weakref.proxy raises on isinstance
                continue
    return found


def find_owners(params: Iterable[torch.Tensor]) -> Owners:
    """Scan live objects for the optimizers and modules that hold `params`.

    A parameter's name comes from the module that holds the most of `params` (ties go to the
    innermost such module, so a wrapper adds no prefix), then from the next, and so on, so
    names read like the user's `model.named_parameters()`.
    """
    wanted = {id(p): p for p in params}
    owners = Owners()
    modules: list[nn.Module] = []
    for obj in _tracked_objects():
        if isinstance(obj, torch.optim.Optimizer):
            # An optimizer whose __init__ raised (kept alive by a traceback) has no param_groups.
            for gi, group in enumerate(getattr(obj, "param_groups", None) or ()):
                for p in group["params"]:
                    if wanted.get(id(p)) is p:
                        owners.optimizers.setdefault(id(p), []).append((obj, gi))
        else:
            assert isinstance(obj, nn.Module)
            modules.append(obj)
    for pid, found in owners.optimizers.items():
        owners.optimizers[pid] = _innermost(found)
    for p in wanted.values():
        if (kind := _sharded(p)) is not None:
            owners.wrappers[id(p)] = kind
    holds: list[tuple[int, int, nn.Module]] = []
    for m in modules:
        held = sum(1 for p in m.parameters() if wanted.get(id(p)) is p)
        if held:
            holds.append((-held, sum(1 for _ in m.modules()), m))
    holds.sort(key=lambda t: (t[0], t[1]))
    for _, _, m in holds:
        _declared_output(m, wanted, owners)
        if (kind := distributed_wrapper(m)) is not None:
            for p in m.parameters():
                if wanted.get(id(p)) is p:
                    if kind == DDP:
                        owners.ddp.setdefault(id(p), m)
                    else:
                        owners.wrappers.setdefault(id(p), kind)
    for _, _, root in holds:
        for name, p in root.named_parameters(remove_duplicate=True):
            if wanted.get(id(p)) is p and id(p) not in owners.names:
                owners.names[id(p)] = name
        if len(owners.names) == len(wanted):
            break
    return owners


# Data-parallel wrappers, matched by class name along the MRO, so torch.distributed is not
# imported. DDP's parameters are taken over and leave its Reducer (runtime/dist.py); FSDP's
# gradient hooks need `.grad` (they reduce-scatter it), so its parameters stay with torch.optim.
DDP = "DistributedDataParallel"
_WRAPPERS = (DDP, "FullyShardedDataParallel", "FSDPModule")


def distributed_wrapper(m: object) -> str | None:
    """The name of the data-parallel wrapper `m` is (DDP, FSDP1, an FSDP2 `fully_shard` module), or None."""
    for cls in type(m).__mro__:
        if cls.__name__ in _WRAPPERS and cls.__module__.startswith("torch."):
            return "FSDP2 (fully_shard)" if cls.__name__ == "FSDPModule" else cls.__name__
    return None


def _sharded(p: torch.Tensor) -> str | None:
    """A description for a parameter that is a DTensor (FSDP2, tensor parallel), else None."""
    for cls in type(p).__mro__:
        if cls.__name__ == "DTensor" and cls.__module__.startswith("torch.distributed"):
            return "DTensor (FSDP2 or tensor parallel)"
    return None


def _declared_output(m: nn.Module, wanted: dict[int, torch.Tensor], owners: Owners) -> None:
    """Record the output layer `m` declares (transformers' `get_output_embeddings()`), if any."""
    getter = getattr(m, "get_output_embeddings", None)
    if not callable(getter):
        return
    try:
        out = getter()
    except Exception:  # a model without an output layer may raise; it then declares none
        return
    if not isinstance(out, nn.Module):
        return
    owners.declared_outputs.update(id(p) for p in out.parameters())
    owners.in_declaring_model.update(id(p) for p in m.parameters() if wanted.get(id(p)) is p)


_BOUND: weakref.WeakSet = weakref.WeakSet()


def bind(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Name `opt` as the optimizer the backend binds for its parameters (see `lowrank_compile.bind`)."""
    if not isinstance(opt, torch.optim.Optimizer):
        from lowrank_compile.config import LowRankUsageError

        raise LowRankUsageError(
            f"lowrank_compile.bind: expected the torch.optim.Optimizer that updates the parameters, got "
            f"{type(opt).__name__}; pass the innermost optimizer (e.g. accelerate's `opt.optimizer`)"
        )
    _BOUND.add(opt)
    return opt


def wrapped_optimizers(opt: object) -> list[torch.optim.Optimizer]:
    """The optimizers `opt` forwards to, directly or through further wrappers (not `opt` itself)."""
    out: list[torch.optim.Optimizer] = []
    todo: list[object] = [opt]
    seen = {id(opt)}
    while todo:
        cur = todo.pop()
        children: list[object] = [getattr(cur, a, None) for a in _INNER_ATTRS]
        kids = getattr(cur, _CHILDREN_ATTR, None)
        if isinstance(kids, (list, tuple)):
            children += list(kids)
        elif isinstance(kids, dict):
            children += list(kids.values())
        for c in children:
            if isinstance(c, torch.optim.Optimizer) and id(c) not in seen:
                seen.add(id(c))
                out.append(c)
                todo.append(c)
    return out


def _innermost(found: list[tuple[torch.optim.Optimizer, int]]) -> list[tuple[torch.optim.Optimizer, int]]:
    """Drop the owners that are wrappers of another owner of the same parameter.

    A wrapper lists the parameter too (it forwards `param_groups`), but the real update happens
    in the optimizer it wraps: that one is what the backend binds.
    """
    if len(found) < 2:
        return found
    named = [(o, gi) for o, gi in found if o in _BOUND]
    if len(named) == 1:
        return named
    ids = {id(o) for o, _ in found}
    keep = [(o, gi) for o, gi in found if not any(id(w) in ids for w in wrapped_optimizers(o))]
    # A wrapper reaching its optimizer under another attribute name: it forwards the very same
    # `param_groups` list through a property, while the real optimizer holds it as an attribute.
    shared: dict[int, list[tuple[torch.optim.Optimizer, int]]] = {}
    for o, gi in keep:
        shared.setdefault(id(getattr(o, "param_groups", None)), []).append((o, gi))
    keep = []
    for group in shared.values():
        own = [(o, gi) for o, gi in group if "param_groups" in vars(o)]
        keep += own if len(group) > 1 and len(own) == 1 else group
    return keep or found
