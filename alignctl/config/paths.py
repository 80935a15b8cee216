"""Where alignctl's shipped configuration lives: ``configs/`` (the Hydra groups) and ``recipes/``.

Both sit at the repository root in a checkout and inside the package in a wheel.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # alignctl/


def _asset_dir(name: str) -> Path:
    inside = PACKAGE_DIR / name
    return inside if inside.is_dir() else PACKAGE_DIR.parent / name


CONFIGS_DIR = _asset_dir("configs")
RECIPES_DIR = _asset_dir("recipes")
