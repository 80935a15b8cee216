"""Group-relative policy optimisation (TRL GRPOTrainer), scored by a reward stage's model and/or TRL reward functions.

Rewards, in this order (TRL's ``reward_weights``, when set, follow it):

* the ``reward:`` link: a reward stage of the recipe (or a model path), passed to TRL as a
  sequence-classification reward model, scored on the chat-formatted prompt + completion;
* ``reward_funcs:``: TRL's built-in reward functions (``trl.rewards``) by name, e.g.
  ``[think_format_reward]``; the ``get_*`` factories take their arguments as a mapping,
  e.g. ``[{get_repetition_penalty_reward: {ngram_size: 3, max_penalty: -1.0}}]``.

At least one is needed. The data is prompts only. The reference model (when ``beta`` > 0)
is the stage's initial weights. Held-out metric: TRL's ``eval_reward`` (weighted sum of the
rewards of completions sampled for the held-out prompts), and per function
``eval_rewards/<name>/mean`` (the reward stage's name for the reward model). ``kl_target`` (per token; with
``kl_horizon``) adapts ``beta`` during training (alignctl.rl.beta). An ``audit:`` reward model is scored
beside them with weight 0 (``rewards/audit/mean``: the ``audit_drop`` monitor) and judges the held-out win rates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alignctl.config.checks import NONNEG
from alignctl.stages import StageKind
from alignctl.train import monitors

if TYPE_CHECKING:
    from alignctl.config.types import StageSpec

def build(ctx):
    """TRL's GRPOTrainer with the stage's rewards (:func:`reward_functions`, below)."""
    from trl import GRPOConfig, GRPOTrainer

    from alignctl.rl.beta import adaptive

    funcs, classes = reward_functions(ctx)
    trainer = adaptive(GRPOTrainer, ctx.spec.options)  # kl_target: beta adapts (alignctl.rl.beta)
    return trainer(model=ctx.load_policy(), reward_funcs=funcs, args=with_audit_weight(ctx, GRPOConfig),
                       train_dataset=ctx.train, eval_dataset=ctx.eval, processing_class=ctx.tokenizer,
                       reward_processing_classes=classes, peft_config=ctx.peft_config())

# TRL's built-in reward functions (trl.rewards): name -> whether it is a factory taking arguments.
BUILTIN_REWARDS = {
    "accuracy_reward": False, "reasoning_accuracy_reward": False, "think_format_reward": False,
    "get_cosine_scaled_reward": True, "get_repetition_penalty_reward": True, "get_soft_overlong_punishment": True,
}
# The factories' arguments (name -> required?) as in TRL 1.12's signatures (tests/config/test_bad_inputs.py compares
# them).
FACTORY_ARGS: dict[str, dict[str, bool]] = {
    "get_cosine_scaled_reward": {"max_len": True, "min_value_wrong": False, "max_value_wrong": False,
                                 "min_value_correct": False, "max_value_correct": False},
    "get_repetition_penalty_reward": {"ngram_size": False, "max_penalty": False},
    "get_soft_overlong_punishment": {"max_completion_len": True, "soft_punish_cache": True},
}


def _entries(funcs) -> list[tuple[str, dict]]:
    """``reward_funcs`` entries as (name, arguments); raises ValueError on a malformed entry."""
    out = []
    for f in funcs or []:
        if isinstance(f, str):
            out.append((f, {}))
        elif isinstance(f, dict) and len(f) == 1 and isinstance(next(iter(f.values())) or {}, dict):
            name, kwargs = next(iter(f.items()))
            out.append((str(name), dict(kwargs or {})))
        else:
            raise ValueError(f"entry {f!r} is neither a name nor a one-key mapping name -> arguments")
    return out


def check(stage: StageSpec, where: str) -> list[str]:
    """Plan-time checks of ``reward_funcs`` and of ``reward_weights`` against the number of rewards, and of the
    adaptive beta (alignctl.rl.beta)."""
    from alignctl.config import trl_fields
    from alignctl.rl import beta
    from alignctl.stages import STAGES

    # TRL's default beta of the kind (grpo 0, rloo 0.05) when the stage sets none
    default = trl_fields.fields(STAGES[stage.kind].config_class).get("beta", {}).get("default", 0.0)
    return beta.check(stage, where, default) + reward_problems(stage, where)


def reward_problems(stage: StageSpec, where: str) -> list[str]:
    """``reward_funcs`` are TRL's built-in ones with their arguments; ``reward_weights`` one per reward (also read by
    generate stages)."""
    from alignctl.errors import suggest

    funcs = stage.options.get("reward_funcs")
    if funcs is not None and not isinstance(funcs, list):
        return [f"{where}.reward_funcs: must be a list of TRL reward function names, got {funcs!r}"]
    try:
        entries = _entries(funcs)
    except ValueError as e:
        return [f"{where}.reward_funcs: {e}"]
    problems = []
    for name, kwargs in entries:
        if name not in BUILTIN_REWARDS:
            problems.append(f"{where}.reward_funcs: unknown reward function '{name}'{suggest(name, BUILTIN_REWARDS)}; "
                            f"TRL's built-in ones: {', '.join(BUILTIN_REWARDS)}")
        elif kwargs and not BUILTIN_REWARDS[name]:
            problems.append(f"{where}.reward_funcs: '{name}' takes no arguments")
        elif BUILTIN_REWARDS[name]:
            params = FACTORY_ARGS[name]
            for arg in kwargs:
                if arg not in params:
                    problems.append(f"{where}.reward_funcs: {name} has no argument '{arg}'{suggest(arg, params)}; "
                                    f"its arguments: {', '.join(params)}")
            missing = [a for a, required in params.items() if required and a not in kwargs]
            if missing:
                problems.append(f"{where}.reward_funcs: {name} needs {', '.join(missing)}, e.g. "
                                f"[{{{name}: {{{', '.join(f'{a}: ...' for a in missing)}}}}}]")
    weights = stage.args.get("reward_weights")
    reward = stage.link("reward")
    n = len(entries) + (1 if reward is not None and reward.path else 0)
    if isinstance(weights, list) and len(weights) != n:
        problems.append(f"{where}.reward_weights: {len(weights)} weights for {n} rewards "
                        "(the reward model first, then reward_funcs in order)")
    return problems


def builtin_rewards(entries) -> list:
    """TRL's built-in reward functions (trl.rewards) of a ``reward_funcs`` option, the factories called with their
    arguments."""
    import trl.rewards

    funcs = []
    for name, kwargs in _entries(entries):
        fn = getattr(trl.rewards, name)
        funcs.append(fn(**kwargs) if BUILTIN_REWARDS[name] else fn)
    return funcs


def reward_functions(ctx) -> tuple[list, list]:
    """(reward_funcs, reward_processing_classes) for TRL: the linked reward model first, then built-in functions,
    then the ``audit`` model (weight 0: :func:`with_audit_weight`), whose scores TRL logs as ``rewards/audit/mean``
    and never adds to the reward the policy is trained on."""
    funcs, classes = [], []
    link = ctx.spec.link("reward")
    if link is not None and link.path:
        rm = ctx.load_reward_model()
        rm.config._name_or_path = link.stage or link.path  # TRL names its metrics by it
        funcs.append(rm)
        classes.append(ctx.link_tokenizer("reward"))  # an outside reward model formats with its own chat template
    builtin = builtin_rewards(ctx.spec.options.get("reward_funcs"))
    funcs, classes = funcs + builtin, classes + [None] * len(builtin)
    if _has_audit(ctx.spec):
        audit = ctx.load_classifier(*ctx.link_model("audit"))
        audit.config._name_or_path = AUDIT_NAME
        funcs.append(audit)
        classes.append(ctx.link_tokenizer("audit"))
    return funcs, classes


AUDIT_NAME = "audit"  # TRL's metric names for the audit model: rewards/audit/mean (monitors.SOURCES reads it)


def _has_audit(stage) -> bool:
    link = stage.link("audit")
    return link is not None and bool(link.path)


def with_audit_weight(ctx, config_class):
    """The stage's TRL config; with an audit, ``reward_weights`` gets a last weight 0 for it (the others as set, by
    default 1 each), so the audit is scored and logged but trains nothing."""
    config = ctx.trl_config(config_class)
    if _has_audit(ctx.spec):
        reward = ctx.spec.link("reward")
        n = len(_entries(ctx.spec.options.get("reward_funcs"))) + (1 if reward is not None and reward.path else 0)
        config.reward_weights = [*(config.reward_weights or [1.0] * n), 0.0]
    return config


KIND = StageKind(
    monitor_signals=monitors.TRL_SIGNALS,
    name="grpo", config_class="trl.GRPOConfig", data_kind="prompt",
    summary="group-relative policy optimisation scored by a reward model and/or TRL reward functions",
    links=("reward", "audit"), needs_reward=True, options=("reward_funcs", "kl_target", "kl_horizon"),
    headline="eval_reward",
    samples_during_eval=True,
    key_fields=("learning_rate", "num_train_epochs", "per_device_train_batch_size", "num_generations", "beta",
                "max_completion_length", "temperature"),
    # plan-time rules: beta is a KL coefficient where 0 means no reference model
    ranges={"beta": NONNEG}, check=check,
    build=build,  # run-time behaviour
)
