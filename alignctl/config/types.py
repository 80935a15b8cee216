"""The typed run spec: what `resolve` returns, what `spec.json` holds, and what the fingerprint covers (no torch).

A :class:`RunSpec` is computed once, by the process that ran Hydra. Each of its :class:`StageSpec` is complete on its
own (the run-wide settings a stage needs are copied into it), is written to ``<run dir>/<stage>/spec.json`` with
:meth:`Spec.to_json` and read back by every rank with :meth:`Spec.from_json`: nothing after resolution re-runs Hydra.

The fingerprint of a stage hashes :meth:`StageSpec.identity`, built from the allowlist :data:`WEIGHT_FIELDS` (the
fields that determine a stage's weights). Every other field is bookkeeping (names, folders, evaluation settings, the
attempt id, the lock token, the resume point), so a new bookkeeping field can never change a fingerprint.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

FORMAT = 1  # of spec.json


class Spec:
    """Frozen dataclass helpers: plain-dict round trip (nested specs included), JSON, replace."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(sorted(unknown))}")
        return cls(**{k: _typed(hints[k], v) for k, v in d.items()})

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "spec": self.to_dict()}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        blob = json.loads(text)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise ValueError(f"not a {cls.__name__} of spec format {FORMAT}")
        return cls.from_dict(blob["spec"])

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _plain(v: Any) -> Any:
    if isinstance(v, Spec):
        return v.to_dict()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _typed(hint: Any, v: Any) -> Any:
    """``v`` (JSON) as ``hint``: nested Spec classes, tuples of them, dicts of them; anything else as it is."""
    if v is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if isinstance(arg, type) and issubclass(arg, Spec) and isinstance(v, dict):
                return arg.from_dict(v)
        return v
    if isinstance(hint, type) and issubclass(hint, Spec):
        return hint.from_dict(v)
    if hint is tuple:
        return tuple(_typed(tuple, x) if isinstance(x, list) else x for x in v)
    if origin is tuple:
        (arg, *_) = typing.get_args(hint) or (Any,)
        return tuple(_typed(arg, x) for x in v)
    if origin is dict:
        _, arg = typing.get_args(hint) or (Any, Any)
        return {k: _typed(arg, x) for k, x in v.items()}
    return v


# -- the pieces ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec(Spec):
    """The base model (configs/model) and how it is loaded."""
    name_or_path: str
    revision: str | None = None
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    chat_template: str | None = None
    gguf_file: str | None = None


@dataclass(frozen=True)
class LinkSpec(Spec):
    """One link of a stage (config/links.py names the kinds): an earlier stage of the recipe, the base model, or an
    external model (a folder, a Hub id with its own revision, a built-in tiny model) with its own load settings."""
    kind: str                      # from | ref | reward | value | judge
    path: str | None               # <run dir>/<stage>/final, the base model, a folder, a Hub id, tiny:<arch>
    stage: str | None = None       # the recipe stage it names (None: the base model or an external model)
    external: bool = False         # a model outside the recipe: loads with its own settings (below)
    revision: str | None = None    # an external Hub model's own revision (never the base model's)
    trust_remote_code: bool = False  # consent for an external model's code (stages.<s>.trust_remote_code_links)


@dataclass(frozen=True)
class DataCheck(Spec):
    """What the orchestrator recorded of a local data set's files: content digest and stat signatures."""
    content: str
    files: tuple[tuple, ...] = ()
    # digest-cache entries and other facts recorded with the check (alignctl.fingerprint)
    extra: dict[str, Any] = field(default_factory=dict)


# The fields of DataSpec that decide which rows a stage trains on (not: label, check, cache_dir).
DATA_FIELDS = ("source", "path", "split", "eval_split", "eval_size", "seed", "columns", "to_messages", "format",
               "system_turns", "name", "revision", "stage")


@dataclass(frozen=True)
class DataSpec(Spec):
    """A data set: local files, a Hub data set, or the output of an earlier stage of the run (generated)."""
    source: Literal["local", "hub", "generated"]
    path: str
    label: str
    split: str = "train"
    eval_split: str | None = None
    eval_size: float = 0.1
    seed: int = 42
    columns: dict[str, Any] = field(default_factory=dict)
    to_messages: bool = False
    format: str = "auto"
    system_turns: str = "keep"
    name: str | None = None        # Hub config name
    revision: str | None = None    # Hub revision
    stage: str | None = None       # generated by this stage
    check: DataCheck | None = None  # local files: filled in by the orchestrator before anything loads
    cache_dir: str | None = None   # the run's cache (the datasets cache keyed by the check lives there)

    @property
    def local(self) -> bool:
        return self.source != "hub"

    def identity(self) -> dict[str, Any]:
        """The fields of :data:`DATA_FIELDS` (what decides the rows a stage trains on); alignctl.fingerprint puts the
        files' content in place of a local path and the producer's fingerprint in place of generated data's."""
        return {f: _plain(getattr(self, f)) for f in DATA_FIELDS}



