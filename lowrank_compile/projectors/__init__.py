"""Projector kinds, one file each, behind the protocol of `base.Projector`.

Adding a kind: write its file (a class implementing `Projector`), add one line to `_REGISTRY`
below and its name to `config.PROJECTORS` (a test checks that the two agree).
"""

from __future__ import annotations

from lowrank_compile.projectors.base import Projector
from lowrank_compile.projectors.dct import Dct
from lowrank_compile.projectors.gaussian import Gaussian
from lowrank_compile.projectors.randomized import Randomized
from lowrank_compile.projectors.sparse import Sparse
from lowrank_compile.projectors.svd import Svd

__all__ = ["Projector", "get", "names", "stored_bytes"]

_REGISTRY: dict[str, Projector] = {p.name: p for p in (Svd(), Randomized(), Dct(), Sparse(), Gaussian())}


def get(name: str) -> Projector:
    """The projector kind called `name` (one of `config.PROJECTORS`)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown projector {name!r}; known: {', '.join(_REGISTRY)}") from None


def names() -> tuple[str, ...]:
    """The registered kinds, in registry order."""
    return tuple(_REGISTRY)


def stored_bytes(name: str, d: int, r: int, elt: int, bits: int = 32) -> int:
    """Bytes one d x r projector of kind `name` keeps between steps (`elt`: the parameter's element size).

    A matrix takes d r elements (`bits` < 32: codes and group scales, runtime/projector_quant.py);
    a basis kind r int64 indices (the shared basis counted once elsewhere); a seeded one nothing.
    """
    storage = get(name).storage
    if storage == "basis":
        return 8 * r
    if storage == "seeded":
        return 0
    if bits == 32:
        return d * r * elt
    from lowrank_compile.runtime import projector_quant

    return projector_quant.stored_bytes(d, r, bits)
