"""The typed run spec: what `resolve` returns, what `spec.json` holds, and what the fingerprint covers (no torch).

A :class:`RunSpec` is computed once, by the process that ran Hydra. Each of its :class:`StageSpec` is complete on its
own (the run-wide settings a stage needs are copied into it), is written to ``<run dir>/<stage>/spec.json`` with
:meth:`Spec.to_json` and read back by every rank with :meth:`Spec.from_json`: nothing after resolution re-runs Hydra.

The fingerprint of a stage hashes :meth:`StageSpec.identity`, built from the allowlist :data:`WEIGHT_FIELDS` (the
fields that determine a stage's weights). Every other field is bookkeeping (names, folders, evaluation settings, the
attempt id, the lock token, the resume point), so a new bookkeeping field can never change a fingerprint.

Migration shim: the specs still answer the old dict keys (``spec["init_path"]``, ``spec["data"]["path"]``,
``{**spec}``) through :class:`LegacyMapping`, and :meth:`RunSpec.from_legacy` builds a RunSpec from the dict that
``spec.resolve`` returned before it was typed. Both exist only while call sites move to attributes; they go when
the last one has (a test checks that nothing uses them).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
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


class LegacyMapping(Mapping):
    """Read-only dict access by the old spec keys (see the module docstring): ``LEGACY`` maps an old key to a
    function of the spec; other keys are attribute names."""

    LEGACY: typing.ClassVar[dict[str, Any]] = {}

    def _keys(self) -> list[str]:
        names = [f.name for f in dataclasses.fields(self)]  # type: ignore[arg-type]
        return [k for k in [*names, *self.LEGACY] if self._has(k)]

    def _has(self, key: str) -> bool:
        try:
            self[key]
        except KeyError:
            return False
        return True

    def __getitem__(self, key: str) -> Any:
        if key in self.LEGACY:
            value = self.LEGACY[key](self)
            if value is _MISSING:
                raise KeyError(key)
            return value
        if isinstance(key, str) and key in {f.name for f in dataclasses.fields(self)}:  # type: ignore[arg-type]
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self):
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    __hash__ = None  # type: ignore[assignment]  (specs hold dicts)


_MISSING = object()


# -- the pieces ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec(Spec, LegacyMapping):
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
class DataCheck(Spec, LegacyMapping):
    """What the orchestrator recorded of a local data set's files: content digest and stat signatures."""
    content: str
    files: tuple[tuple, ...] = ()
    # digest-cache entries and other facts recorded with the check (alignctl.store)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSpec(Spec, LegacyMapping):
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

    LEGACY = {"local": lambda d: d.local, "data_check": lambda d: _legacy_check(d.check),
              "stage": lambda d: d.stage if d.stage is not None else _MISSING,
              "check": lambda d: _MISSING, "source": lambda d: _MISSING}


@dataclass(frozen=True)
class EvalSettings(Spec, LegacyMapping):
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
    reward_load: dict[str, Any] | None = None  # an external reward model's own load settings (revision, remote code)


# -- a stage ---------------------------------------------------------------------------------------------------------
# The fields of StageSpec that determine its weights: the fingerprint hashes these (through identity()) and nothing else.
WEIGHT_FIELDS = ("kind", "args", "data", "options", "peft", "world_size", "distributed", "model", "precision", "links")


@dataclass(frozen=True)
class StageSpec(Spec, LegacyMapping):
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
    eval: EvalSettings | None = None
    entry_dir: str | None = None               # the store entry the stage trains into
    fingerprint: str | None = None
    attempt: str | None = None
    lock_token: str | None = None
    resume_from: str | None = None
    model_check: dict[str, Any] = field(default_factory=dict)  # path key -> content check of a local model folder

    LEGACY: typing.ClassVar[dict[str, Any]] = {}  # filled in below the class

    @property
    def source(self) -> LinkSpec:
        return self.links["from"]

    def link(self, kind: str) -> LinkSpec | None:
        return self.links.get(kind)

    def identity(self, linked: dict[str, Any]) -> dict[str, Any]:
        """What the fingerprint hashes: the WEIGHT_FIELDS, with ``linked`` (link kind -> the linked stage's
        fingerprint or the external model's identity) in place of the links. alignctl.store adds data content,
        model identity, launcher numerics, library versions and the format."""
        out = {f: _plain(getattr(self, f)) for f in WEIGHT_FIELDS if f != "links"}
        out["links"] = linked
        return out


@dataclass(frozen=True)
class RunSpec(Spec, LegacyMapping):
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

    @classmethod
    def from_legacy(cls, d: dict[str, Any]) -> "RunSpec":
        """The typed form of the dict ``spec.resolve`` returned before it was typed (migration only)."""
        shared = {k: d[k] for k in ("model", "precision", "cache_dir", "run_dir", "recipe", "store_dir") if k in d}
        return cls(recipe=d["recipe"], stages=tuple(StageSpec.from_legacy({**shared, **s}) for s in d["stages"]),
                   model=ModelSpec.from_legacy(d["model"]), launcher=dict(d.get("launcher") or {"kind": "local"}),
                   description=d.get("description", ""), precision=d.get("precision", "auto"),
                   seed=d.get("seed", 42), output_root=d.get("output_root", "outputs"),
                   cache_dir=d.get("cache_dir", ""), store_dir=d.get("store_dir", ""),
                   store_named=bool(d.get("store_named")), run_dir=d.get("run_dir", ""),
                   eval=EvalSettings.from_legacy(d.get("eval") or {}), sweep=dict(d.get("sweep") or {}),
                   notes=tuple(d.get("notes") or ()))


