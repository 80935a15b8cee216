"""Checks of everything a user can get wrong that need no torch, no TRL and no weights (called by the resolvers).

* names that become paths (stages, data sets, the recipe) are identifiers;
* scalars: strict booleans (``'false'`` is not false), seeds, simple annotated types, unknown keys;
* TRL fields: numeric ranges TRL does not check itself (a stage kind adds its own: StageKind.ranges), and choice
  fields against the installed TRL's choices (recorded in trl_fields.json);
* models: local folders (config.json, tokenizer files, safetensors weights), Hub ids (in the cache, or reachable;
  never a network call under HF_HUB_OFFLINE=1);
* directories alignctl will write (output_root, the store, the run directory) are writable.

What a recipe file may set is in :mod:`alignctl.config.recipe_files`, secrets in :mod:`alignctl.config.redact`.
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


_SIMPLE = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}


def type_problem(value: Any, typ: str) -> str | None:
    """Check scalars against simple annotations like ``float`` or ``int | None``; other types pass."""
    parts = [p.strip() for p in typ.split("|")]
    optional = "None" in parts
    parts = [p for p in parts if p != "None"]
    if len(parts) != 1 or parts[0] not in _SIMPLE:
        return None
    if value is None:
        return None if optional else f"must be a {parts[0]}, got null"
    ok = _SIMPLE[parts[0]]
    if isinstance(value, bool) and bool not in ok:
        return f"must be a {parts[0]}, got {value!r}"
    if not isinstance(value, ok):
        return f"must be a {parts[0]}, got {value!r}"
    return None


def unknown_key(where: str, key: str, candidates) -> str:
    return f"{where}: unknown key '{key}'{suggest(key, candidates)}"


# Ranges TRL/transformers do not check (or check only once the trainer is built, after earlier stages trained).
# rule: (lower, lower inclusive, upper, upper inclusive, integer, null allowed)
Rule = tuple[float | None, bool, float | None, bool, bool, bool]
POS_INT: Rule = (1, True, None, False, True, False)
OPT_POS_INT: Rule = (1, True, None, False, True, True)
NONNEG_INT: Rule = (0, True, None, False, True, False)
OPT_NONNEG_INT: Rule = (0, True, None, False, True, True)
POS: Rule = (0, False, None, False, False, False)
NONNEG: Rule = (0, True, None, False, False, False)
OPT_NONNEG: Rule = (0, True, None, False, False, True)
UNIT: Rule = (0, True, 1, True, False, False)
OPT_UNIT: Rule = (0, True, 1, True, False, True)
UNIT_OPEN: Rule = (0, True, 1, False, False, False)

RANGES: dict[str, Rule] = {
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
    "kl_horizon": (0, False, None, False, False, True), "target_kl": (0, False, None, False, False, True),
    "kl_stop": (0, False, None, False, False, True), "reward_std_coef": NONNEG,
    "temperature": POS, "top_p": (0, False, 1, True, False, False), "top_k": OPT_NONNEG_INT, "min_p": OPT_UNIT,
    "epsilon": POS, "epsilon_high": OPT_NONNEG, "num_generations": (2, True, None, False, True, True),
    "num_iterations": POS_INT, "steps_per_generation": OPT_POS_INT, "generation_batch_size": OPT_POS_INT,
    "torch_empty_cache_steps": OPT_POS_INT, "ref_model_sync_steps": POS_INT,
}
SEED_FIELDS = ("seed", "data_seed")
# Steps/cadence fields: a positive number (a float below 1 is a fraction of the total steps), or null.
CADENCE = ("logging_steps", "save_steps", "eval_steps")


def _range_text(rule: Rule) -> str:
    lo, lo_inc, hi, hi_inc, integer, null = rule
    kind = "an integer" if integer else "a number"
    if hi is None:
        text = f"{kind} {'≥' if lo_inc else '>'} {lo:g}"
    else:
        text = f"{kind} in {'[' if lo_inc else '('}{lo:g}, {hi:g}{']' if hi_inc else ')'}"
    return text + (" or null" if null else "")


def range_problem(value: Any, rule: Rule) -> str | None:
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


def field_problems(args: dict, fields: dict, where: str, ranges: dict[str, Rule] | None = None) -> list[str]:
    """Ranges, NaNs, seeds, epochs/steps and choices of one stage's TRL fields (``fields``: the snapshot's).
    ``ranges``: the stage kind's own rules (StageKind.ranges), in place of the shared ones for their fields."""
    rules = {**RANGES, **(ranges or {})}
    problems = []
    for key, value in args.items():
        if key in fields:
            bad = _field_problem(key, value, fields[key], rules)
            if bad:
                problems.append(f"{where}.{key}: {bad}")
    epochs, steps = args.get("num_train_epochs"), args.get("max_steps")
    if is_int(steps) and steps == 0 or (is_int(steps) and steps < -1):
        problems.append(f"{where}.max_steps: must be a positive number of steps, or -1 to train num_train_epochs "
                        f"epochs; got {steps}")
    elif is_num(epochs) and epochs == 0 and not (is_int(steps) and steps > 0):
        problems.append(f"{where}.num_train_epochs: 0 epochs trains nothing; set num_train_epochs > 0 or "
                        "max_steps > 0")
    return problems


def _field_problem(key: str, value: Any, field: dict, rules: dict[str, Rule]) -> str | None:
    """What is wrong with one TRL field's value, or None."""
    if isinstance(value, float) and math.isnan(value):
        return "must be a number, got nan"
    if is_int(value) and abs(value) > MAX_INT:  # torch, the data loader and islice stop at 64 bits
        return f"{value} is out of range (a 64-bit integer: at most {MAX_INT} either way)"
    if key == "report_to" and value is not None and not (isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value))):
        return f"must be none, all, or a tracker name or list of them (e.g. wandb, tensorboard), got {value!r}"
    if isinstance(value, list) and field.get("choices") and "list" not in str(field.get("type")):
        return f"takes one value, not a list; got {value!r}"
    if key in rules:
        return range_problem(value, rules[key])
    if key in SEED_FIELDS:
        return None if value is None and key == "data_seed" else (seed_problem(value, "") or "").removeprefix(": ") \
            or None
    if key in CADENCE:
        return None if value is None or (is_num(value) and math.isfinite(value) and value > 0) else \
            f"must be a positive number of steps (or a fraction < 1 of the total), got {value!r}"
    return choice_problem(value, field.get("choices"))


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
        return problems  # the GGUF file holds config, tokenizer and weights (model_checks.base_model_problems)
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
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

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
