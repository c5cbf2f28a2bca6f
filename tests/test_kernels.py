"""Runs the Triton kernel tests (tests/interp) under TRITON_INTERPRET=1, in a subprocess.

The variable must be set before triton is imported, and this process has already imported it
through Inductor. The inner run must report passed tests: "no tests ran" fails here.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


# Each file in its own subprocess (so xdist can run them side by side), with the number of tests
# it holds under each marker expression: fewer passed means some were not collected.
INTERP_FILES = {
    "test_triton_kernels.py": {"not slow": 28},
    "test_kernel_update.py": {"not slow": 1, "slow": 1},
}
CASES = [
    pytest.param(f, m, n, marks=pytest.mark.slow) if m == "slow" else (f, m, n)
    for f, counts in INTERP_FILES.items()
    for m, n in counts.items()
]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("fname, marker, count", CASES)
def test_triton_kernels_under_interpreter(fname, marker, count):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    path = str(ROOT / "tests" / "interp" / fname)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker, path],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=850,
    )
    tail = out.stdout[-3000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed and int(passed.group(1)) == count, tail


def test_every_interpreter_file_is_run():
    assert sorted(p.name for p in (ROOT / "tests" / "interp").glob("test_*.py")) == sorted(INTERP_FILES)
