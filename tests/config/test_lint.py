"""ruff, as configured in pyproject.toml ([tool.ruff]), finds nothing in alignctl/, tests/ and benchmarks/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _ruff() -> list[str] | None:
    """The ruff command: the one installed next to this Python (the `test` extra), else one on PATH."""
    here = Path(sys.executable).with_name("ruff")
    if here.is_file():
        return [str(here)]
    found = shutil.which("ruff")
    return [found] if found else None


def test_ruff_finds_nothing():
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    proc = subprocess.run([*ruff, "check", "--output-format", "concise", "alignctl", "tests", "benchmarks"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
