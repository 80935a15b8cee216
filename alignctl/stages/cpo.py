"""Contrastive preference optimisation (TRL's experimental CPOTrainer); ``loss_type: simpo`` gives SimPO.

No reference model. SimPO (length-normalised log-likelihood margin with a target margin
``simpo_gamma``) is ``loss_type: simpo`` with ``cpo_alpha: 0`` (no NLL term); with
``cpo_alpha > 0`` it is CPO-SimPO. Every TRL ``loss_type`` passes through (sigmoid, hinge,
ipo, simpo, alphapo). Held-out metric: alignctl's ``eval_pref_accuracy``.
"""

from alignctl.stages import StageKind


def build(ctx):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return CPOTrainer(model=ctx.load_policy(), args=ctx.trl_config(CPOConfig), processing_class=ctx.tokenizer,
                      train_dataset=ctx.train, eval_dataset=ctx.eval, peft_config=ctx.peft_config())


KIND = StageKind(
    name="cpo", config_class="trl.experimental.cpo.CPOConfig", data_kind="preference",
    summary="contrastive preference optimisation, no reference (loss_type: simpo gives SimPO)",
    headline="eval_pref_accuracy",
    key_fields=("loss_type", "beta", "simpo_gamma", "cpo_alpha", "learning_rate", "num_train_epochs",
                "per_device_train_batch_size", "max_length"),
    build=build, preference_eval=True,
)
