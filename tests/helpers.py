"""Shared test helpers: run a training step eagerly and compiled, and compare trajectories."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are all zeros)."""
    denom = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / denom if denom > 0 else diff


def worst_rel_err(m1: nn.Module, m2: nn.Module) -> tuple[float, str]:
    worst, where = 0.0, ""
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        e = rel_err(a.detach(), b.detach())
        if e > worst:
            worst, where = e, n
    return worst, where


def make_step(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable, sched: Any = None):
    """The ordinary training step a user writes."""

    def step(batch):
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    return step


def paired(build: Callable[[], nn.Module], make_opt: Callable[[nn.Module], torch.optim.Optimizer]):
    """The same model and optimizer twice: (eager pair, pair for the compiled step)."""
    eager_model = build()
    model = copy.deepcopy(eager_model)
    return (eager_model, make_opt(eager_model)), (model, make_opt(model))


def projected_names(model: nn.Module) -> list[str]:
    """Names of the parameters of `model` the backend took over with GaLore projection."""
    from lowrank_compile.plan import Kind
    from lowrank_compile.runtime.state import lookup

    out = []
    for n, p in model.named_parameters():
        st = lookup(p)
        if st is not None and st.plan.kind is Kind.PROJECTED:
            out.append(n)
    return out


def input_roles(monkeypatch: Any) -> set[str]:
    """The roles of every backward-graph input the backend feeds from now on (`ParamState.input_for`)."""
    from lowrank_compile.runtime.state import ParamState

    roles: set[str] = set()
    input_for = ParamState.input_for

    def spy(self: Any, role: str) -> torch.Tensor:
        roles.add(role)
        return input_for(self, role)

    monkeypatch.setattr(ParamState, "input_for", spy)
    return roles


def train_beside_galore_reference(
    make_opt: Callable, ref_rule: str, basis: Callable, options: dict, projected: list[str], tol: float
) -> nn.Module:
    """7 steps of the float64 MLP: the compiled lowrank step against the eager GaLore reference.

    Both use rank 8, a refresh every 3 updates (at 0, 3, 6), scale 0.25 and proj_type "std"; the
    reference takes its projectors from `basis` (galore_reference.GaLoreReference). Asserts the
    largest relative parameter difference after every step is at most `tol`; returns the
    compiled run's model.
    """
    from galore_reference import GaLoreReference
    from models import mlp
    from models import mlp_batch
    from models import mlp_loss

    base = mlp().double()
    rm, cm = copy.deepcopy(base), copy.deepcopy(base)
    ro, co = make_opt(rm.parameters()), make_opt(cm.parameters())
    ref = GaLoreReference(rm, ro, projected, 8, 3, 0.25, "std", ref_rule, basis=basis)
    opts = {"rank": 8, "update_gap": 3, "state_bits": 32, "min_dim": 4, **options}

    def step(batch):
        mlp_loss(cm, batch).backward()
        co.step()
        co.zero_grad()

    cstep = torch.compile(step, backend="lowrank", options=opts)
    for i in range(7):
        x, y = mlp_batch(i)
        mlp_loss(rm, (x.double(), y)).backward()
        ref.step()
        ref.zero_grad()
        cstep((x.double(), y))
        pairs = zip(cm.parameters(), rm.parameters())
        worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in pairs)
        assert worst <= tol, (i, worst)
    return cm
