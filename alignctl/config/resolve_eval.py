"""Resolve the run's ``eval`` group (its prompt data set and reward source, checked now rather than after the first
stage trained) and ``sweep`` (the objective a sweeper reads after training). No torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignctl.config import links as link_table
from alignctl.config.data_checks import looks_local
from alignctl.config.eval_settings import settings_problems
from alignctl.config.resolve_context import Context
from alignctl.config.resolve_links import external_model_problems
from alignctl.config.resolve_stage import dataset
from alignctl.config.types import EvalSettings, LinkSpec
from alignctl.errors import suggest
from alignctl.stages import STAGES


def resolve_eval(value: Any, ctx: Context) -> tuple[EvalSettings, list[str]]:
    """The `eval` group (config/eval_settings.py), its prompt data set and its reward source."""
    ev, problems = settings_problems(value)
    name = ev.get("prompts")
    if isinstance(name, str) and name:
        if name not in ctx.datasets:
            problems.append(f"eval.prompts: no data set named '{name}'{suggest(name, ctx.datasets)}; "
                            f"defined: {', '.join(ctx.datasets) or 'none'}")
        else:  # prompts only
            ev["prompts_data"], more = dataset(name, ctx.datasets, "eval.prompts", "prompt", ctx.check_data)
            problems += more
    reward = ev.get("reward")
    if isinstance(reward, str) and reward:
        problems += _eval_reward(ev, reward, ctx)
    return EvalSettings(**ev), problems


def _eval_reward(ev: dict, reward: str, ctx: Context) -> list[str]:
    """``eval.reward``: a reward stage of the recipe, or a reward model outside it (a folder, or a Hub id
    ``org/repo[@revision]``). An outside model loads with its own revision and tokenizer and never with remote code
    (``reward_load``; alignctl.config.links.EVAL_REWARD)."""
    earlier = ctx.earlier()
    rms = [n for n, k in earlier.items() if STAGES[k].output == link_table.CLASSIFIER]
    if reward in earlier:
        if reward in rms:
            return []
        return [f"eval.reward: '{reward}' is a {earlier[reward]} stage, not a reward stage "
                f"(reward stages: {', '.join(rms) or 'none'})"]
    if looks_local(reward):  # a model folder
        path, rev = str(Path(reward).expanduser().absolute()), None
    else:
        path, rev = link_table.hub_ref(reward)
        if path.count("/") != 1 or rev == "":
            return [f"eval.reward: '{reward}' is neither a reward stage of this recipe (reward stages: "
                    f"{', '.join(rms) or 'none'}) nor a model folder or Hub id (org/repo[@revision])"]
    link = LinkSpec(link_table.EVAL_REWARD.name, path, external=True, revision=rev)
    bad = external_model_problems(link_table.EVAL_REWARD, link, "eval.reward", ctx, how=None)
    if not bad:
        ev["reward"], ev["reward_load"] = path, {"revision": rev, "trust_remote_code": False}
        if ctx.model.trust_remote_code is True:
            ctx.notes.append(f"eval.reward: {reward} is loaded without remote code (model.trust_remote_code covers "
                             "the base model and the recipe's stages only)")
    return bad


def resolve_sweep(value: Any, stage_names) -> tuple[dict, list[str]]:
    """``sweep``: only ``objective``, a held-out metric of the last stage or ``<stage>:<metric>``."""
    sweep = value or {}
    if not isinstance(sweep, dict) or set(sweep) - {"objective"}:
        return sweep, [f"sweep: takes only `objective` (a metric name, e.g. eval_win_rate or dpo:eval_kl), "
                       f"got {sweep!r}"]
    objective = sweep.get("objective")
    if objective is None:
        return sweep, []
    if not isinstance(objective, str) or not objective:
        return sweep, [f"sweep.objective: must be a metric name such as eval_win_rate, got {objective!r}"]
    wanted, _, metric = objective.rpartition(":")  # read after training: a typo would hand the sweeper no value
    if wanted and wanted not in stage_names:
        return sweep, [f"sweep.objective: '{wanted}' names no stage{suggest(wanted, stage_names)}; stages: "
                       f"{', '.join(stage_names) or 'none'} (write <stage>:<metric>, or a metric of the last stage)"]
    if not metric.startswith("eval_"):
        return sweep, [f"sweep.objective: '{metric}' is not a held-out metric; held-out metrics start with eval_ "
                       "(e.g. eval_win_rate, eval_kl, eval_loss, eval_pref_accuracy_norm)"]
    return sweep, []
