"""The ``eval`` group at plan time (no torch): its keys, defaults and checks (:func:`settings_problems`), and each
stage's evaluation settings (:func:`stage_settings`): where its prompts and reward model come from. They are part of
the stage spec but never of its fingerprint. Running the evaluation is alignctl.evaluate.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignctl.config.links import CAUSAL_LM, CLASSIFIER
from alignctl.config.types import EvalSettings, LinkSpec, StageSpec
from alignctl.errors import suggest

# The `eval:` group of configs/config.yaml, with its defaults (also used for specs written before it existed).
DEFAULTS: dict[str, Any] = {"enabled": True, "max_prompts": 32, "max_new_tokens": 64, "temperature": 1.0,
                            "seed": None, "prompts": None, "reward": None}
LIMITS = {"max_prompts": (1, 100_000), "max_new_tokens": (1, 32_768)}


def settings_problems(value: Any, where: str = "eval") -> tuple[dict, list[str]]:
    """The ``eval`` setting with defaults filled in, and the problems with it (unknown keys, types, ranges)."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        return dict(DEFAULTS), [f"{where}: must be a mapping of {', '.join(DEFAULTS)}, got {value!r}"]
    problems = [f"{where}: unknown key '{k}'{suggest(k, DEFAULTS)}; known: {', '.join(DEFAULTS)}"
                for k in value if k not in DEFAULTS]
    out = {**DEFAULTS, **{k: v for k, v in value.items() if k in DEFAULTS}}
    if not isinstance(out["enabled"], bool):
        problems.append(f"{where}.enabled: must be true or false, got {out['enabled']!r}")
    for key, (lo, hi) in LIMITS.items():
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            problems.append(f"{where}.{key}: must be a whole number from {lo} to {hi}, got {v!r}")
    t = out["temperature"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 100 or t != t:
        problems.append(f"{where}.temperature: must be a number from 0 (greedy) to 100, got {t!r}")
    s = out["seed"]
    if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 0):
        problems.append(f"{where}.seed: must be a non-negative whole number or null (the run's seed), got {s!r}")
    for key in ("prompts", "reward"):
        if out[key] is not None and (not isinstance(out[key], str) or not out[key]):
            problems.append(f"{where}.{key}: must be a name (or path), got {out[key]!r}")
    return out, problems


def stage_settings(ev: EvalSettings, stage: StageSpec, stages: Sequence[StageSpec], run_seed: int) -> EvalSettings:
    """One stage's evaluation settings: where its prompts, reward model and reference come from. Reward model:
    ``eval.reward`` (a reward stage, scoring the stages after it, or a path), else the stage's own ``audit`` link,
    else its ``reward`` link, else the nearest earlier reward stage of the recipe."""
    run = {"enabled": ev.enabled, "max_prompts": ev.max_prompts, "max_new_tokens": ev.max_new_tokens,
           "temperature": ev.temperature, "seed": ev.seed, "prompts_data": ev.prompts_data, "reward": ev.reward,
           "reward_load": ev.reward_load}
    own = _own_reward(stage.link("audit")) or _own_reward(stage.link("reward"))  # an audit judges when there is one
    out = _settings(run, stage.kind, stage.name, [(s.name, s.kind) for s in stages], stage.run_dir, own, run_seed)
    return EvalSettings(prompts=ev.prompts, **out)


def _own_reward(link: LinkSpec | None) -> tuple | None:
    if link is None or not link.path:
        return None
    load = {"revision": link.revision, "trust_remote_code": link.trust_remote_code} if link.external else None
    return link.stage, link.path, load


def _settings(ev: dict, kind: str, name: str, recipe: list[tuple[str, str]], run_dir: str, own_reward: tuple | None,
              run_seed: int) -> dict:
    """The settings of stage ``name`` (of kind ``kind``) from the run's ``ev``; ``recipe``: (name, kind) of every
    stage in order; ``own_reward``: the stage's reward link as (stage, path, load settings), or None."""
    from alignctl.stages import STAGES

    out = {k: ev.get(k, DEFAULTS[k]) for k in ("enabled", "max_prompts", "max_new_tokens", "temperature")}
    out["seed"] = ev.get("seed") if ev.get("seed") is not None else run_seed
    out["prompts_data"] = ev.get("prompts_data")
    if STAGES[kind].output != CAUSAL_LM:
        out["enabled"] = False
        return out
    names = [n for n, _ in recipe]
    earlier = recipe[:names.index(name)]
    reward, reward_path, load = None, None, None
    wanted = ev.get("reward")
    if wanted:
        if wanted in names:
            if any(n == wanted for n, _ in earlier):
                reward, reward_path = wanted, str(Path(run_dir) / wanted / "final")
        else:  # a model outside the recipe: its own revision, never remote code (resolve_eval.eval_reward)
            reward, reward_path, load = wanted, wanted, ev.get("reward_load") or {"trust_remote_code": False}
    elif own_reward is not None:
        reward, reward_path, load = own_reward
    else:
        rms = [n for n, k in earlier if STAGES[k].output == CLASSIFIER]
        if rms:
            reward, reward_path = rms[-1], str(Path(run_dir) / rms[-1] / "final")
    out["reward"], out["reward_path"] = reward or reward_path, reward_path  # a stage's name, else the model itself
    out["reward_load"] = load  # None: a stage of the recipe (loaded with the base model's settings)
    return out
