"""Kahneman-Tversky optimisation (TRL KTOTrainer) on unpaired desirable/undesirable answers.

Data: ``prompt``/``completion``/``label`` rows (``label`` boolean, true = desirable), or
preference pairs, which TRL's KTOTrainer unpairs itself (each pair gives one desirable and
one undesirable row). The reference model is the ``ref`` stage's final weights, by default
the ``from`` stage's.

Held-out metric: when the held-out split holds pairs (paired data, unpaired for training
only), alignctl's ``eval_pref_accuracy`` on those pairs, the same measure as DPO, ORPO and
SimPO report; the ``kto`` recipe trains on the paired ``prefs`` set for this reason. With
natively unpaired held-out data there are no pairs to compare, so only TRL's KTO metrics
(eval_loss, eval_rewards/chosen, eval_rewards/rejected, eval_kl, ...) are reported.
"""

from alignctl.stages import StageKind


def build(ctx):
    from trl import KTOConfig, KTOTrainer

    return KTOTrainer(model=ctx.load_policy(), ref_model=ctx.load_reference(), args=ctx.trl_config(KTOConfig),
                      processing_class=ctx.tokenizer, train_dataset=ctx.train, eval_dataset=ctx.eval,
                      peft_config=ctx.peft_config())


KIND = StageKind(
    name="kto", config_class="trl.KTOConfig", data_kind="unpaired",
    summary="Kahneman-Tversky optimisation on unpaired good/bad answers (or pairs it unpairs)", links=("ref",),
    headline="eval_pref_accuracy",
    key_fields=("beta", "desirable_weight", "undesirable_weight", "learning_rate", "num_train_epochs",
                "per_device_train_batch_size", "max_length"),
    build=build, preference_eval="if_paired",  # pairs in the held-out split (see above)
)
