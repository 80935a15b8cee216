"""Stage-kind registry.

Each stage kind is one module in this package that defines ``KIND`` (a
:class:`StageKind`: its TRL config class, the data it needs, the links it takes)
and ``run(ctx)``. Importing a stage module is cheap (TRL and torch are imported
inside ``run``), so ``alignctl plan`` can read the registry without loading torch.
Adding a stage kind = one module + one name in ``_MODULES``. Everything kind-specific that plan checks or derives
(its own field ranges and checks, rounds, the data it writes, whether it can run sharded) is declared in its
``KIND`` (the "plan-time rules" fields): alignctl/config/ names no stage kind.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alignctl.config.types import DataSpec, StageSpec

_MODULES = ("sft", "dpo", "orpo", "reward", "ppo", "kto", "cpo", "grpo", "rloo", "generate")


@dataclass(frozen=True)
class StageKind:
    name: str
    config_class: str  # dotted path of the TRL config dataclass whose fields the stage accepts
    data_kind: str  # what its data must hold: sft | preference | prompt | unpaired
    summary: str
    links: tuple[str, ...] = ()  # extra links it accepts besides `from`: ref, reward, value
    output: str = "causal_lm"  # what final/ holds: causal_lm | classifier | data (a generated data set)
    key_fields: tuple[str, ...] = field(default=("learning_rate", "num_train_epochs", "per_device_train_batch_size"))
    headline: str = "eval_loss"  # the held-out metric shown before -> after in summaries
    needs_reward: bool = False  # must have a reward source: the `reward` link (or an entry of a `reward_funcs` option)
    options: tuple[str, ...] = ()  # alignctl keys the stage takes besides TRL fields and links, e.g. reward_funcs
    # it samples completions when it evaluates during training (online RL): the evaluation cadence then moves its RNG
    # stream, so the cadence fields are part of its fingerprint (alignctl.store)
    samples_during_eval: bool = False

    # plan-time rules: everything kind-specific that alignctl.config checks or derives (no torch), declared here
    # TRL field -> range rule (alignctl.config.checks) that replaces the shared rule for this kind
    ranges: Mapping[str, tuple] = field(default_factory=dict)
    # its own checks of a resolved stage (options, links, fields): check(stage, "stages.<name>") -> problems
    check: Callable[[StageSpec, str], list[str]] | None = None
    # rewrites the recipe's stage entries before they resolve (e.g. `rounds:` blocks): expand(stages, problems)
    expand: Callable[[dict, list[str]], dict] | None = None
    # a kind whose output is data: the data kind it writes for a stage, and the data spec of a later stage's
    # `data: <this stage>` (its final/ folder under the run directory)
    produces: Callable[[StageSpec], str] | None = None
    data_source: Callable[[StageSpec, str], DataSpec] | None = None
    # why it cannot run with the weights sharded across ranks (DeepSpeed ZeRO-3, FSDP), or None
    sharded_unsupported: str | None = None


def _load() -> dict[str, StageKind]:
    kinds = {}
    for name in _MODULES:
        mod = importlib.import_module(f"alignctl.stages.{name}")
        kinds[mod.KIND.name] = mod.KIND
    return kinds


STAGES: dict[str, StageKind] = _load()


def module(trainer: str) -> ModuleType:
    return importlib.import_module(f"alignctl.stages.{trainer}")
