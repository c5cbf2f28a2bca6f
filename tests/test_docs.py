"""The README tells the truth: the options table is the generated one and the two commands are there."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

from lowrank_compile.cli import options_table

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_options_table_is_generated_one():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- options-table:.*?-->\n(.*?)<!-- /options-table -->", readme, re.S)
    assert block, "options table markers missing"
    assert block.group(1).strip() == options_table(markdown=True).strip()


def test_readme_has_the_two_commands_and_ci_runs_one():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_cli_options_runs():
    out = subprocess.run(
        [sys.executable, "-m", "lowrank_compile.cli", "options"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "update_gap" in out.stdout and "default 200" in out.stdout
