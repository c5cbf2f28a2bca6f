"""The README's "Integrations" snippets run as written, and the backend takes over in each.

Each snippet runs after the README's setup block, in a temporary directory. Proof that the
rewrite fired: the projected matrices of the snippet's model have backend states, and no
"takes over none" warning was issued. The numbers of these setups are held to eager runs in
tests/test_integrations.py and tests/test_accumulation_clip.py.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

import lowrank_compile
from lowrank_compile.backend import LowRankWarning
from lowrank_compile.plan import Kind
from lowrank_compile.runtime.state import registry_states

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> dict[str, str]:
    text = README.read_text()
    return dict(re.findall(r"<!-- snippet: (\w+) -->\n```python\n(.*?)```", text, re.S))


def test_readme_has_the_four_integrations():
    assert set(_snippets()) == {"setup", "hf_trainer", "lightning", "accelerate", "nanogpt"}


@pytest.mark.parametrize("name", ["hf_trainer", "lightning", "accelerate", "nanogpt"])
def test_snippet_runs_and_takes_over(name, tmp_path, monkeypatch):
    snippets = _snippets()
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"readme_{name}"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(snippets["setup"] + "\n" + snippets[name], f"README:{name}", "exec"), namespace)
    ours = [str(w.message) for w in caught if issubclass(w.category, LowRankWarning)]
    assert not [m for m in ours if "takes over none" in m], ours
    projected = [st for st in registry_states() if st.plan.kind is Kind.PROJECTED]
    # The layer's q, k, v, o, gate, up and down matrices (short sides >= min_dim=32) are projected.
    assert len(projected) == 7, [st.plan.name for st in projected]
    assert all(st.rounds >= 1 for st in projected)  # the backend's update ran for each
    # Every snippet clips after accumulating micro-batches: the clip that ran (the framework's own
    # code path) counted each projected matrix, whose norm is then estimated from the sketch. A
    # framework that computes the norm from p.grad alone (accelerate >= 1.16 does) would leave
    # them out: report None or `estimated` empty.
    report = lowrank_compile.clip_report()
    assert report is not None
    assert set(report.estimated) == {st.plan.name for st in projected}
    lowrank_compile.reset()
