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
