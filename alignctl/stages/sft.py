"""Supervised fine-tuning (TRL SFTTrainer) on messages, text or prompt/completion data."""

from alignctl.stages import StageKind


def build(ctx):
    from trl import SFTConfig, SFTTrainer

    return SFTTrainer(model=ctx.load_policy(), args=ctx.trl_config(SFTConfig), processing_class=ctx.tokenizer,
                      train_dataset=ctx.train, eval_dataset=ctx.eval, peft_config=ctx.peft_config())


KIND = StageKind(
    name="sft", config_class="trl.SFTConfig", data_kind="sft",
    summary="supervised fine-tuning",
    key_fields=("learning_rate", "num_train_epochs", "per_device_train_batch_size", "max_length", "lr_scheduler_type"),
    build=build,
    # its evaluation of the initial weights (held-out loss, token accuracy) reads no training-only field
    before_ignores=lambda stage: frozenset(),
)
