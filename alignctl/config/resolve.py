"""Resolve a composed Hydra config into a validated, typed run spec (:class:`RunSpec`; no torch, no TRL import).

:func:`resolve` is an orchestrator of per-concern resolvers, each returning (value, problems): the top keys and
run-wide settings, the model (resolve_model), peft, the launcher (config/launcher), the folders, the data sets, the
stages (resolve_stage, with their links: resolve_links), evaluation and sweep (resolve_eval). It is computed once,
by the process that ran Hydra; each stage's spec is complete on its own.

Every problem found is collected and raised together as :class:`ConfigError`.
"""

from __future__ import annotations

import os
from pathlib import Path

from alignctl import tiny
from alignctl.config import checks, launcher, peft
from alignctl.config.data_checks import looks_local
from alignctl.config.eval_settings import stage_settings
from alignctl.config.model_checks import PKG_PREFIX
from alignctl.config.resolve_context import Context, mapping
from alignctl.config.resolve_eval import resolve_eval, resolve_sweep
from alignctl.config.resolve_model import resolve_model
from alignctl.config.resolve_stage import resolve_stage
from alignctl.config.types import ModelSpec, RunSpec, StageSpec
from alignctl.errors import ConfigError
from alignctl.fsutil import lock_problems
from alignctl.stages import STAGES

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
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve(cfg, run_dir: str | os.PathLike, check_data: bool = True, run: bool = False) -> RunSpec:
    """Validate ``cfg`` and return the run spec. Raises :class:`ConfigError` listing every problem.

    ``run``: checked for ``alignctl run`` rather than ``plan``: a Hub model that is not cached while HF_HUB_OFFLINE=1
    is then an error (for ``plan`` a note), and so is a launcher asking for more processes than this machine has.
    Notes (warnings that do not stop anything) are returned in ``notes``."""
    c = _to_container(cfg)
    c.pop("hydra", None)
    notes: list[str] = []
    (recipe, precision, seed), problems = _settings(c)
    model, more = resolve_model(c, run, notes)
    run_peft, more2 = _run_peft(c.get("peft"))
    # how stages are launched: world size and distributed engine, computed once for every stage
    launch, more3 = launcher.resolve(c.get("launcher"), precision)
    problems += more + more2 + more3 + lock_problems()  # ALIGNCTL_LOCK_* (store and run-directory locks)
    run_dir = Path(run_dir).absolute()
    (output_root, store_dir, store_named), more = _folders(c, run_dir)
    datasets, more2 = _datasets(c)
    entries, more3 = _stage_entries(c)
    problems += more + more2 + more3
    ctx = Context(run_dir=run_dir, model=model, run=run, check_data=check_data, notes=notes, datasets=datasets,
                  entries=entries, launcher=launch, peft=run_peft, seed=seed, precision=precision, recipe=recipe,
                  cache_dir=str(output_root / ".cache"), store_dir=str(store_dir))
    for name, raw in entries.items():
        stage, more = resolve_stage(name, raw, ctx)
        problems += more
        if stage is not None:
            ctx.stages.append(stage)
    ev, more = resolve_eval(c.get("eval"), ctx)
    sweep, more2 = resolve_sweep(c.get("sweep"), ctx.earlier())
    problems += more2 + more
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    stages = tuple(s.replace(eval=stage_settings(ev, s, ctx.stages, seed)) for s in ctx.stages)
    notes += unpinned_notes(model, stages)  # Hub model / data sets without a revision
    return RunSpec(recipe=recipe, stages=stages, model=model, launcher=launch, description=c.get("description", ""),
                   precision=precision, seed=seed, output_root=str(output_root), cache_dir=ctx.cache_dir,
                   store_dir=ctx.store_dir, store_named=store_named, run_dir=str(run_dir), eval=ev, sweep=sweep,
                   notes=tuple(notes))


def _to_container(cfg) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover
        return dict(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def _settings(c: dict) -> tuple[tuple, list[str]]:
    """The top-level keys, and the run-wide scalars: (recipe name, precision, seed)."""
    problems = []
    for key in c:
        if key == "recipe" and isinstance(c[key], dict):  # a recipe/<name>.yaml of --config-dir without its header
            problems.append("recipe: a recipe file in a --config-dir recipe/ folder must start with the line "
                            "`# @package _global_` (its keys are top-level keys)")
        elif key not in TOP_KEYS:
            problems.append(checks.unknown_key("config", key, TOP_KEYS))
    recipe = c.get("name") or "recipe"
    problems += filter(None, [checks.name_problem(recipe, "name", "recipe name")])
    precision = c.get("precision", "auto")
    if precision not in PRECISIONS:
        problems.append(f"precision: '{precision}' is not one of {', '.join(PRECISIONS)}")
    seed = c.get("seed", 42)
    problems += filter(None, [checks.seed_problem(seed, "seed")])
    return (recipe, precision, seed), problems


def _run_peft(value) -> tuple[dict, list[str]]:
    """LoRA / QLoRA: the run's setting (configs/peft), which each stage's `peft` key may override."""
    run_peft, problems = peft.resolve_peft(value, peft.preset("none"), peft.preset, "peft")
    return run_peft, problems or peft.peft_problems(run_peft, "peft")


def _folders(c: dict, run_dir: Path) -> tuple[tuple[Path, Path, bool], list[str]]:
    """(output root, store, whether `store` was named: the trust rule of alignctl.trust), and whether alignctl can
    write them and the run directory."""
    problems, paths = [], {}
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
    return (output_root, store_dir, bool(paths["store"])), problems


def _datasets(c: dict) -> tuple[dict, list[str]]:
    """The named data sets (``data:``); one with a bad name or shape is left out with a problem."""
    problems: list[str] = []
    datasets = mapping(c, "data", "named data sets (name: {path: ..., split: ...})", problems)
    for dname, dvalue in list(datasets.items()):
        bad = checks.name_problem(dname, "data", "data set name")
        if bad or not isinstance(dvalue, dict):
            problems.append(bad or f"data.{dname}: must be a mapping with at least `path`, got {dvalue!r} "
                                   f"(e.g. data.{dname}.path=/data/file.jsonl)")
            datasets = {k: v for k, v in datasets.items() if k != dname}
    return datasets, problems


def _stage_entries(c: dict) -> tuple[dict, list[str]]:
    """The recipe's stage entries, each kind's expansion applied (StageKind.expand, e.g. `rounds: N` blocks)."""
    problems: list[str] = []
    entries = mapping(c, "stages", "stage name -> settings (e.g. stages: {sft: {trainer: sft, data: sft}})",
                      problems)
    for kind in STAGES.values():
        if kind.expand is not None:
            entries = kind.expand(entries, problems)
    if not entries and not isinstance(c.get("stages"), (list, str, int, float)):
        problems.append("stages: the recipe defines no stages")
    return entries, problems


def unpinned_notes(model: ModelSpec, stages: tuple[StageSpec, ...]) -> list[str]:
    """One note for the base model and for each Hub data set that is not pinned to a revision."""
    why = "so an upstream change cannot change what trains under this fingerprint"
    notes = []
    name = model.name_or_path
    if name and not model.revision and not tiny.is_tiny(name) and not name.startswith(PKG_PREFIX) \
            and not looks_local(name):
        notes.append(f"model.name_or_path: {name} is unpinned: pin model.revision=<commit> {why}")
    seen = set()
    for s in stages:
        d = s.data
        label = d.label or d.path
        if d.path and d.source == "hub" and not d.revision and label not in seen:
            seen.add(label)
            notes.append(f"{label}: {d.path} is unpinned: pin {label}.revision=<commit> {why}")
    return notes
