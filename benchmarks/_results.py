"""Shared by the benchmark scripts: append a table to benchmarks/RESULTS.md with device and date."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform

import torch


def device() -> str:
    """The machine in words, as RESULTS.md headings name it."""
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def record(script: str, table: str) -> None:
    """Append `table` under a heading naming `script`, today's date and the device."""
    with open(pathlib.Path(__file__).with_name("RESULTS.md"), "a") as f:
        f.write(f"\n### {script}, {datetime.date.today()}, {device()}\n\n{table}\n")
