"""Resolve one stage of the recipe into a :class:`StageSpec` (no torch): its kind, TRL fields (against the snapshot,
with the kind's own ranges), links (resolve_links), options, peft, data (a named or inline data set, or the output
of an earlier stage), batch and sharding, then the kind's own checks (StageKind.check)."""

from __future__ import annotations

from typing import Any

from alignctl.config import checks, launcher, peft, trl_facts, trl_fields
from alignctl.config import links as link_table
from alignctl.config.data_checks import check as check_data
from alignctl.config.data_checks import normalize, to_spec
from alignctl.config.resolve_context import Context
from alignctl.config.resolve_links import resolve_links
from alignctl.config.types import DataSpec, StageSpec
from alignctl.errors import suggest
from alignctl.stages import STAGES, StageKind
from alignctl.train import monitors

STAGE_KEYS = {"trainer", "from", "data", "description", "peft", "global_batch_size", "trust_remote_code_links",
              "keep_checkpoints", "monitors"}
LINK_KEYS = {link.name for link in link_table.LINKS if link.name not in STAGE_KEYS}  # `from` is a stage key
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


def resolve_stage(name: Any, raw: Any, ctx: Context) -> tuple[StageSpec | None, list[str]]:
    """One stage entry, or None when it has no valid name, shape or kind (nothing else can be checked then)."""
    kind, problems = _kind(name, raw)
    if kind is None:
        return None, problems
    where, raw = f"stages.{name}", dict(raw)
    trl = trl_fields.fields(kind.config_class)
    args, problems = _fields(raw, kind, trl, where)
    more, notes = trl_facts.check(kind.config_class, args, where)  # what TRL 1.16 does with old settings
    problems += more
    ctx.notes.extend(notes)
    links, more = resolve_links(raw, kind, name, ctx, where)
    problems += more
    options = {k: raw[k] for k in kind.options if k in raw}
    if kind.needs_reward and raw.get("reward") is None and not options.get("reward_funcs"):
        funcs = " or list TRL reward functions in `reward_funcs`" if "reward_funcs" in kind.options else ""
        problems.append(f"{where}.reward: a {kind.name} stage needs a reward source: name a reward stage of this "
                        f"recipe (e.g. `reward: rm`) or a reward model path{funcs}")
    stage_peft, more = _peft(raw.get("peft"), ctx.peft, where)
    problems += more
    data, more = _data(raw.get("data"), kind, ctx, where)
    problems += more
    # distributed: gradient accumulation from global_batch_size; engine/stage combinations that fail
    problems += launcher.apply_batch(raw, args, trl, ctx.launcher, where)
    problems += launcher.stage_problems(kind, stage_peft, ctx.launcher, where)
    args.setdefault("seed", ctx.seed)
    args.setdefault("report_to", "none")
    keep = raw.get("keep_checkpoints", False)  # keep the Trainer checkpoints of a completed stage (store)
    if not isinstance(keep, bool):
        problems.append(f"{where}.keep_checkpoints: must be true or false, got {keep!r}")
    description = raw.get("description")
    stage_monitors, more = monitors.resolve(raw.get("monitors"), kind, where)
    problems += more
    if monitors.stop_rules(stage_monitors):  # a monitor that can stop the stage changes its weights
        options["monitor_stops"] = monitors.stop_rules(stage_monitors)
    stage = StageSpec(
        name=name, kind=kind.name, links=links, data=data, args=args, options=options, peft=stage_peft,
        # world size and engine change the trained weights, so they are part of the stage (and its fingerprint)
        world_size=ctx.launcher["world_size"], distributed=ctx.launcher["distributed"], model=ctx.model,
        precision=ctx.precision, precision_setting=ctx.precision, recipe=ctx.recipe, run_dir=str(ctx.run_dir),
        stage_dir=str(ctx.run_dir / name), cache_dir=ctx.cache_dir, store_dir=ctx.store_dir,
        description=description if isinstance(description, str) else "", keep_checkpoints=keep is True,
        monitors=stage_monitors)
    if kind.check is not None:  # the kind's own rules (its options, links and fields)
        problems += kind.check(stage, where)
    return stage, problems


