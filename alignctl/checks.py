"""Checks of everything a user can get wrong that need no torch, no TRL and no weights (called by spec.resolve).

* names that become paths (stages, data sets, the recipe) are identifiers;
* TRL fields: numeric ranges TRL does not check itself, and choice fields against the installed TRL's choices
  (recorded in trl_fields.json);
* strict booleans (``'false'`` is not false);
* models: local folders (config.json, tokenizer files, safetensors weights), Hub ids (in the cache, or reachable;
  never a network call under HF_HUB_OFFLINE=1);
* directories alignctl will write (output_root, the store, the run directory) are writable;
* recipe files: they may set alignctl's keys only (see :func:`recipe_file_problems`);
* redaction of secrets, by key and by value pattern, for every file alignctl or Hydra writes.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from alignctl.errors import suggest

# -- names ---------------------------------------------------------------------------------------------------
IDENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


def name_problem(name: Any, where: str, what: str) -> str | None:
    """A name that becomes a path component: letters, digits, `_` and `-` (no `.`, `/`, spaces), at most 64."""
    if isinstance(name, str) and IDENT.match(name) and len(name) <= 64:
        return None
    return (f"{where}: {what} {name!r} is not a valid name; use letters, digits, '_' and '-' (it becomes a folder "
            "name, so no '/', '.' or '..')")


# -- scalars ---------------------------------------------------------------------------------------------------
def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def bool_problem(value: Any, where: str, optional: bool = False) -> str | None:
    """Booleans are true or false (YAML/command line), never the strings 'false'/'true' or 0/1."""
    if isinstance(value, bool) or (optional and value is None):
        return None
    hint = f" (write {value.lower()} without quotes)" if isinstance(value, str) and value.lower() in (
        "true", "false") else ""
    return f"{where}: must be true or false, got {value!r}{hint}"


def seed_problem(value: Any, where: str) -> str | None:
    if is_int(value) and 0 <= value < 2 ** 32:
        return None
    return f"{where}: must be an integer in [0, 2**32), got {value!r}"


# Ranges TRL/transformers do not check (or check only once the trainer is built, after earlier stages trained).
# rule: (lower, lower inclusive, upper, upper inclusive, integer, null allowed)
_R = tuple[float | None, bool, float | None, bool, bool, bool]
POS_INT: _R = (1, True, None, False, True, False)
OPT_POS_INT: _R = (1, True, None, False, True, True)
NONNEG_INT: _R = (0, True, None, False, True, False)
OPT_NONNEG_INT: _R = (0, True, None, False, True, True)
POS: _R = (0, False, None, False, False, False)
NONNEG: _R = (0, True, None, False, False, False)
OPT_NONNEG: _R = (0, True, None, False, False, True)
UNIT: _R = (0, True, 1, True, False, False)
OPT_UNIT: _R = (0, True, 1, True, False, True)
UNIT_OPEN: _R = (0, True, 1, False, False, False)

RANGES: dict[str, _R] = {
    "learning_rate": NONNEG, "weight_decay": NONNEG, "max_grad_norm": NONNEG, "adam_epsilon": POS,
    "adam_beta1": UNIT_OPEN, "adam_beta2": UNIT_OPEN, "warmup_steps": NONNEG, "warmup_ratio": UNIT,
    "num_train_epochs": NONNEG,
    "per_device_train_batch_size": POS_INT, "per_device_eval_batch_size": POS_INT,
    "gradient_accumulation_steps": POS_INT, "eval_accumulation_steps": OPT_POS_INT,
    "dataloader_num_workers": NONNEG_INT, "save_total_limit": OPT_NONNEG_INT,
    "max_length": OPT_POS_INT, "max_prompt_length": OPT_POS_INT, "max_completion_length": OPT_POS_INT,
    "max_seq_length": OPT_POS_INT, "response_length": POS_INT, "max_new_tokens": OPT_POS_INT,
    "beta": POS, "label_smoothing": UNIT_OPEN, "ld_alpha": OPT_UNIT, "ref_model_mixup_alpha": UNIT,
    "rpo_alpha": OPT_NONNEG, "cpo_alpha": NONNEG, "desirable_weight": POS, "undesirable_weight": POS,
    "kl_coef": NONNEG, "vf_coef": NONNEG, "cliprange": POS, "cliprange_value": POS, "gamma": UNIT, "lam": UNIT,
    "num_ppo_epochs": POS_INT, "num_mini_batches": POS_INT, "local_rollout_forward_batch_size": POS_INT,
    "total_episodes": OPT_POS_INT, "missing_eos_penalty": OPT_NONNEG, "kl_target": (0, False, None, False, False, True),
    "kl_horizon": POS_INT,
    "temperature": POS, "top_p": (0, False, 1, True, False, False), "top_k": OPT_NONNEG_INT, "min_p": OPT_UNIT,
    "epsilon": POS, "epsilon_high": OPT_NONNEG, "num_generations": (2, True, None, False, True, True),
    "num_iterations": POS_INT, "steps_per_generation": OPT_POS_INT, "generation_batch_size": OPT_POS_INT,
    "torch_empty_cache_steps": OPT_POS_INT, "ref_model_sync_steps": POS_INT,
}
# Per stage kind: GRPO/RLOO's beta is a KL coefficient where 0 means no reference model.
KIND_RANGES: dict[str, dict[str, _R]] = {"grpo": {"beta": NONNEG}, "rloo": {"beta": NONNEG}}
SEED_FIELDS = ("seed", "data_seed")
# Steps/cadence fields: a positive number (a float below 1 is a fraction of the total steps), or null.
CADENCE = ("logging_steps", "save_steps", "eval_steps")


def _range_text(rule: _R) -> str:
    lo, lo_inc, hi, hi_inc, integer, null = rule
    kind = "an integer" if integer else "a number"
    if hi is None:
        text = f"{kind} {'≥' if lo_inc else '>'} {lo:g}"
    else:
        text = f"{kind} in {'[' if lo_inc else '('}{lo:g}, {hi:g}{']' if hi_inc else ')'}"
    return text + (" or null" if null else "")


def range_problem(value: Any, rule: _R) -> str | None:
    lo, lo_inc, hi, hi_inc, integer, null = rule
    if value is None:
        return None if null else f"must be {_range_text(rule)}, got null"
    ok = is_int(value) if integer else is_num(value)
    if ok and not integer and not math.isfinite(value):
        ok = False
    if ok and lo is not None:
        ok = value >= lo if lo_inc else value > lo
    if ok and hi is not None:
        ok = value <= hi if hi_inc else value < hi
    return None if ok else f"must be {_range_text(rule)}, got {value!r}"


MAX_INT = 2**63 - 1


def field_problems(args: dict, fields: dict, kind: str, where: str) -> list[str]:
    """Ranges, NaNs, seeds, epochs/steps and choices of one stage's TRL fields (``fields``: the snapshot's)."""
    problems = []
    ranges = {**RANGES, **KIND_RANGES.get(kind, {})}
    for key, value in args.items():
        if key not in fields:
            continue
        if isinstance(value, float) and math.isnan(value):
            problems.append(f"{where}.{key}: must be a number, got nan")
            continue
        if is_int(value) and abs(value) > MAX_INT:  # torch, the data loader and islice stop at 64 bits
            problems.append(f"{where}.{key}: {value} is out of range (a 64-bit integer: at most {MAX_INT} either way)")
            continue
        if key == "report_to" and value is not None and not (isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value))):
            problems.append(f"{where}.report_to: must be none, all, or a tracker name or list of them (e.g. wandb, "
                            f"tensorboard), got {value!r}")
            continue
        if isinstance(value, list) and fields[key].get("choices") and "list" not in str(fields[key].get("type")):
            problems.append(f"{where}.{key}: takes one value, not a list; got {value!r}")
            continue
        if key in ranges:
            bad = range_problem(value, ranges[key])
        elif key in SEED_FIELDS:
            bad = None if value is None and key == "data_seed" else (seed_problem(value, "") or "").removeprefix(": ") or None
        elif key in CADENCE:
            bad = None if value is None or (is_num(value) and math.isfinite(value) and value > 0) else \
                f"must be a positive number of steps (or a fraction < 1 of the total), got {value!r}"
        else:
            bad = choice_problem(value, fields[key].get("choices"))
        if bad:
            problems.append(f"{where}.{key}: {bad}")
    epochs, steps = args.get("num_train_epochs"), args.get("max_steps")
    if is_int(steps) and steps == 0 or (is_int(steps) and steps < -1):
        problems.append(f"{where}.max_steps: must be a positive number of steps, or -1 to train num_train_epochs "
                        f"epochs; got {steps}")
    elif is_num(epochs) and epochs == 0 and not (is_int(steps) and steps > 0):
        problems.append(f"{where}.num_train_epochs: 0 epochs trains nothing; set num_train_epochs > 0 or "
                        "max_steps > 0")
    loss = args.get("loss_type")
    smoothing = args.get("label_smoothing")
    if kind == "dpo" and is_num(smoothing) and smoothing >= 0.5 and "robust" in (
            loss if isinstance(loss, list) else [loss]):
        problems.append(f"{where}.label_smoothing: robust DPO needs a flip probability in [0, 0.5), got {smoothing}")
    return problems


def report_to_problems(report_to: Any, where: str) -> list[str]:
    """``report_to`` of a built TRL config (a list of names) against transformers' trackers and what is installed:
    the Trainer would refuse them only when the stage starts (run's pre-flight; imports transformers)."""
    from transformers.integrations import integration_utils as iu

    names = [] if report_to in (None, "none") else ([report_to] if isinstance(report_to, str) else list(report_to))
    problems = []
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in iu.INTEGRATION_TO_CALLBACK:
            problems.append(f"{where}.report_to: unknown tracker {name!r}{suggest(str(name), iu.INTEGRATION_TO_CALLBACK)}"
                            f"; choose from none, all, {', '.join(iu.INTEGRATION_TO_CALLBACK)}")
            continue
        available = getattr(iu, f"is_{ {'azure_ml': 'azureml', 'comet_ml': 'comet'}.get(name, name)}_available", None)
        if available is not None and not available():
            problems.append(f"{where}.report_to: {name} is not installed (pip install {name.replace('_', '-')}), "
                            "or leave it out of report_to")
    return problems


def choice_problem(value: Any, choices: list | None) -> str | None:
    """``value`` (or every item of a list, e.g. DPO's ``loss_type``) against the installed TRL's choices."""
    if not choices:
        return None
    items = value if isinstance(value, list) else [value]
    for v in items:
        if v not in choices:
            shown = ", ".join(str(c) for c in choices if c is not None)
            return f"unknown value {v!r}{suggest(str(v), [str(c) for c in choices if c is not None])}; " \
                   f"choose from {shown}"
    return None


# -- models ----------------------------------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def local_model_problems(path: Path, where: str, gguf_file: str | None = None) -> list[str]:
    """A local model folder: config.json, tokenizer files and safetensors weights (what alignctl loads)."""
    if not path.exists():
        return [f"{where}: path not found: {path}"]
    if not path.is_dir():
        return [f"{where}: {path} is a file; name the model's folder (with config.json, the tokenizer files and "
                "*.safetensors weights)"]
    try:
        names = {p.name for p in path.iterdir()}
    except OSError as e:
        return [f"{where}: cannot read the folder {path}: {e.strerror or e}"]
    problems = []
    if gguf_file:
        return problems  # the GGUF file holds config, tokenizer and weights (checked by models.base_model_problems)
    if "config.json" not in names:
        problems.append(f"{where}: {path} has no config.json; it is not a Hugging Face model folder "
                        "(save one with model.save_pretrained(folder))")
    if not any(n in names for n in TOKENIZER_FILES):
        problems.append(f"{where}: {path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                        "save the tokenizer into the folder too (tokenizer.save_pretrained(folder))")
    if not any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        legacy = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
        problems.append(f"{where}: {path} has no *.safetensors weights"
                        + (f" ({', '.join(legacy[:3])} are pickle checkpoints, which alignctl does not load); "
                           "convert them: AutoModel.from_pretrained(folder).save_pretrained(folder)"
                           if legacy else "; alignctl loads safetensors weights only"))
    return problems


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


_HUB_SEEN: dict[tuple, tuple[str, str | None]] = {}


def hub_model_status(repo: str, revision: str | None, timeout: float = 3.0) -> tuple[str, str | None]:
    """('cached' | 'reachable' | 'missing' | 'offline' | 'unknown', detail) for a Hub model id.
    No network call when HF_HUB_OFFLINE=1; else one HEAD request of config.json with a short timeout."""
    key = (repo, revision, hub_offline())
    if key in _HUB_SEEN:
        return _HUB_SEEN[key]
    try:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.utils import HFValidationError
    except ImportError:  # pragma: no cover
        return "unknown", None
    try:
        cached = try_to_load_from_cache(repo, "config.json", revision=revision)
    except HFValidationError as e:
        return "missing", str(e).splitlines()[0]
    if isinstance(cached, str):
        out = ("cached", None)
    elif hub_offline():
        out = ("offline", None)
    else:
        out = _hub_head(repo, revision, timeout)
    _HUB_SEEN[key] = out
    return out


def _hub_head(repo: str, revision: str | None, timeout: float) -> tuple[str, str | None]:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        get_hf_file_metadata(hf_hub_url(repo, "config.json", revision=revision), timeout=timeout)
        return "reachable", None
    except GatedRepoError:
        return "reachable", "gated: accept its terms on the Hub and set HF_TOKEN"
    except RevisionNotFoundError:
        return "missing", f"revision {revision!r} not found"
    except RepositoryNotFoundError:
        return "missing", "no such model on the Hub (or it is private: set HF_TOKEN)"
    except EntryNotFoundError:
        return "missing", "the repository has no config.json (not a transformers model)"
    except Exception as e:  # network down, proxy, timeout: not the user's config
        return "unknown", f"{type(e).__name__}"


def hub_model_problems(repo: str, revision: str | None, where: str, run: bool) -> tuple[list[str], list[str]]:
    """(problems, notes) for a Hub model id. Not cached under HF_HUB_OFFLINE=1 is a problem for ``run`` and a note
    for ``plan`` (recipes for GPUs can be planned anywhere)."""
    status, detail = hub_model_status(repo, revision)
    if status == "missing":
        return [f"{where}: Hub model '{repo}': {detail}"], []
    if status == "offline":
        msg = (f"{where}: '{repo}' is not in the Hugging Face cache and HF_HUB_OFFLINE=1 is set; download it first "
               f"(huggingface-cli download {repo}) or unset HF_HUB_OFFLINE")
        return ([msg], []) if run else ([], [msg])
    if status == "unknown":
        return [], [f"{where}: could not reach the Hub to check '{repo}' ({detail})"]
    return [], ([f"{where}: '{repo}': {detail}"] if detail else [])


# -- directories ---------------------------------------------------------------------------------------------
def writable_problem(path: Path, where: str) -> str | None:
    """``path`` (created later if missing) can be written: it, or its nearest existing parent, is a writable
    directory."""
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if not p.is_dir():
        return f"{where}: {p} is not a directory, so {path} cannot be created"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{where}: {p} is not writable, so alignctl cannot write {path}; choose another folder"
    if p != path:  # to be created: try it (os.access says yes for root in /proc, /sys and similar file systems)
        import tempfile

        try:
            os.rmdir(tempfile.mkdtemp(prefix=".alignctl-probe-", dir=p))
        except OSError as e:
            return (f"{where}: {path} cannot be created: {p} does not accept new folders ({e.strerror or e}); "
                    "choose another folder")
    return None


# -- recipe files ----------------------------------------------------------------------------------------------
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
    from alignctl.launch import shipped_configs

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
    if node.get("store") is not None:
        problems.append(f"{where}: sets store; a recipe file may not choose where completed stages are read from "
                        "(their weights would be reused as trained): pass store=<folder> on the command line, or "
                        "leave it to the default <output_root>/.store")
    return problems


def _keys_under(node: Any, name: str, prefix: str) -> list[str]:
    """Dotted paths of every key ``name`` inside ``node`` (stages may nest: rounds blocks)."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}.{k}"
            found += [key] if str(k) == name else _keys_under(v, name, key)
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


# -- secrets ---------------------------------------------------------------------------------------------------
_SECRET_KEY = re.compile(r"token|api_?key|password|passwd|passphrase|(^|_)pass$|secret|credential|private_key|"
                         r"access_key|account_?key$|shared_?access_?(key|signature)$|connection_?string|auth|"
                         r"(^|_)key$", re.I)
# Upper-case environment names ending in _TOKENS (GH_TOKENS, API_TOKENS): secrets, unlike the lower-case tokenizer
# and counting fields below (additional_special_tokens, max_new_tokens).
_SECRET_ENV_TOKENS = re.compile(r"^[A-Z0-9_]*_TOKENS$")
# Tokenizer and counting fields that merely mention tokens: never secrets.
_NOT_SECRET_KEY = re.compile(r"^(stop|pad|eos|bos|unk|sep|cls|mask|additional_special|special)_tokens?(_ids?)?$|"
                             r"tokens|token_id|tokenizer|chat_template|max_new_token|^author", re.I)
_SECRET_VALUES = [
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}"), "hf_***"),
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}"), "sk-***"),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "AKIA***"),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"), "gh_***"),
    (re.compile(r"\bgithub_pat_[A-Za-z0-9_]{30,}"), "github_pat_***"),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9\-]{10,}"), "xox-***"),
    # connection strings (Azure storage / service bus, ODBC): AccountKey=...;  SharedAccessSignature=...;  Pwd=...;
    # and a SAS URL's sig=...; also as Hydra escapes overrides of a multirun job (`AccountKey\=...`)
    (re.compile(r"((?:AccountKey|SharedAccessKey|SharedAccessSignature|Password|Pwd)\s*\\?=\s*)[^;\s'\"]+", re.I),
     r"\1***"),
    (re.compile(r"([?&;]sig\\?=)[^&;\s'\"]+"), r"\1***"),
    # user:password@host, also as Hydra writes overrides of a multirun job (`https\://u\:pw@host`)
    (re.compile(r"(\b[a-z][a-z0-9+.\-]*\\?://[^/\s:@\\]+)\\?:[^/\s@]+@"), r"\1:***@"),
]
# NAME=value or NAME: value inside a string (launcher prefix words, dict-form overrides)
_EMBEDDED = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*)(\s*[:=]\s*)([^\s,;{}\[\]'\"=]+)")


def secret_key(key: Any) -> bool:
    k = str(key).split(".")[-1].lstrip("+~")
    if _SECRET_ENV_TOKENS.match(k):
        return True
    return bool(_SECRET_KEY.search(k)) and not _NOT_SECRET_KEY.search(k)


def redact_text(text: str) -> str:
    """Secret-looking values inside a string: known token formats, URL passwords, NAME=value of secret names."""
    for pattern, repl in _SECRET_VALUES:
        text = pattern.sub(repl, text)
    return _EMBEDDED.sub(lambda m: m.group(1) + m.group(2) + "***" if secret_key(m.group(1)) and
                         m.group(3).strip("=") else m.group(0), text)


def redact(obj: Any) -> Any:
    """Redact a config / override list for saving: values of secret-named keys (``HF_TOKEN``, ``WANDB_API_KEY``,
    ``AWS_SECRET_ACCESS_KEY``, ``hub_token``, ...; not tokenizer fields such as ``stop_token``/``pad_token``),
    ``key=value`` override strings of such keys, and secret-looking values anywhere (``hf_...``, ``sk-...``,
    AWS key ids, ``https://user:password@host``)."""
    if isinstance(obj, dict):
        return {k: ("***" if secret_key(k) and v not in (None, "", False) and not isinstance(v, (dict, list))
                    else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        if "=" in obj and not obj.lstrip().startswith(("{", "[")):
            key, value = obj.split("=", 1)
            if secret_key(key) and value and " " not in key:
                return key + "=***"
        return redact_text(obj)
    return obj


class RedactingFilter:
    """A logging filter that redacts secrets from messages (Hydra's launchers log each job's overrides)."""

    def filter(self, record) -> bool:
        record.msg, record.args = redact_text(record.getMessage()), None
        return True
