"""What a recipe file may set (no torch): alignctl's keys, ``defaults`` choosing shipped options of alignctl's config
groups, and run folders under ``${output_root}``; never Hydra settings that run code, instantiation keys, resolvers
that copy the environment, or what only the user decides (launcher prefix/env/extra_args and config files, remote
code, the store): :func:`recipe_file_problems`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from alignctl.config.checks import IDENT
from alignctl.config.launcher import shipped_configs
from alignctl.errors import suggest

SHAPES = {"stages": "stage name -> settings (e.g. stages: {sft: {trainer: sft, data: sft}})",
          "data": "data set name -> {path: ..., split: ...}", "model": "model settings (name_or_path, revision, ...)",
          "launcher": "launcher settings (kind, nproc_per_node, ...)"}
HYDRA_ALLOWED = {"run": {"dir"}, "sweep": {"dir", "subdir"}}
INSTANTIATE_KEYS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")
RESOLVERS_ALLOWED = ("now", "oc.select")
_RESOLVER = re.compile(r"\$\{\s*([A-Za-z_][\w.]*)\s*:")
# Launcher keys that decide what runs (a command before the launcher, its arguments, the ranks' environment): only
# the command line, alignctl's launcher group files or a --config-dir set them.
LAUNCH_KEYS = {
    "prefix": "launcher.prefix=[srun,...]",
    "extra_args": "launcher.extra_args=[--max-restarts=0]",
    "env": "+launcher.env.NCCL_DEBUG=WARN",
}
# Interpolations a recipe's hydra.run.dir / sweep.dir / sweep.subdir may use: names that cannot hold '..' or '/'
# (`name` is checked to be an identifier; the job's override_dirname comes from the user's command line).
DIR_INTERPOLATIONS = {"output_root", "name", "hydra.job.num", "hydra.job.name", "hydra.job.id",
                      "hydra.job.override_dirname"}
_INTERPOLATION = re.compile(r"\$\{([^}]*)\}")
TRUSTED = "the command line, or a file in a --config-dir you pass"


def recipe_file_problems(node: Any, path: Path, top_keys, groups, config_dirs=()) -> list[str]:
    """What a recipe file may set: alignctl's keys (``top_keys``), ``defaults`` choosing shipped options of alignctl's
    config groups (``groups``; options found as ``<dir>/<group>/<option>.yaml`` in one of ``config_dirs``: alignctl's
    configs and a --config-dir the user passed), and ``hydra.run.dir`` / ``hydra.sweep.dir`` / ``hydra.sweep.subdir``
    under ``${output_root}``. Not: other ``hydra.*`` keys (callbacks, logging, launchers run code), ``_target_``
    (instantiation), resolvers other than ``now`` and ``oc.select`` (``${oc.env:...}`` would copy the environment
    into saved files), and what only the user may decide (:func:`_trust_problems`): launcher prefix/env/extra_args and
    config files, remote code, the store."""
    where = f"recipe file {path}"
    if not isinstance(node, dict):
        return [f"{where}: must be a mapping of alignctl keys (name, description, model, data, stages, ...), "
                f"got a {type(node).__name__}"]
    problems = []
    for key, value in node.items():
        if key == "defaults":
            problems += _defaults_problems(value, where, groups, config_dirs)
        elif key == "hydra":
            problems += _hydra_problems(value, where)
        elif key not in top_keys:
            problems.append(f"{where}: unknown key '{key}'{suggest(str(key), top_keys)}; a recipe sets alignctl's "
                            f"keys: {', '.join(sorted(top_keys))}")
        elif key in SHAPES and value is not None and not isinstance(value, dict):
            problems.append(f"{where}: {key} must be a mapping of {SHAPES[key]}, got a {type(value).__name__}")
    problems += _trust_problems(node, where)
    problems += _code_problems(node, where, "")
    return problems


def _trust_problems(node: dict, where: str) -> list[str]:
    """Settings a recipe file may not make, because they run code or choose which weights count as trained: the
    user types them (command line) or keeps them in a --config-dir."""
    problems = []
    launcher = node.get("launcher") if isinstance(node.get("launcher"), dict) else {}
    for key, example in LAUNCH_KEYS.items():
        if launcher.get(key) not in (None, [], {}, ""):
            problems.append(f"{where}: sets launcher.{key}, which decides what runs; a recipe file may not: pass it on "
                            f"the command line ({example}), or keep it in a launcher file of a --config-dir")
    config_file = launcher.get("config_file")
    if config_file is not None and config_file not in shipped_configs():
        problems.append(f"{where}: launcher.config_file {str(config_file)[:80]!r} is not a shipped accelerate config "
                        f"({', '.join(shipped_configs())}); a file of your own decides what runs: pass it on the "
                        "command line (launcher.config_file=./my-accelerate.yaml)")
    model = node.get("model") if isinstance(node.get("model"), dict) else {}
    if model.get("trust_remote_code") not in (None, False):
        problems.append(f"{where}: sets model.trust_remote_code, which runs Python code shipped with the model; a "
                        "recipe file may not: type model.trust_remote_code=true on the command line")
    for stage in _keys_under(node.get("stages"), "trust_remote_code_links", "stages"):
        problems.append(f"{where}: sets {stage}, which runs code shipped with a linked model; a recipe file may not: "
                        f"type it on the command line (+{stage}=[reward])")
    for key, value in _values_under(node.get("stages"), "principles", "stages"):
        if isinstance(value, str):  # read as text at plan time, shown, and fed to the models: any file on disk
            problems.append(f"{where}: {key} names a file ({value[:80]!r}); a recipe file lists its principles "
                            f"inline: name a file of principles on the command line ({key}=./principles.txt)")
    if node.get("store") is not None:
        problems.append(f"{where}: sets store; a recipe file may not choose where completed stages are read from "
                        "(their weights would be reused as trained): pass store=<folder> on the command line, or "
                        "leave it to the default <output_root>/.store")
    return problems


def _keys_under(node: Any, name: str, prefix: str) -> list[str]:
    """Dotted paths of every key ``name`` inside ``node`` (stages may nest: rounds blocks)."""
    return [key for key, _ in _values_under(node, name, prefix)]


def _values_under(node: Any, name: str, prefix: str) -> list[tuple[str, Any]]:
    """(dotted path, value) of every key ``name`` inside ``node``."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}.{k}"
            found += [(key, v)] if str(k) == name else _values_under(v, name, key)
    return found


