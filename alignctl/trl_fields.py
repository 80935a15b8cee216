"""A snapshot of the pinned TRL's config dataclass fields, so ``plan`` can validate without importing TRL.

``trl_fields.json`` maps each TRL config class used by a stage kind to its fields
(name -> type string and default). ``python -m alignctl.trl_fields`` rewrites it
from the installed TRL; a test fails when the snapshot and the installed TRL differ.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

SNAPSHOT = Path(__file__).with_name("trl_fields.json")


@lru_cache(maxsize=None)
def load() -> dict:
    return json.loads(SNAPSHOT.read_text())


def fields(config_class: str) -> dict[str, dict]:
    return load()["configs"][config_class]


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def generate() -> dict:
    """Read the field names, types and defaults of every config class the registry names."""
    import dataclasses
    import importlib
    from importlib.metadata import version

    from alignctl.stages import STAGES

    out: dict = {"trl": version("trl"), "configs": {}}
    for kind in STAGES.values():
        module, _, name = kind.config_class.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        entry = {}
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            typ = f.type.__name__ if isinstance(f.type, type) else str(f.type).replace("typing.", "")
            entry[f.name] = {"type": typ, "default": _jsonable(default)}
        out["configs"][kind.config_class] = entry
    return out


if __name__ == "__main__":
    SNAPSHOT.write_text(json.dumps(generate(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT}")
