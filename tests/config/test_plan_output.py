"""`plan`'s output: never wraps a line (the console of a run: tests/e2e/test_default_run.py)."""

from __future__ import annotations

from conftest import run_cli


def test_plan_never_wraps_a_line(tmp_path):
    long_dir = tmp_path / ("a-rather-long-directory-name-" * 4)
    proc = run_cli(["plan", f"hydra.run.dir={long_dir}/run"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert any(str(long_dir) in line for line in proc.stdout.splitlines())  # the path on one line, unbroken
    settings = [line for line in proc.stdout.splitlines() if line.strip().startswith("settings")]
    assert settings and all("learning_rate=" in line and "save_strategy=" in line for line in settings)