def _defaults_problems(value: Any, where: str, groups, config_dirs=()) -> list[str]:
    """Each defaults entry is ``_self_`` or chooses one option of one of alignctl's groups by plain name: an option
    with '/', '..' or '@package' could load any YAML file on disk (and a file alignctl never checked)."""
    if not isinstance(value, list):
        return [f"{where}: defaults must be a list such as [{{override /model: mistral-7b}}]"]
    problems = []
    for entry in value:
        if entry == "_self_":
            continue
        if isinstance(entry, dict) and len(entry) == 1:
            (key, option), = entry.items()
        elif isinstance(entry, str) and "/" in entry.strip().lstrip("/"):  # `/model/tiny`: a config path
            key, _, option = entry.strip().lstrip("/").rpartition("/")
        else:
            problems.append(f"{where}: defaults entry {entry!r} is not of the form {{override /<group>: <option>}} "
                            f"(groups: {', '.join(sorted(groups))})")
            continue
        words = str(key).split()
        group = words[-1].lstrip("/") if words else ""
        if "@" in group:
            problems.append(f"{where}: defaults entry {entry!r} names a package ('@'); a recipe may only choose an "
                            f"option of alignctl's config groups, e.g. {{override /{group.split('@')[0]}: <option>}}")
        elif group not in groups or any(w not in ("override", "optional") for w in words[:-1]):
            problems.append(f"{where}: defaults entry {entry!r} chooses '{group.split('/')[0]}'; a recipe may only "
                            f"choose alignctl's config groups ({', '.join(sorted(groups))})")
        elif option is not None and not _option_exists(group, option, config_dirs):
            problems.append(f"{where}: defaults entry {entry!r}: {option!r} is not one of the {group} options "
                            f"({', '.join(_options(group, config_dirs))}); name one by its plain name (no '/', '..', "
                            "'@'), or keep your own in <your --config-dir>/" + group)
    return problems


