"""A compiled graph that trains parameters of which the backend takes over none says so, once.

Causes covered: an unsupported optimizer, and two optimizers listing the same parameters where
neither visibly wraps the other; `lowrank_compile.bind(opt)` settles the last one. A DDP-wrapped
module, once refused here, is now taken over (both wrapping orders, world size 1; the 2-rank
runs are tests/test_ddp.py).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import make_step
from helpers import worst_rel_err
from models import mlp_batch
from models import mlp_loss
from models import wide_mlp
from torch import nn

import lowrank_compile
from lowrank_compile.backend import LowRankWarning
from lowrank_compile.plan import Kind
from lowrank_compile.runtime.state import lookup

OPTIONS = {"rank": 8, "min_dim": 4}


class Net(nn.Module):
    """A user-defined model (Dynamo traces user frames; torch.nn containers it inlines)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(24, 40), nn.Linear(40, 40), nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _ours(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, LowRankWarning)]


@pytest.fixture
def process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("order", ["compile(DDP(model))", "DDP(compile(model))"])
def test_ddp_wrapped_module_is_taken_over_without_warnings(process_group, order):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    ddp = DDP(model)
    if order == "compile(DDP(model))":
        run = torch.compile(ddp, backend="lowrank", options=OPTIONS)
    else:
        ddp = DDP(torch.compile(model, backend="lowrank", options=OPTIONS))
        run = ddp
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ref_step = torch.compile(make_step(ref, ref_opt, mlp_loss), backend="lowrank", options=OPTIONS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(3):
            mlp_loss(run, mlp_batch(i)).backward()
            assert model.b.weight.grad is None  # consumed in the backward, not left to DDP's Reducer
            opt.step()
            opt.zero_grad()
            ref_step(mlp_batch(i))
    # Only the compiled model's own ambiguity: its graph computes no loss, so c.weight may be a
    # hidden layer before a graph break (see roles.py). Nothing about DDP.
    assert all("cannot tell whether c.weight" in m for m in _ours(caught)), _ours(caught)
    assert lookup(model.b.weight) is not None and lookup(model.b.weight).projected
    assert any(n.endswith("b.weight") for n in ddp.parameters_to_ignore)  # out of the Reducer
    # World size 1: averaging is the identity, so this is single-process lowrank (Inductor's
    # fusions differ between the graphs: ~1e-7).
    err, where = worst_rel_err(model, ref)
    assert err < 1e-5, (err, where)


def test_unsupported_optimizer_warns_once_naming_it():
    model = wide_mlp()
    opt = torch.optim.Adadelta(model.parameters())
    step = torch.compile(make_step(model, opt, mlp_loss), backend="lowrank", options=OPTIONS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(3):
            step(mlp_batch(i))
    msgs = _ours(caught)
    assert len(msgs) == 1, msgs
    assert "takes over none" in msgs[0] and "Adadelta is not supported" in msgs[0] and "2.weight" in msgs[0]


class CopyingWrapper(torch.optim.Optimizer):
    """Forwards to `inner`, but keeps its own copy of the param-group list: discovery cannot tell."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner
        self.param_groups = [dict(g) for g in inner.param_groups]
        self.state = inner.state
        self.defaults = inner.defaults

    def step(self, closure=None):
        return self.inner.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)


def test_ambiguous_owners_warn_and_bind_settles_them():
    base = wide_mlp()
    # Without bind: two optimizers list the parameters; nothing is taken over, one warning says why.
    model = copy.deepcopy(base)
    wrapped = CopyingWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2))
    step = torch.compile(make_step(model, wrapped, mlp_loss), backend="lowrank", options=OPTIONS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(mlp_batch(0))
    msgs = _ours(caught)
    assert len(msgs) == 1 and "lowrank_compile.bind(opt)" in msgs[0], msgs
    assert lookup(model[2].weight) is None
    with pytest.raises(lowrank_compile.LowRankUsageError, match="before the first compiled step"):
        lowrank_compile.bind(wrapped.inner)  # too late: the parameters were planned without it
    with pytest.raises(lowrank_compile.LowRankUsageError, match="got dict"):
        lowrank_compile.bind({"params": []})  # type: ignore[arg-type]

    # With bind before the first compiled step: taken over, and the run equals the bare one.
    lowrank_compile.reset()
    bare_model, model = copy.deepcopy(base), copy.deepcopy(base)
    bare = torch.compile(
        make_step(bare_model, torch.optim.AdamW(bare_model.parameters(), lr=1e-2), mlp_loss),
        backend="lowrank",
        options=OPTIONS,
    )
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    wrapped = CopyingWrapper(lowrank_compile.bind(inner))
    step = torch.compile(make_step(model, wrapped, mlp_loss), backend="lowrank", options=OPTIONS)
    for i in range(4):
        bare(mlp_batch(i))
        step(mlp_batch(i))
    st = lookup(model[2].weight)
    assert st is not None and st.plan.kind is Kind.PROJECTED and st.binding is not None
    assert st.binding.opt is inner
    err, where = worst_rel_err(model, bare_model)
    assert err <= 1e-6, (err, where)  # same compiled code on the same data: rounding only
