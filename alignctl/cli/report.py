"""``alignctl report <multirun dir>``: a sweep's table (swept values vs held-out metrics), report.md and sweep.png
(alignctl.report writes them)."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from alignctl import errors, report
from alignctl.errors import ConfigError
from alignctl.metrics import fmt


def run(args: list[str]) -> int:
    if len(args) != 1:
        print("usage: alignctl report <multirun dir>", file=sys.stderr)
        return 2
    folder = Path(args[0]).expanduser()
    if (folder / "manifest.json").is_file():
        return errors.report(ConfigError([f"report: {folder} is one run, not a sweep (its report: "
                                          f"{folder / 'report.md'}); name a multirun directory, e.g. "
                                          "outputs/<recipe>/multirun/<timestamp>"]))
    if not folder.is_dir():
        return errors.report(ConfigError([f"report: {folder} is not a folder; name a multirun directory, e.g. "
                                          "outputs/<recipe>/multirun/<timestamp>"]))
    try:
        out, plot, rows = report.sweep_report(args[0])
    except FileNotFoundError as e:
        return errors.report(ConfigError([f"report: {e}"]))
    table = Table(*rows[0].keys(), title=f"sweep {args[0]}")
    for r in rows:
        table.add_row(*(fmt(v) for v in r.values()))
    Console(width=max(Console().width, 120)).print(table)
    print(f"report: {out}" + (f"\nplot: {plot}" if plot else ""))
    return 0
