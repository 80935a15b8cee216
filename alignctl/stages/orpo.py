"""Odds-ratio preference optimisation (TRL's experimental ORPOTrainer): SFT and preference in one stage, no
reference."""

from alignctl.stages import StageKind


def build(ctx):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOTrainer(model=ctx.load_policy(), args=ctx.trl_config(ORPOConfig), processing_class=ctx.tokenizer,
                       train_dataset=ctx.train, eval_dataset=ctx.eval, peft_config=ctx.peft_config())


KIND = StageKind(
    name="orpo", config_class="trl.experimental.orpo.ORPOConfig", data_kind="preference",
    summary="odds-ratio preference optimisation, one stage, no reference model",
    headline="eval_pref_accuracy",
    key_fields=("beta", "learning_rate", "num_train_epochs", "lr_scheduler_type", "max_length"),
    build=build, preference_eval=True,
)