@dataclass(frozen=True)
class EvalSettings(Spec):
    """One stage's held-out evaluation (config/eval_settings.py): never part of the fingerprint."""
    enabled: bool = True
    max_prompts: int = 32
    max_new_tokens: int = 64
    temperature: float = 1.0
    seed: int | None = None
    prompts: str | None = None
    prompts_data: DataSpec | None = None
    reward: str | None = None
    reward_path: str | None = None
    # an outside reward model's load settings {revision, trust_remote_code}; None: a reward stage of the recipe
    reward_load: dict[str, Any] | None = None


# -- a stage ---------------------------------------------------------------------------------------------------------
# The fields of StageSpec that determine its weights: the fingerprint hashes these (through identity()) and nothing
# else.
WEIGHT_FIELDS = ("kind", "args", "data", "options", "peft", "world_size", "distributed", "model", "precision", "links")


@dataclass(frozen=True)
class StageSpec(Spec):
    name: str
    kind: str                                  # a key of alignctl.stages.STAGES (recipes call it `trainer`)
    links: dict[str, LinkSpec]                 # from (always), ref/reward/value/judge as the kind takes them
    data: DataSpec
    args: dict[str, Any]                       # TRL config fields (alignctl's own dataclass for ppo/generate)
    options: dict[str, Any] = field(default_factory=dict)   # alignctl keys of the kind (reward_funcs, ...)
    peft: dict[str, Any] = field(default_factory=lambda: {"method": "none"})
    world_size: int = 1
    distributed: str = "none"
    # run-wide settings copied in, so that spec.json is all a worker needs
    model: ModelSpec = field(default_factory=lambda: ModelSpec("tiny:llama"))
    precision: str = "auto"                    # resolved by the orchestrator (bf16 | fp16 | fp32) before training
    precision_setting: str = "auto"            # as written
    recipe: str = "recipe"
    run_dir: str = ""
    stage_dir: str = ""                        # <run dir>/<stage>: where final/ is placed
    cache_dir: str = ""
    store_dir: str = ""
    # bookkeeping: never fingerprinted
    description: str = ""
    keep_checkpoints: bool = False
    # on-policy kinds: thresholds + stop_when (alignctl.train.monitors); the stop rules, which change weights, are
    # also in options["monitor_stops"] (fingerprinted), the warning thresholds only here
    monitors: dict[str, Any] | None = None
    eval: EvalSettings | None = None
    entry_dir: str | None = None               # the store entry the stage trains into
    fingerprint: str | None = None
    attempt: str | None = None
    lock_token: str | None = None
    resume_from: str | None = None
    before_key: str | None = None              # identity of its "before" evaluation (alignctl.fingerprint.before_key)
    trainer_before_key: str | None = None      # and of its trainer's (fingerprint.trainer_before_key; None: not kept)
    model_check: dict[str, Any] = field(default_factory=dict)  # path key -> content check of a local model folder

    @property
    def source(self) -> LinkSpec:
        return self.links["from"]

    def link(self, kind: str) -> LinkSpec | None:
        return self.links.get(kind)

    def identity(self, linked: dict[str, Any]) -> dict[str, Any]:
        """What the fingerprint hashes: the WEIGHT_FIELDS, with ``linked`` (link kind -> the linked stage's
        fingerprint or the external model's identity) in place of the links and the data's own allowlist
        (:meth:`DataSpec.identity`). alignctl.fingerprint drops the TRL fields that cannot change weights and adds data
        content, launcher numerics, library versions and the format."""
        out = {f: _plain(getattr(self, f)) for f in WEIGHT_FIELDS if f not in ("links", "data")}
        out["data"] = self.data.identity() if self.data is not None else None
        out["links"] = linked
        return out


@dataclass(frozen=True)
class RunSpec(Spec):
    recipe: str
    stages: tuple[StageSpec, ...]
    model: ModelSpec
    launcher: dict[str, Any]
    description: str = ""
    precision: str = "auto"
    seed: int = 42
    output_root: str = "outputs"
    cache_dir: str = ""
    store_dir: str = ""
    store_named: bool = False                  # `store` was named (command line / --config-dir): the trust rule
    run_dir: str = ""
    eval: EvalSettings = field(default_factory=EvalSettings)
    sweep: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)
