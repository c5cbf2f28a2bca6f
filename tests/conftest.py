from __future__ import annotations

import os
import warnings

# Run as CI runs: GitHub Actions and most CI systems set CI, and torch reads it (Inductor rejects
# fallbacks for ops with a decomposition, AOTAutograd errors on aliasing custom ops). Set before
# torch is imported, and inherited by every subprocess a test starts.
os.environ.setdefault("CI", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import lowrank_compile

# tests/interp runs only under TRITON_INTERPRET=1, in the subprocess tests/test_kernels.py starts.
collect_ignore_glob = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interp/*"]


@pytest.fixture(autouse=True)
def _fresh_backend():
    """Every test starts with no plans, no bound optimizers and empty Dynamo caches."""
    lowrank_compile.reset()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        # Dynamo's tracing of optimizers logs this; it is not ours.
        warnings.filterwarnings("ignore", message=".*record_function.*")
        yield
    lowrank_compile.reset()
