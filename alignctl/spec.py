"""Resolve a composed Hydra config into a validated run spec (no torch, no TRL import).

The run spec is a plain dict: the recipe's name, the model, and an ordered list of
stage specs, each complete on its own (trainer, the paths of its initial weights,
reference and reward models, its data, and its TRL config fields). It is computed
once, by the process that ran Hydra, and written to each stage's directory.

Every problem found is collected and raised together as :class:`ConfigError`.
"""

from __future__ import annotations

import os
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from alignctl import data as data_mod
from alignctl import launch, models, peft_config, trl_fields
from alignctl.errors import ConfigError, suggest  # noqa: F401  (ConfigError is re-exported)
from alignctl.stages import STAGES, module

TOP_KEYS = {
    "name": "recipe name (used in output paths)",
    "description": "one line shown by `alignctl recipes`",
    "model": "base model (configs/model)",
    "data": "named data sets the stages refer to (configs/data)",
    "stages": "ordered stages of the recipe",
    "precision": "auto | bf16 | fp16 | fp32",
    "seed": "seed for every stage unless the stage sets its own",
    "output_root": "root of run directories and the tiny-model cache",
    "store": "stage store shared by runs (null: <output_root>/.store)",
    "peft": "none | lora | qlora (configs/peft) and their fields; a stage's `peft` key overrides it",
    "launcher": "local | torchrun | accelerate (configs/launcher): how each stage's processes are started",
}
MODEL_KEYS = {"name_or_path", "revision", "attn_implementation", "trust_remote_code", "chat_template"}
STAGE_KEYS = {"trainer", "from", "data", "description", "peft", "global_batch_size"}
LINK_KEYS = {"ref", "reward", "value"}
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# TRL fields alignctl owns or refuses: where it writes, and secrets (they would land in saved configs).
OWNED_FIELDS = {
    "output_dir": "alignctl sets it to <run dir>/<stage>/checkpoints",
    # PPOConfig fields that only TRL's example scripts read: alignctl's links say the same.
    "sft_model_path": "the policy starts from the `from` stage (or the base model); remove this key",
    "reward_model_path": "set the stage's `reward` link instead (a reward stage of this recipe, or a model path)",
}
SECRET_FIELDS = {"hub_token": "secrets never go in configs: set the HF_TOKEN environment variable instead"}


def _unknown(where: str, key: str, candidates) -> str:
    return f"{where}: unknown key '{key}'{suggest(key, candidates)}"


_SIMPLE = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}


def _type_problem(value: Any, typ: str) -> str | None:
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


