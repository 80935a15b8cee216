"""Stage-kind registry.

Each stage kind is one module in this package that defines ``KIND`` (a
:class:`StageKind`: its TRL config class, the data it needs, the links it takes)
and ``run(ctx)``. Importing a stage module is cheap (TRL and torch are imported
inside ``run``), so ``alignctl plan`` can read the registry without loading torch.
Adding a stage kind = one module + one name in ``_MODULES``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

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


def _load() -> dict[str, StageKind]:
    kinds = {}
    for name in _MODULES:
        mod = importlib.import_module(f"alignctl.stages.{name}")
        kinds[mod.KIND.name] = mod.KIND
    return kinds


STAGES: dict[str, StageKind] = _load()


def module(trainer: str) -> ModuleType:
    return importlib.import_module(f"alignctl.stages.{trainer}")
