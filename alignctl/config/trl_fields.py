"""A snapshot of the pinned TRL's config dataclass fields, so ``plan`` can validate without importing TRL.

``trl_fields.json`` maps each TRL config class used by a stage kind to its fields
(name -> type string, default and, for fields with a fixed set of values, ``choices``).
``python -m alignctl.config.trl_fields`` rewrites it from the installed TRL (the only part of this
module that imports TRL, by the config classes' names); a test fails when the snapshot and the installed TRL differ.

Choices come from where TRL and transformers list them: an Enum in the field's type
(``lr_scheduler_type``: SchedulerType, ``optim``: OptimizerNames, the ``*_strategy``
fields), a ``Literal[...]`` type (PPO's ``kl_estimator``, ``stop_token``), the
field's ``choices`` metadata (``log_level``, KTO/CPO ``loss_type``, ...), and, for
string fields whose help text says "Possible values are" / "Supported values are" /
"Must be one of" (DPO and SFT ``loss_type``, GRPO ``loss_type``, ``vllm_mode``, ...),
the quoted values of that sentence.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

SNAPSHOT = Path(__file__).with_name("trl_fields.json")


@cache
def load() -> dict:
    return json.loads(SNAPSHOT.read_text())


def fields(config_class: str) -> dict[str, dict]:
    return load()["configs"][config_class]


_CHOICE_SENTENCE = re.compile(r"(?:Possible values are|Supported values are|Must be one of)\s*:?\s*(.*?)(?:\.\s|\.$|$)",
                              re.S)
# TRL writes a value as `'sigmoid'`, `reverse_kl` or 'grpo'; the first form used in the sentence wins (others there
# name other fields, e.g. "the `lm_head` projection").
_QUOTED = (re.compile(r"`'([A-Za-z0-9_\-]+)'`"), re.compile(r"(?<![`A-Za-z])'([A-Za-z0-9_\-]+)'"),
           re.compile(r"`([A-Za-z0-9_\-]+)`"))


def _help_choices(text: str) -> list | None:
    """The values a field's help text lists after "Possible values are" (and similar), or None."""
    m = _CHOICE_SENTENCE.search(text or "")
    if not m:
        return None
    for pattern in _QUOTED:
        values = list(dict.fromkeys(pattern.findall(m.group(1))))
        if values:
            return values if len(values) >= 2 else None
    return None


def _choices(f) -> list | None:
    """A field's fixed set of values (enum, Literal, ``choices`` metadata or documented list), or None."""
    import dataclasses
    import enum
    import typing

    def walk(t):
        if isinstance(t, type) and issubclass(t, enum.Enum):
            return [m.value for m in t]
        if typing.get_origin(t) is typing.Literal:
            return list(typing.get_args(t))
        for arg in typing.get_args(t):
            found = walk(arg)
            if found:
                return found
        return None

    found = walk(f.type)
    typ = f.type if isinstance(f.type, str) else str(f.type)
    if found is not None and any(a is str for a in typing.get_args(f.type)) and \
            not any(isinstance(a, type) and issubclass(a, enum.Enum) for a in typing.get_args(f.type)):
        found = None  # Literal[False] | str: any string goes
    if found is None and f.metadata.get("choices"):
        found = list(f.metadata["choices"])
    if found is None and ("str" in typ) and "dict" not in typ:
        found = _help_choices(f.metadata.get("help", ""))
    if found is None:
        return None
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    if any(d not in found for d in (default if isinstance(default, list) else [default]) if d is not None):
        return None  # the default itself is not among them (e.g. `debug` takes space-separated words): no check
    if "bool" in typ:
        found += [b for b in (True, False) if b not in found]
    if "None" in typ or "Optional" in typ:
        found = found + [None] if None not in found else found
    return [_jsonable(v) for v in found]


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
            choices = _choices(f)
            if choices:
                entry[f.name]["choices"] = choices
        out["configs"][kind.config_class] = entry
    return out


if __name__ == "__main__":
    SNAPSHOT.write_text(json.dumps(generate(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT}")