def _kind(name: Any, raw: Any) -> tuple[StageKind | None, list[str]]:
    bad = checks.name_problem(name, "stages", "stage name")
    if bad:
        return None, [bad]
    where = f"stages.{name}"
    if not isinstance(raw, dict):
        return None, [f"{where}: must be a mapping with at least `trainer`"]
    trainer = raw.get("trainer")
    if not isinstance(trainer, str) or trainer not in STAGES:
        return None, [f"{where}.trainer: unknown trainer '{trainer}'{suggest(str(trainer), STAGES)}; "
                      f"known: {', '.join(STAGES)}"]
    return STAGES[trainer], []


def _fields(raw: dict, kind: StageKind, trl: dict, where: str) -> tuple[dict, list[str]]:
    """The stage's TRL fields (every key that is not a stage key, a link or an option of its kind), checked against
    the snapshot: types, then ranges and choices of those whose type is right."""
    args: dict[str, Any] = {}
    problems = []
    for key, value in raw.items():
        if key in STAGE_KEYS or key in kind.links or key in kind.options:
            continue
        if key in SECRET_FIELDS:
            problems.append(f"{where}.{key}: {SECRET_FIELDS[key]}")
        elif key in OWNED_FIELDS:
            problems.append(f"{where}.{key}: {OWNED_FIELDS[key]}")
        elif key in REFUSED_ON and value:
            problems.append(f"{where}.{key}: refused: {REFUSED_ON[key]}")
        elif key in trl:
            bad = checks.type_problem(value, trl[key]["type"])
            if bad:
                problems.append(f"{where}.{key}: {bad}")
            args[key] = value
        elif key in LINK_KEYS:
            problems.append(f"{where}.{key}: a {kind.name} stage takes no `{key}` link")
        else:
            cands = set(trl) | STAGE_KEYS | set(kind.links)
            problems.append(checks.unknown_key(where, key, cands) + f" — not a field of {kind.config_class}")
    typed = {k: v for k, v in args.items() if not checks.type_problem(v, trl[k]["type"])}
    problems += checks.field_problems(typed, trl, where, dict(kind.ranges))
    return args, problems


def _peft(value: Any, run_peft: dict, where: str) -> tuple[dict, list[str]]:
    """The stage's peft setting: the run's, a preset, or fields overriding either (only what it sets is checked
    here: the run's own setting is checked once)."""
    stage_peft, problems = peft.resolve_peft(value, run_peft, peft.preset, f"{where}.peft")
    if value is None:
        return stage_peft, []
    own = value if isinstance(value, dict) and "method" not in value else None
    return stage_peft, problems or peft.peft_problems(stage_peft, f"{where}.peft", only=own and set(own))


def _data(ref: Any, kind: StageKind, ctx: Context, where: str) -> tuple[DataSpec | None, list[str]]:
    """A data set named in `data:` or written inline, or the output of an earlier stage whose kind produces data
    (StageKind.data_source: its final/ folder, written at run time)."""
    producer = next((s for s in ctx.stages if s.name == ref and STAGES[s.kind].data_source is not None), None)
    if producer is None:
        return dataset(ref, ctx.datasets, where, kind.data_kind, ctx.check_data)
    made = STAGES[producer.kind]
    writes = made.produces(producer)
    writes = (writes,) if isinstance(writes, str) else writes
    spec = made.data_source(producer, str(ctx.run_dir), kind.data_kind if kind.data_kind in writes else writes[0])
    if kind.data_kind not in writes:
        hint = f" (set stages.{producer.name}.pairs accordingly)" if len(writes) == 1 else ""
        return spec, [f"{where}.data: '{producer.name}' writes {' and '.join(writes)} data; a {kind.name} stage "
                      f"needs {kind.data_kind} data{hint}"]
    return spec, []


def dataset(ref: Any, datasets: dict, where: str, data_kind: str, check: bool) -> tuple[DataSpec | None, list[str]]:
    """A named data set (``data.<name>``) or an inline one (``<where>.data``), normalized and, with ``check``, its
    local files peeked for the columns of ``data_kind``; None when it has problems."""
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
    spec, problems = normalize(spec, label)
    if not problems and check:
        problems = check_data(spec, data_kind, label, stage=where)
    return (None if problems else to_spec({**spec, "label": label})), problems
