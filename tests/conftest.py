from __future__ import annotations

import os
import warnings

import pytest
import torch

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
