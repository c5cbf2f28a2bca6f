"""Acceptance 5: after `pip install -e .` into a fresh virtualenv, `backend="lowrank"` works in a new
interpreter without `import lowrank_compile`.

Reinstalling torch into the fresh environment would take minutes. Instead it sees the test
environment's packages through a `.pth` file pointing to a mirror of site-packages that leaves
out every lowrank-compile file. The only way the fresh interpreter can find the backend is the
entry point that this `pip install -e .` registered.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import sysconfig

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys
import torch
assert "lowrank_compile" not in sys.modules
from importlib.metadata import entry_points
eps = [ep for ep in entry_points(group="torch_dynamo_backends") if ep.name == "lowrank"]
assert len(eps) == 1, eps
origin = eps[0].dist._path  # the dist-info this pip install wrote
def f(x, w):
    return torch.relu(x @ w).sum()
x, w = torch.randn(4, 3), torch.randn(3, 5)
out = torch.compile(f, backend="lowrank")(x, w)
assert torch.allclose(out, f(x, w))
assert "lowrank_compile.backend" in sys.modules  # loaded by torch through the entry point
print("ENTRY-POINT-OK", origin)
"""


@pytest.mark.timeout(600)
def test_pip_install_editable_registers_backend(tmp_path):
    outer = pathlib.Path(sysconfig.get_paths()["purelib"])
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for entry in outer.iterdir():
        low = entry.name.lower()
        if "lowrank" in low or low.endswith(".pth"):
            continue  # no trace of the test environment's own install of this package
        (mirror / entry.name).symlink_to(entry)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    inner = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    pathlib.Path(inner, "zz_test_mirror.pth").write_text(str(mirror) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "-q", "-e", str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    run = subprocess.run(
        [str(py), "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("ENTRY-POINT-OK")][0]
    assert str(venv) in line, line  # the entry point came from the fresh venv, not the mirror
