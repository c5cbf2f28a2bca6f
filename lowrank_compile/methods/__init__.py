"""GaLore-family methods, one file each, behind the protocol of `base.Method`.

Adding a method: write its file (a frozen dataclass implementing `Method`), add one line to
`_REGISTRY` below and its name to `config.METHODS` with its defaults in `config.METHOD_DEFAULTS`.
"""

from __future__ import annotations

from collections.abc import Callable

from lowrank_compile.config import LowRankConfig
from lowrank_compile.methods.apollo import Apollo
from lowrank_compile.methods.apollo import ApolloMini
from lowrank_compile.methods.base import Method
from lowrank_compile.methods.fira import Fira
from lowrank_compile.methods.frugal import Frugal
from lowrank_compile.methods.galore import GaLore
from lowrank_compile.methods.gradnorm import GradNorm

__all__ = ["Method", "OPTIMIZERS", "make"]

# name -> the method built from the options it reads.
_REGISTRY: dict[str, Callable[[LowRankConfig], Method]] = {
    "galore": lambda c: GaLore(),
    "fira": lambda c: Fira(gamma=float(c.norm_growth_limit or 1.01)),
    "frugal": lambda c: Frugal(
        free_scale=float(c.frugal_free_scale or 0.0), free_rule=str(c.frugal_free_rule)
    ),
    "apollo": lambda c: Apollo(gamma=float(c.norm_growth_limit or 1.01)),
    "apollo-mini": lambda c: ApolloMini(gamma=float(c.norm_growth_limit or 1.01)),
    "gradnorm": lambda c: GradNorm(),
}

# The optimizers the methods other than GaLore are defined for (their rule's step must be linear
# in lr and start from zero states: `Method.rule_lr`, `Method.resets_states`).
OPTIMIZERS = ("Adam", "AdamW")


def make(config: LowRankConfig) -> Method:
    """The method `config.method` names, with its hyper-parameters from `config`."""
    return _REGISTRY[config.method](config)
