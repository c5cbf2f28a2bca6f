"""The contract every graph pass keeps, and the observer that records what it did.

A pass is a frozen dataclass whose fields are its options. It has a `name`, rewrites a
`GraphModule` in place through `__call__`, and returns a `PassRecord`. `uuid()` changes whenever
the pass's source or options change, as Inductor's `CustomGraphPass.uuid()` does, so caches
that key on a pass stay correct.

The base class does the bookkeeping, so a pass only writes `transform`:
- every node created by the pass carries `node.meta["lowrank_pass"] = name` (provenance);
- `counters["lowrank"][name]` grows by the number of rewrites;
- the graph is linted and recompiled;
- the record keeps the readable graph before and after, for `lowrank-compile inspect`.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import hashlib
import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch.fx

__all__ = ["GraphPass", "PassRecord", "PROVENANCE_KEY", "pass_counters"]

PROVENANCE_KEY = "lowrank_pass"

# Rewrites per pass name, for tests and the CLI (mirrors Inductor's counters["inductor"]).
pass_counters: collections.Counter[str] = collections.Counter()


@dataclass
class PassRecord:
    """What one pass did to one graph."""

    name: str
    rewrites: int
    before: str
    after: str
    created: list[str]


class GraphPass(abc.ABC):
    """Base of all passes: subclasses are `@dataclass(frozen=True)` and implement `transform`."""

    name: ClassVar[str]

    @abc.abstractmethod
    def transform(self, gm: torch.fx.GraphModule) -> int:
        """Rewrite `gm.graph` in place; return the number of rewrites made."""

    def __call__(self, gm: torch.fx.GraphModule) -> PassRecord:
        """Run the pass on `gm`, tag what it created, and return the record."""
        before = _readable(gm)
        old = set(gm.graph.nodes)
        rewrites = self.transform(gm)
        created = [n for n in gm.graph.nodes if n not in old]
        for n in created:
            n.meta[PROVENANCE_KEY] = self.name
        gm.graph.lint()
        gm.recompile()
        pass_counters[self.name] += rewrites
        return PassRecord(self.name, rewrites, before, _readable(gm), [n.name for n in created])

    def uuid(self) -> str:
        """A hash of the pass's source file and options."""
        src = inspect.getsourcefile(type(self))
        h = hashlib.sha256()
        if src:
            with open(src, "rb") as f:
                h.update(f.read())
        opts = dataclasses.astuple(self) if dataclasses.is_dataclass(self) else ()
        h.update(repr((self.name, opts)).encode())
        return h.hexdigest()


def _readable(gm: torch.fx.GraphModule) -> str:
    """The graph as text, each created node followed by `# <- pass-name`."""
    lines = []
    for n in gm.graph.nodes:
        text = n.format_node() or str(n)
        tag = n.meta.get(PROVENANCE_KEY)
        lines.append(f"{text}  # <- {tag}" if tag else text)
    return "\n".join(lines)