def _option_exists(group: str, option: Any, config_dirs) -> bool:
    return isinstance(option, str) and bool(IDENT.match(option)) and any(
        (Path(d) / group / f"{option}.yaml").is_file() for d in config_dirs)


def _options(group: str, config_dirs) -> list[str]:
    return sorted({p.stem for d in config_dirs for p in (Path(d) / group).glob("*.yaml")})


def _hydra_problems(value: Any, where: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: hydra must be a mapping (only run.dir, sweep.dir and sweep.subdir may be set)"]
    problems = []
    for k, v in value.items():
        allowed = HYDRA_ALLOWED.get(k)
        extra = [f"hydra.{k}.{sub}" for sub in (v if isinstance(v, dict) else {"?": 0}) if sub not in (allowed or ())]
        if allowed is None or extra:
            problems.append(f"{where}: sets {', '.join(extra) if allowed else 'hydra.' + str(k)}; a recipe file may "
                            "set only hydra.run.dir, hydra.sweep.dir and hydra.sweep.subdir (other Hydra settings — "
                            "callbacks, logging, launchers — can run code)")
            continue
        for sub, folder in v.items():
            bad = _run_dir_problem(folder, subdir=(k, sub) == ("sweep", "subdir"))
            if bad:
                problems.append(f"{where}: hydra.{k}.{sub} {str(folder)[:80]!r} {bad}; a recipe's run folders stay "
                                f"under ${{output_root}} (e.g. ${{output_root}}/${{name}}/${{now:%Y-%m-%d_%H-%M-%S.%f}}"
                                "); another folder goes on the command line (hydra.run.dir=...)")
    return problems


def _run_dir_problem(folder: Any, subdir: bool) -> str | None:
    """Why a recipe's run/sweep folder could leave the output root (and overwrite another run's files), or None."""
    if not isinstance(folder, str) or not folder.strip():
        return "is not a folder path"
    if ".." in folder:  # also inside ${now:...}'s format
        return "contains '..'"
    names = [m.strip() for m in _INTERPOLATION.findall(folder)]
    bad = [n for n in names if "$" in n or (n not in DIR_INTERPOLATIONS and not n.startswith("now:"))]
    if bad:
        return f"interpolates {', '.join(bad)} (allowed: {', '.join(sorted(DIR_INTERPOLATIONS))}, now:<format>)"
    if subdir:
        return "is an absolute path" if folder.startswith(("/", "~")) else None
    return None if folder.startswith("${output_root}/") else "does not start with ${output_root}/"


def _code_problems(node: Any, where: str, prefix: str) -> list[str]:
    problems = []
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if str(k) in INSTANTIATE_KEYS:
                problems.append(f"{where}: {key}: instantiation keys ({', '.join(INSTANTIATE_KEYS)}) are not allowed "
                                "in recipes")
            problems += _code_problems(v, where, key + ".")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            problems += _code_problems(v, where, f"{prefix.rstrip('.')}[{i}].")
    elif isinstance(node, str):
        for name in _RESOLVER.findall(node):
            if name not in RESOLVERS_ALLOWED:
                problems.append(f"{where}: {prefix.rstrip('.')}: the resolver ${{{name}:...}} is not allowed in "
                                f"recipes (it would copy the environment into saved files); write the value, or "
                                f"pass it on the command line")
    return problems
