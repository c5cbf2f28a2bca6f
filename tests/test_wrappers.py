"""Optimizer wrappers (issue #10, part 1): discovery binds the real optimizer behind them.

accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer, a torchtitan-style container
(one optimizer per model part, itself an Optimizer over all parameters) and a user's thin wrapper
all list the parameters too. Before, a parameter listed by two optimizers was left to torch.optim
with a warning, so nothing was taken over. The reference for each wrapped run is the same model
and the same compiled step with the bare optimizer: stepping through the wrapper must change
nothing.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_step
from helpers import worst_rel_err
from models import mlp_batch
from models import mlp_loss
from models import wide_mlp

from lowrank_compile.discovery import find_owners
from lowrank_compile.runtime.state import lookup

OPTIONS = {"rank": 8, "min_dim": 4}


class ThinWrapper(torch.optim.Optimizer):
    """A user's wrapper: never calls Optimizer.__init__, forwards to `self.inner` by properties."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    @property
    def defaults(self):
        return self.inner.defaults

    def step(self, closure=None):
        return self.inner.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)


class Container(torch.optim.Optimizer):
    """torchtitan-style: one optimizer per model part, and an Optimizer over all of them."""

    def __init__(self, parts: list[torch.optim.Optimizer]) -> None:
        self.optimizers = parts
        params = [p for o in parts for g in o.param_groups for p in g["params"]]
        super().__init__(params, {})

    def step(self, closure=None):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none)


def _wrap(kind: str, model: torch.nn.Module):
    """(object the loop steps, the optimizers that really update) for wrapper `kind`."""
    if kind == "container":
        layers = [m for m in model if isinstance(m, torch.nn.Linear)]
        parts = [torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.05) for m in layers]
        return Container(parts), parts
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    if kind == "none":
        return inner, [inner]
    if kind == "thin":
        return ThinWrapper(inner), [inner]
    if kind == "accelerate":
        from accelerate import Accelerator
        from accelerate.optimizer import AcceleratedOptimizer

        Accelerator(cpu=True)
        return AcceleratedOptimizer(inner, device_placement=False), [inner]
    if kind == "lightning":
        from lightning.pytorch.core.optimizer import LightningOptimizer

        return LightningOptimizer(inner), [inner]
    raise AssertionError(kind)


def _run(kind: str, base: torch.nn.Module, steps: int = 4):
    model = copy.deepcopy(base)
    opt, inner = _wrap(kind, model)
    compiled = torch.compile(make_step(model, opt, mlp_loss), backend="lowrank", options=OPTIONS)
    for i in range(steps):
        compiled(mlp_batch(i))
    return model, inner


@pytest.mark.parametrize("kind", ["accelerate", "container", "thin"])
def test_wrapped_optimizer_is_bound_and_matches_the_bare_one(kind):
    import lowrank_compile

    base = wide_mlp()
    ref, _ = _run("none", base)
    lowrank_compile.reset()
    model, inner = _run(kind, base)
    taken = [p for p in model.parameters() if lookup(p) is not None]
    assert len(taken) == 3 and lookup(model[2].weight).proj is not None  # the hidden matrix
    for p in taken:  # bound to the optimizer that really updates it, not to the wrapper
        assert any(lookup(p).binding.opt is o for o in inner)
    # Same compiled math on the same data: Inductor's fp32 rounding only (measured ~1e-7).
    err, where = worst_rel_err(model, ref)
    assert err <= 1e-5, (err, where)


def test_lightning_optimizer_resolves_to_the_inner_one():
    """LightningOptimizer rebinds its class to a subclass of the wrapped class and lists the same
    groups; discovery must pick the inner optimizer. (Stepping it needs a Lightning Trainer.)"""
    model = wide_mlp()
    wrapper, (inner,) = _wrap("lightning", model)
    assert isinstance(wrapper, torch.optim.AdamW)  # what made it look like a second owner
    owners = find_owners(model.parameters())
    for p in model.parameters():
        assert [o for o, _ in owners.optimizer_of(p)] == [inner]


def test_accelerate_grad_scaler_step_restoring_inner_step_keeps_the_binding():
    """With a GradScaler, AcceleratedOptimizer swaps `inner.step` for a patched copy of the step
    it saw at prepare time (before the backend bound it) around every scaler step, then restores
    that copy. The backend's update runs from the optimizer's step post-hook, so it survives."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    import lowrank_compile

    base = wide_mlp()

    def run(wrapped: bool):
        model = copy.deepcopy(base)
        inner = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        if wrapped:
            Accelerator(cpu=True)
            opt = AcceleratedOptimizer(inner, device_placement=False, scaler=scaler)

        def step(batch):
            scaler.scale(mlp_loss(model, batch)).backward()
            if wrapped:
                opt.step()  # scaler.step + scaler.update inside, with inner.step swapped
                opt.zero_grad()
            else:
                scaler.step(inner)
                scaler.update()
                inner.zero_grad()

        compiled = torch.compile(step, backend="lowrank", options=OPTIONS)
        for i in range(4):
            compiled(mlp_batch(i))
        return model, inner

    ref, _ = run(False)
    lowrank_compile.reset()
    model, inner = run(True)
    st = lookup(model[2].weight)
    assert st is not None and st.binding.opt is inner and st.rounds == 4  # four backend updates
    err, where = worst_rel_err(model, ref)
    assert err <= 1e-5, (err, where)


def test_accelerator_clip_counts_taken_over_parameters_and_reset_restores_it():
    """accelerate >= 1.16 sums `get_total_norm` over `p.grad` itself; taken-over parameters have none.

    One backward call, so the backend's norm is exact: it must equal the eager norm of the same
    gradient (fp32 rounding of two sums of squares in another order: measured ~1e-7, bound 1e-5),
    and the clip must scale the projected gradient the step then reads.
    """
    from accelerate import Accelerator

    import lowrank_compile

    original = Accelerator.clip_grad_norm_
    base = wide_mlp()
    eager = copy.deepcopy(base)
    mlp_loss(eager, mlp_batch(0)).backward()
    exact = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in eager.parameters()]))

    model = copy.deepcopy(base)
    accelerator = Accelerator(cpu=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    forward = torch.compile(lambda x: mlp_loss(model, x), backend="lowrank", options=OPTIONS)
    forward(mlp_batch(0)).backward()
    assert lookup(model[2].weight).proj is not None and model[2].weight.grad is None  # held by the backend
    assert Accelerator.clip_grad_norm_ is not original  # wrapped while the optimizer is bound
    norm = accelerator.clip_grad_norm_(model.parameters(), 0.5 * float(exact))
    assert float(norm) == pytest.approx(float(exact), rel=1e-5)
    report = lowrank_compile.clip_report()
    assert report is not None and report.norm == pytest.approx(float(exact), rel=1e-5)
    # The clip scaled the backend's accumulators: the projected gradient's norm is now halved.
    st = lookup(model[2].weight)
    assert float(st.proj.sq.sqrt()) == pytest.approx(float(eager[2].weight.grad.norm()) * 0.5, rel=1e-4)
    opt.step()
    lowrank_compile.reset()
    assert Accelerator.clip_grad_norm_ is original
