"""Reward model (TRL RewardTrainer): a one-output sequence classifier trained on preference pairs (Bradley-Terry).

The model starts from the ``from`` stage's final weights (or the base model) with a
fresh one-output score head; ``final/`` loads with plain
``AutoModelForSequenceClassification.from_pretrained`` and its tokenizer has a pad
token (the classifier scores the last non-pad token). Held-out metrics are TRL's:
``eval_accuracy`` (share of pairs whose chosen answer scores higher) and
``eval_margin`` (mean chosen - rejected score), before and after training.
"""

from __future__ import annotations

from alignctl.stages import StageKind


def build(ctx):
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    set_seed(ctx.spec.args["seed"])  # the score head is freshly initialised: make it reproducible
    return RewardTrainer(model=ctx.load_classifier(), args=ctx.trl_config(RewardConfig),
                         processing_class=ctx.tokenizer, train_dataset=ctx.train, eval_dataset=ctx.eval,
                         peft_config=ctx.peft_config())


KIND = StageKind(
    name="reward", config_class="trl.RewardConfig", data_kind="preference",
    summary="reward model (Bradley-Terry) on preference pairs", output="classifier",
    headline="eval_accuracy",
    key_fields=("learning_rate", "num_train_epochs", "per_device_train_batch_size", "max_length",
                "center_rewards_coefficient"),
    build=build,
)
