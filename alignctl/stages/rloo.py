"""REINFORCE leave-one-out (TRL RLOOTrainer), rewarded like the grpo stage: a reward model and/or TRL reward functions.

Each prompt gets ``num_generations`` completions; each completion's baseline is the mean
reward of the others. Rewards, data, reference and held-out metric (TRL's ``eval_reward``)
are as for the ``grpo`` stage (see alignctl/stages/grpo.py).
"""

from alignctl.config.checks import NONNEG
from alignctl.stages import StageKind
from alignctl.stages.grpo import check, reward_functions, with_audit_weight
from alignctl.train import monitors


def build(ctx):
    from trl import RLOOConfig, RLOOTrainer

    from alignctl.rl.beta import adaptive

    funcs, classes = reward_functions(ctx)
    trainer = adaptive(RLOOTrainer, ctx.spec.options)  # kl_target: beta adapts (alignctl.rl.beta)
    return trainer(model=ctx.load_policy(), reward_funcs=funcs, args=with_audit_weight(ctx, RLOOConfig),
                       train_dataset=ctx.train, eval_dataset=ctx.eval, processing_class=ctx.tokenizer,
                       reward_processing_classes=classes, peft_config=ctx.peft_config())


KIND = StageKind(
    monitor_signals=monitors.TRL_SIGNALS,
    name="rloo", config_class="trl.RLOOConfig", data_kind="prompt",
    summary="REINFORCE leave-one-out scored by a reward model and/or TRL reward functions",
    links=("reward", "audit"), needs_reward=True, options=("reward_funcs", "kl_target", "kl_horizon"),
    headline="eval_reward",
    samples_during_eval=True,
    key_fields=("learning_rate", "num_train_epochs", "per_device_train_batch_size", "num_generations", "beta",
                "max_completion_length", "temperature"),
    # plan-time rules (as grpo's): beta is a KL coefficient where 0 means no reference model
    ranges={"beta": NONNEG}, check=check,
    build=build,
)
