"""The plan-time package alignctl/config/ never imports the heavy libraries: no import statement of it names one (at
module level or inside a function), importing every module of it in a fresh process loads none, and neither do
`alignctl plan`, `--help` and `recipes`. (trl_fields.generate, the snapshot's regeneration, imports the config
classes by their names with importlib: a developer's tool, run by ``python -m alignctl.config.trl_fields``.)"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG = Path(__file__).resolve().parents[2] / "alignctl" / "config"
HEAVY = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "matplotlib", "bitsandbytes")


def _config_modules() -> list[str]:
    return sorted("alignctl.config" if f.stem == "__init__" else f"alignctl.config.{f.stem}"
                  for f in CONFIG.glob("*.py"))


def test_no_import_statement_of_the_config_package_names_a_heavy_library():
    found = []
    for f in sorted(CONFIG.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            found += [f"{f.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in HEAVY]
    assert found == []


def _heavy_loaded(code: str) -> list[str]:
    code += f"\nimport json, sys\nprint(json.dumps(sorted(h for h in {HEAVY!r} if h in sys.modules)), file=sys.stderr)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    return json.loads(out.stderr.strip().splitlines()[-1])


def test_importing_every_module_of_the_config_package_loads_no_heavy_library():
    modules = _config_modules()
    assert "alignctl.config.resolve" in modules and len(modules) > 10
    assert _heavy_loaded(f"import importlib\nfor m in {modules!r}: importlib.import_module(m)") == []


@pytest.mark.parametrize("args", [["--help"], ["plan"], ["plan", "recipe=rlaif-dpo"], ["recipes"]])
def test_plan_help_and_recipes_load_no_heavy_library(args):
    assert _heavy_loaded(f"from alignctl.cli import main\ntry:\n    main({args!r})\nexcept SystemExit:\n    pass") == []
