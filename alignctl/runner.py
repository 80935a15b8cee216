"""Moved to :mod:`alignctl.train` (context, lifecycle, health). These names stay importable until launch.py,
worker.py, eval_cli.py, models.py and probe.py import from there; then the lead deletes this module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alignctl.train.context import StageContext  # noqa: F401  (moved: alignctl.train.context)
from alignctl.train.context import release_memory as _release_memory  # noqa: F401  (moved: alignctl.train.context)


def run_stage(spec) -> dict[str, Any]:  # moved: alignctl.train.lifecycle.run_stage
    from alignctl.train import lifecycle

    return lifecycle.run_stage(spec)


def load_spec(path: str | Path) -> dict[str, Any]:  # moved: the worker reads StageSpec.from_json (config/types.py)
    return json.loads(Path(path).read_text())
