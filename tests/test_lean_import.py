"""`import lowrank_compile` must not import triton, Dynamo or Inductor, nor initialise CUDA."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_lean():
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import lowrank_compile\n"
        "lowrank_compile.parse_options({'rank': 8})\n"
        "new = set(sys.modules) - before\n"
        "heavy = ('triton', 'torch._dynamo', 'torch._inductor')\n"
        "prefixes = tuple(h + '.' for h in heavy) + heavy[1:]\n"
        "bad = sorted(m for m in new if m == 'triton' or m.startswith(prefixes))\n"
        "assert not bad, bad\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('lean')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("lean")
