"""What the per-concern resolvers share while one config resolves (no torch): the run-wide settings already
resolved, the notes collected so far, and the stages resolved so far (later stages link to them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from alignctl.config.types import ModelSpec, StageSpec


@dataclass
class Context:
    run_dir: Path
    model: ModelSpec                  # the base model as written (checked by resolve_model; may still be wrong)
    run: bool                         # resolving for `alignctl run` (else `plan`): what only a run needs counts
    check_data: bool                  # peek into local data files (plan and run do; a few callers do not)
    notes: list[str]                  # warnings that stop nothing, in the order found
    datasets: dict                    # the named data sets (`data:`)
    entries: dict                     # every stage entry of the recipe (rounds expanded): "comes later" messages
    launcher: dict                    # the resolved launcher (world size, engine)
    peft: dict                        # the run's peft setting, which a stage's `peft` key overrides
    seed: int
    precision: str
    recipe: str
    cache_dir: str
    store_dir: str
    stages: list[StageSpec] = field(default_factory=list)  # resolved so far, in order

    def earlier(self) -> dict[str, str]:
        """The stages resolved so far: name -> kind."""
        return {s.name: s.kind for s in self.stages}


def mapping(c: dict, key: str, what: str, problems: list[str]) -> dict:
    """A top-level mapping (model, data, stages, ...), or {} with a problem naming the key and the shape it needs."""
    value = c.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{key}: must be a mapping of {what}, got {type(value).__name__} {str(value)[:60]!r}")
        return {}
    return value
