"""Stage-kind registry: the only place stage kinds are known by name.

Each stage kind is one module in this package that defines ``KIND`` (a :class:`StageKind`: its TRL config class,
the data it needs, the links it takes, and its run-time behaviour: ``build(ctx)``, which returns the trainer the
one lifecycle of alignctl.train.lifecycle drives). Importing a stage module is cheap (TRL and torch are imported
inside ``build``), so ``alignctl plan`` can read the registry without loading torch. Adding a stage kind = one
module + one name in ``_MODULES`` (or, for a module outside the package, one :func:`register` call). Everything
kind-specific that plan checks or derives (its own field ranges and checks, rounds, the data it writes, whether it
can run sharded) is declared in its ``KIND`` (the "plan-time rules" fields): alignctl/config/ names no stage kind.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from alignctl.config.types import DataSpec, StageSpec
    from alignctl.train.context import StageContext
    from alignctl.train.lifecycle import Trainable

_MODULES = ("sft", "dpo", "orpo", "reward", "ppo", "kto", "cpo", "grpo", "rloo", "generate", "critique")


@dataclass(frozen=True)
class StageKind:
    name: str
    config_class: str  # dotted path of the TRL config dataclass whose fields the stage accepts
    data_kind: str  # what its data must hold: sft | preference | prompt | unpaired
    summary: str
    links: tuple[str, ...] = ()  # extra links it accepts besides `from`: ref, reward, value
    # links it accepts as a list of several models (an ensemble; alignctl.config.links.Link.many), e.g. PPO's reward
    ensemble_links: tuple[str, ...] = ()
    output: str = "causal_lm"  # what final/ holds: causal_lm | classifier | data (a generated data set)
    key_fields: tuple[str, ...] = field(default=("learning_rate", "num_train_epochs", "per_device_train_batch_size"))
    headline: str = "eval_loss"  # the held-out metric shown before -> after in summaries
    needs_reward: bool = False  # must have a reward source: the `reward` link (or an entry of a `reward_funcs` option)
    options: tuple[str, ...] = ()  # alignctl keys the stage takes besides TRL fields and links, e.g. reward_funcs
    # it samples completions when it evaluates during training (online RL): the evaluation cadence then moves its RNG
    # stream, so the cadence fields are part of its fingerprint (alignctl.fingerprint)
    samples_during_eval: bool = False
    # the reward-hacking monitors' signals its per-update logs carry (alignctl.train.monitors.SOURCES); empty: the
    # kind samples no answers while training and takes no `monitors:` key
    monitor_signals: tuple[str, ...] = ()

    # plan-time rules: everything kind-specific that alignctl.config checks or derives (no torch), declared here
    # TRL field -> range rule (alignctl.config.checks) that replaces the shared rule for this kind
    ranges: Mapping[str, tuple] = field(default_factory=dict)
    # its own checks of a resolved stage (options, links, fields): check(stage, "stages.<name>") -> problems
    check: Callable[[StageSpec, str], list[str]] | None = None
    # rewrites the recipe's stage entries before they resolve (e.g. `rounds:` blocks): expand(stages, problems)
    expand: Callable[[dict, list[str]], dict] | None = None
    # a kind whose output is data: the data kind(s) it writes for a stage, and the data spec of a later stage's
    # `data: <this stage>` (its final/ folder under the run directory), data_source(stage, run_dir, data_kind):
    # a kind writing several (a critique stage: SFT rows and pairs) gives each consumer the one its kind reads
    produces: Callable[[StageSpec], str | tuple[str, ...]] | None = None
    data_source: Callable[[StageSpec, str, str], DataSpec] | None = None
    # why it cannot run with the weights sharded across ranks (DeepSpeed ZeRO-3, FSDP), or None
    sharded_unsupported: str | None = None

    # run-time behaviour (alignctl.train.lifecycle) --------------------------------------------------------------
    # build(ctx): its trainer (a lifecycle.Trainable) from the stage's pieces (alignctl.train.context); required
    build: Callable[[StageContext], Trainable] | None = None
    # an interrupted stage resumes from its newest valid checkpoint (alignctl.pipeline); else it starts again
    resumable: bool = True
    # before_ignores(stage) -> TRL fields its trainer's evaluation at step 0 does not read beyond the training-only
    # ones (alignctl.fingerprint.TRAIN_ONLY_ARGS): the trainer's "before" metrics are then kept across sweep points
    # (alignctl.train.before_cache); None: its trainer evaluates the initial weights every time
    before_ignores: Callable[[StageSpec], frozenset[str]] | None = None
    # alignctl's eval_pref_accuracy on the held-out pairs, before and after; "if_paired": when the held-out split
    # holds pairs (kto trains on unpaired rows)
    preference_eval: bool | Literal["if_paired"] = False
    # extra_metrics(trainer, metrics) -> metrics: what the kind adds to the lifecycle's metrics once it has saved
    extra_metrics: Callable[[Trainable, dict[str, Any]], dict[str, Any]] | None = None
    # report_section(stage, run_dir, stages) -> markdown lines for run reports (stage, stages: manifest entries),
    # under the heading report_heading; one section per kind
    report_section: Callable[[dict[str, Any], Path, list[dict[str, Any]]], list[str]] | None = None
    report_heading: str = ""


def _kind_of(mod: ModuleType) -> StageKind:
    kind = mod.KIND
    if kind.build is None:
        raise TypeError(f"stage kind {kind.name} ({mod.__name__}): its KIND declares no build(ctx)")
    return kind


def _load() -> tuple[dict[str, StageKind], dict[str, ModuleType]]:
    kinds, mods = {}, {}
    for name in _MODULES:
        mod = importlib.import_module(f"alignctl.stages.{name}")
        kinds[mod.KIND.name], mods[mod.KIND.name] = _kind_of(mod), mod
    return kinds, mods


STAGES: dict[str, StageKind]
STAGES, _LOADED = _load()


def register(mod: ModuleType) -> StageKind:
    """Add the stage kind a module outside this package defines (its ``KIND``) to :data:`STAGES`, in this process
    (a kind trained under torchrun or accelerate, whose ranks are new processes, belongs in ``_MODULES``)."""
    kind = _kind_of(mod)
    if kind.name in STAGES and _LOADED[kind.name] is not mod:
        raise ValueError(f"stage kind {kind.name} is registered already (by {_LOADED[kind.name].__name__})")
    STAGES[kind.name], _LOADED[kind.name] = kind, mod
    return kind


def unregister(name: str) -> None:
    """Forget a kind :func:`register` added (the package's own kinds stay)."""
    if name in _MODULES:
        raise ValueError(f"stage kind {name} is one of alignctl's own")
    STAGES.pop(name, None)
    _LOADED.pop(name, None)


def module(kind: str) -> ModuleType:
    return _LOADED[kind]