def _to_container(cfg) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover
        return dict(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def resolve(cfg, run_dir: str | os.PathLike, check_data: bool = True) -> dict:
    """Validate ``cfg`` and return the run spec. Raises :class:`ConfigError` listing every problem."""
    c = _to_container(cfg)
    c.pop("hydra", None)
    problems: list[str] = []
    for key in c:
        if key not in TOP_KEYS:
            problems.append(_unknown("config", key, TOP_KEYS))

    precision = c.get("precision", "auto")
    if precision not in PRECISIONS:
        problems.append(f"precision: '{precision}' is not one of {', '.join(PRECISIONS)}")
    model = dict(c.get("model") or {})
    for key in model:
        if key not in MODEL_KEYS:
            problems.append(_unknown("model", key, MODEL_KEYS))
    if not model.get("name_or_path"):
        problems.append("model.name_or_path: not set (a local path, a Hub id, or tiny:llama / tiny:qwen2)")
    elif models.is_tiny(model["name_or_path"]) and models.tiny_arch(model["name_or_path"]) not in models.TINY_ARCHS:
        problems.append(f"model.name_or_path: unknown built-in tiny model '{model['name_or_path']}'; "
                        f"choose from {', '.join(models.TINY_PREFIX + a for a in models.TINY_ARCHS)}")
    elif data_mod.looks_local(str(model["name_or_path"])) and not Path(model["name_or_path"]).expanduser().exists():
        problems.append(f"model.name_or_path: path not found: {model['name_or_path']}")
    attn = model.get("attn_implementation")
    if attn in models.ATTN_PACKAGES and find_spec(models.ATTN_PACKAGES[attn]) is None:
        problems.append(f"model.attn_implementation: {attn} is asked for but its package "
                        f"`{models.ATTN_PACKAGES[attn]}` is not installed; install it or use sdpa")
    # LoRA / QLoRA: the run's setting (configs/peft), which each stage's `peft` key may override.
    run_peft, peft_problems = peft_config.resolve_peft(c.get("peft"), _peft_preset("none"), _peft_preset, "peft")
    problems += peft_problems or peft_config.peft_problems(run_peft, "peft")
    # How stages are launched (issue 6): world size and distributed engine, computed once for every stage.
    launcher, launch_problems = launch.resolve(c.get("launcher"), precision)
    problems += launch_problems

    run_dir = Path(run_dir).absolute()
    output_root = Path(c.get("output_root") or "outputs").absolute()
    datasets = c.get("data") or {}
    seed = c.get("seed", 42)
    stages_cfg = c.get("stages") or {}
    if not stages_cfg:
        problems.append("stages: the recipe defines no stages")

    stages: list[dict] = []
    kinds_by_name: dict[str, str] = {}
    for name, raw in stages_cfg.items():
        where = f"stages.{name}"
        if not isinstance(raw, dict):
            problems.append(f"{where}: must be a mapping with at least `trainer`")
            continue
        raw = dict(raw)
        trainer = raw.get("trainer")
        if trainer not in STAGES:
            problems.append(f"{where}.trainer: unknown trainer '{trainer}'{suggest(trainer, STAGES)}; "
                            f"known: {', '.join(STAGES)}")
            continue
        kind = STAGES[trainer]
        trl = trl_fields.fields(kind.config_class)
        allowed_links = set(kind.links)
        args: dict[str, Any] = {}
        for key, value in raw.items():
            if key in STAGE_KEYS or key in allowed_links or key in kind.options:
                continue
            if key in SECRET_FIELDS:
                problems.append(f"{where}.{key}: {SECRET_FIELDS[key]}")
            elif key in OWNED_FIELDS:
                problems.append(f"{where}.{key}: {OWNED_FIELDS[key]}")
            elif key in trl:
                bad = _type_problem(value, trl[key]["type"])
                if bad:
                    problems.append(f"{where}.{key}: {bad}")
                args[key] = value
            elif key in LINK_KEYS:
                problems.append(f"{where}.{key}: a {trainer} stage takes no `{key}` link")
            else:
                cands = set(trl) | STAGE_KEYS | allowed_links
                problems.append(_unknown(where, key, cands) + f" — not a field of {kind.config_class}")

        # Chaining: `from` names an earlier stage; the stage's initial weights are its final/.
        src = raw.get("from")
        if src is not None and src not in kinds_by_name:
            earlier = ", ".join(kinds_by_name) or "none"
            problems.append(f"{where}.from: '{src}' names no earlier stage (earlier stages: {earlier})")
            src = None
        if src is not None and STAGES[kinds_by_name[src]].output != "causal_lm" and kind.output == "causal_lm":
            problems.append(f"{where}.from: '{src}' is a {kinds_by_name[src]} stage (a classifier); "
                            f"a {trainer} stage must start from a language model")
        base = str(model.get("name_or_path"))
        init_path = str(run_dir / src / "final") if src else base

        links: dict[str, Any] = {}
        if "ref" in allowed_links:
            ref = raw.get("ref", src)
            if ref is not None and ref != src and ref not in kinds_by_name:
                problems.append(f"{where}.ref: '{ref}' names no earlier stage")
            links["ref"] = ref
            links["ref_path"] = str(run_dir / ref / "final") if ref else base

        # Reward and value models: an earlier stage's final/ (a reward stage, for `reward`) or a model path.
        for key in ("reward", "value"):
            if key in allowed_links:
                links[key], links[f"{key}_path"] = _model_link(raw.get(key), key, where, name, kinds_by_name,
                                                               stages_cfg, run_dir, problems)
        if "value" in allowed_links and raw.get("value") is None:  # the value model starts from the reward model
            links["value"], links["value_path"] = links.get("reward"), links.get("reward_path")
        options = {k: raw[k] for k in kind.options if k in raw}
        if kind.needs_reward and raw.get("reward") is None and not options.get("reward_funcs"):
            funcs = " or list TRL reward functions in `reward_funcs`" if "reward_funcs" in kind.options else ""
            problems.append(f"{where}.reward: a {trainer} stage needs a reward source: name a reward stage of this "
                            f"recipe (e.g. `reward: rm`) or a reward model path{funcs}")
        stage_peft, peft_problems = peft_config.resolve_peft(raw.get("peft"), run_peft, _peft_preset, f"{where}.peft")
        if raw.get("peft") is not None:  # what the stage sets (the run's own setting is checked above)
            own = raw["peft"] if isinstance(raw["peft"], dict) and "method" not in raw["peft"] else None
            problems += peft_problems or peft_config.peft_problems(stage_peft, f"{where}.peft", only=own and set(own))
        check = getattr(module(trainer), "check", None)  # the stage kind's own checks (of its options)
        if check is not None:
            problems += check({**links, **options, "args": args}, where)

        dspec, dprob = _dataset(raw.get("data"), datasets, where, kind, check_data)
        problems += dprob

        # Distributed (issue 6): gradient accumulation from global_batch_size; engine/stage combinations that fail.
        problems += launch.apply_batch(raw, args, trl, launcher, where)
        problems += launch.stage_problems(trainer, stage_peft, launcher, where)
        args.setdefault("seed", seed)
        args.setdefault("report_to", "none")
        kinds_by_name[name] = trainer
        stages.append({
            "name": name, "trainer": trainer, "from": src, "init_path": init_path, **links, **options,
            "data": dspec, "args": args, "output_dir": str(run_dir / name), "peft": stage_peft,
            # world size and engine change the trained weights, so they are part of the stage (and its fingerprint)
            "world_size": launcher["world_size"], "distributed": launcher["distributed"],
        })

    if problems:
        raise ConfigError(problems)
    return {
        "recipe": c.get("name") or "recipe", "description": c.get("description", ""),
        "model": model, "precision": precision, "seed": seed,
        "output_root": str(output_root), "cache_dir": str(output_root / ".cache"),
        "store_dir": str(Path(c["store"]).expanduser().absolute() if c.get("store") else output_root / ".store"),
        "run_dir": str(run_dir), "stages": stages, "launcher": launcher,
    }


def _peft_preset(name: str) -> dict:
    """The fields of configs/peft/<name>.yaml (what `peft=<name>` selects)."""
    from omegaconf import OmegaConf

    from alignctl.cli import CONFIGS_DIR

    return dict(OmegaConf.to_container(OmegaConf.load(CONFIGS_DIR / "peft" / f"{name}.yaml"), resolve=True))


def _model_link(value, key: str, where: str, name: str, earlier: dict[str, str], all_stages: dict,
                run_dir: Path, problems: list[str]) -> tuple[str | None, str | None]:
    """Resolve a `reward`/`value` link to (stage name or None, model path); appends problems."""
    if value is None:
        return None, None
    value = str(value)
    if value in earlier:
        if key == "reward" and STAGES[earlier[value]].output != "classifier":
            rms = [n for n, t in earlier.items() if STAGES[t].output == "classifier"]
            problems.append(f"{where}.reward: '{value}' is a {earlier[value]} stage, not a reward stage; name a stage "
                            f"with `trainer: reward` (earlier reward stages: {', '.join(rms) or 'none'})")
        return value, str(run_dir / value / "final")
    if value in all_stages:
        what = "is this stage itself" if value == name else "comes later in the recipe"
        problems.append(f"{where}.{key}: '{value}' {what}; a {key} link must name an earlier stage")
        return value, None
    if models.is_tiny(value) or (not data_mod.looks_local(value) and "/" in value):
        return None, value  # a built-in tiny model or a Hub id
    if data_mod.looks_local(value) and Path(value).expanduser().exists():
        return None, str(Path(value).expanduser().absolute())
    problems.append(f"{where}.{key}: '{value}' names no stage of this recipe{suggest(value, all_stages)} and no "
                    f"existing model path (earlier stages: {', '.join(earlier) or 'none'})")
    return None, None


def _dataset(ref, datasets: dict, where: str, kind, check: bool) -> tuple[dict | None, list[str]]:
    if ref is None:
        return None, [f"{where}.data: not set (name a data set from `data`: {', '.join(datasets) or 'none defined'})"]
    if isinstance(ref, str):
        if ref not in datasets:
            return None, [f"{where}.data: no data set named '{ref}'{suggest(ref, datasets)}; "
                          f"defined: {', '.join(datasets) or 'none'}"]
        spec, label = dict(datasets[ref]), f"data.{ref}"
    elif isinstance(ref, dict):
        spec, label = dict(ref), f"{where}.data"
    else:
        return None, [f"{where}.data: must name a data set or be a mapping"]
    spec, problems = data_mod.normalize(spec, label)
    if not problems and check:
        problems = data_mod.check(spec, kind.data_kind, label, stage=where)
    spec["label"] = label
    return spec, problems