# -- the migration shim: old keys of a stage spec (see the module docstring) -------------------------------------------
LINK_PATH_KEYS = {"from": "init_path", "ref": "ref_path", "reward": "reward_path", "value": "value_path",
                  "judge": "judge_path"}  # the old spec keys of the link paths (config/links.py: Link.path_key)


def _legacy_check(check: DataCheck | None) -> Any:
    if check is None:
        return None
    return {"content": check.content, "files": [list(f) for f in check.files], **check.extra}


def _link_name(kind: str):
    return lambda s: s.links[kind].stage if kind in s.links else _MISSING


def _link_path(kind: str):
    return lambda s: s.links[kind].path if kind in s.links else _MISSING


def _link_load(s: StageSpec) -> dict:
    return {k: {"revision": ln.revision, "trust_remote_code": ln.trust_remote_code}
            for k, ln in s.links.items() if ln.external}


def _option(key: str):
    return lambda s: s.options[key] if key in s.options else _MISSING


StageSpec.LEGACY = {
    "trainer": lambda s: s.kind, "output_dir": lambda s: s.entry_dir or s.stage_dir,
    "link_load": _link_load, "data_check": lambda s: _legacy_check(s.data.check),
    **{k: _link_name(k) for k in LINK_PATH_KEYS}, **{v: _link_path(k) for k, v in LINK_PATH_KEYS.items()},
    **{k: _option(k) for k in ("reward_funcs", "constitution")},
    "links": lambda s: _MISSING, "options": lambda s: _MISSING, "kind": lambda s: _MISSING,
    "stage_dir": lambda s: _MISSING, "entry_dir": lambda s: _MISSING,
    **{k: (lambda k: lambda s: getattr(s, k) if getattr(s, k) is not None else _MISSING)(k)
       for k in ("eval", "fingerprint", "attempt", "lock_token", "resume_from")},
}


def _data_from_legacy(d: dict[str, Any] | None, cache_dir: str | None) -> DataSpec | None:
    if d is None:
        return None
    check = d.get("data_check")
    source = "generated" if d.get("stage") else "local" if d.get("local", True) else "hub"
    known = {f.name for f in dataclasses.fields(DataSpec)}
    return DataSpec(**{k: v for k, v in d.items() if k in known and k not in ("source", "check", "cache_dir")},
                    source=source, check=_check_from_legacy(check), cache_dir=d.get("cache_dir", cache_dir))


def _check_from_legacy(check: dict | None) -> DataCheck | None:
    if not check:
        return None
    return DataCheck(content=check["content"], files=tuple(tuple(f) for f in check.get("files", ())),
                     extra={k: v for k, v in check.items() if k not in ("content", "files")})


def _stage_from_legacy(cls, d: dict[str, Any]) -> StageSpec:
    load = d.get("link_load") or {}
    links = {}
    for kind, key in LINK_PATH_KEYS.items():
        if kind in d or key in d:
            own = load.get(kind)
            links[kind] = LinkSpec(kind, d.get(key), stage=d.get(kind), external=own is not None,
                                   revision=(own or {}).get("revision"),
                                   trust_remote_code=(own or {}).get("trust_remote_code") is True)
    check = d.get("data_check")
    data = _data_from_legacy(d.get("data"), d.get("cache_dir"))
    if data is not None and check and data.check is None:
        data = data.replace(check=_check_from_legacy(check))
    ev = d.get("eval")
    return cls(name=d["name"], kind=d["trainer"], links=links, data=data, args=dict(d.get("args") or {}),
               options={k: d[k] for k in ("reward_funcs", "constitution") if k in d},
               peft=dict(d.get("peft") or {"method": "none"}), world_size=d.get("world_size", 1),
               distributed=d.get("distributed", "none"), model=ModelSpec.from_legacy(d.get("model") or {}),
               precision=d.get("precision", "auto"), precision_setting=d.get("precision_setting",
                                                                             d.get("precision", "auto")),
               recipe=d.get("recipe", "recipe"), run_dir=d.get("run_dir", ""),
               stage_dir=str(d.get("stage_dir") or d.get("output_dir") or ""), cache_dir=d.get("cache_dir", ""),
               store_dir=d.get("store_dir", ""), description=d.get("description", ""),
               keep_checkpoints=bool(d.get("keep_checkpoints")),
               eval=EvalSettings.from_legacy(ev) if isinstance(ev, dict) else ev,
               entry_dir=d.get("entry_dir"), fingerprint=d.get("fingerprint"), attempt=d.get("attempt"),
               lock_token=d.get("lock_token"), resume_from=d.get("resume_from"),
               model_check=dict(d.get("model_check") or {}))


def _from_legacy_fields(cls, d: dict[str, Any] | None):
    """A plain spec class from a dict that may hold extra (old) keys."""
    d = d or {}
    known = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for k, v in d.items():
        if k in known:
            out[k] = v
    if cls is EvalSettings and isinstance(out.get("prompts_data"), dict):
        out["prompts_data"] = _data_from_legacy(out["prompts_data"], None)
    return cls(**out)


StageSpec.from_legacy = classmethod(_stage_from_legacy)  # type: ignore[attr-defined]
ModelSpec.from_legacy = classmethod(_from_legacy_fields)  # type: ignore[attr-defined]
EvalSettings.from_legacy = classmethod(_from_legacy_fields)  # type: ignore[attr-defined]
