"""Slow end-to-end runs (`make test-slow`): the demo's model trained for real, against peers.

Deselected by default (minutes on 2 cores); the memory and speed numbers live in benchmarks/.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_convergence_matches_galore_torch_and_eager_adamw(tmp_path):
    """200 steps of the demo's LLaMA (defaults: rank 1/4, 8-bit states, svd in backward).

    galore_torch's GaLoreAdamW projects the same matrices with the same rank, scale and refresh
    schedule in fp32: the two final validation losses agree within 0.4% (measured 2.277-2.284 vs
    2.285 at 200 steps over several runs, 1.769 vs 1.771 at 500); bound 1%, which leaves room for
    8-bit rounding and for Inductor's run-to-run last bits (README, Limitations). Against eager
    AdamW (no projection) the issue's bound applies: within 2%, measured 13% *lower* at 200 steps.
    """
    sys.path.insert(0, str(BENCH))
    import convergence

    summary = convergence.main(["--steps", "200", "--out", str(tmp_path)])
    val = {name: v for name, _first, _tail, v, _secs in summary}
    first = {name: f for name, f, *_ in summary}
    # Same weights and batches for all: the first losses differ only by the compiled forward's
    # fp32 summation order (measured 1e-6 absolute on 5.49).
    assert max(first.values()) - min(first.values()) <= 1e-5 * max(first.values()), first
    assert abs(val["lowrank"] - val["galore_torch"]) <= 0.01 * val["galore_torch"], val
    assert val["lowrank"] <= 1.02 * val["eager_adamw"], val
    assert val["lowrank"] < 0.6 * first["lowrank"], val  # it trained
    rows = (tmp_path / "convergence.csv").read_text().splitlines()
    assert rows[0] == "step,run,train_loss,val_loss" and len(rows) == 1 + 3 * 200
    assert (tmp_path / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
