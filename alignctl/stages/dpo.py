"""Direct preference optimisation (TRL DPOTrainer); every TRL ``loss_type`` passes through (sigmoid, ipo, hinge, robust, ...).

The reference model is the ``ref`` stage's final weights, by default the ``from``
stage's, i.e. the weights this stage starts from.
"""

from alignctl.stages import StageKind


def build(ctx):
    from trl import DPOConfig, DPOTrainer

    return DPOTrainer(model=ctx.load_policy(), ref_model=ctx.load_reference(), args=ctx.trl_config(DPOConfig),
                      processing_class=ctx.tokenizer, train_dataset=ctx.train, eval_dataset=ctx.eval,
                      peft_config=ctx.peft_config())


KIND = StageKind(
    name="dpo", config_class="trl.DPOConfig", data_kind="preference",
    summary="direct preference optimisation (any TRL loss_type)", links=("ref",),
    headline="eval_pref_accuracy",
    key_fields=("beta", "loss_type", "learning_rate", "num_train_epochs", "per_device_train_batch_size", "max_length"),
    build=build, preference_eval=True,
)
