"""Direct preference optimisation (TRL DPOTrainer); every TRL ``loss_type`` passes through (sigmoid, ipo, hinge,
robust, ...).

The reference model is the ``ref`` stage's final weights, by default the ``from``
stage's, i.e. the weights this stage starts from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alignctl.config.checks import is_num
from alignctl.stages import StageKind

if TYPE_CHECKING:
    from alignctl.config.types import StageSpec


def check(stage: StageSpec, where: str) -> list[str]:
    """Plan-time: robust DPO's ``label_smoothing`` is the probability that a label is flipped, below 0.5."""
    loss, smoothing = stage.args.get("loss_type"), stage.args.get("label_smoothing")
    if is_num(smoothing) and smoothing >= 0.5 and "robust" in (loss if isinstance(loss, list) else [loss]):
        return [f"{where}.label_smoothing: robust DPO needs a flip probability in [0, 0.5), got {smoothing}"]
    return []

def before_ignores(stage: StageSpec) -> frozenset[str]:
    """Before training, a policy that is its own reference gives log-ratios of exactly 0, so sigmoid DPO's loss
    (log 2, label smoothing or not) and rewards (beta x 0) do not depend on ``beta``: a beta sweep from one SFT model
    shares its trainer's "before" evaluation. Any other loss, reference or divergence: beta counts."""
    args, ref = stage.args, stage.link("ref")
    losses = args.get("loss_type", ["sigmoid"])
    own_reference = ref is None or not ref.path or ref.path == stage.source.path
    if own_reference and (losses if isinstance(losses, list) else [losses]) == ["sigmoid"] and \
            args.get("f_divergence_type", "reverse_kl") == "reverse_kl":
        return frozenset({"beta"})
    return frozenset()


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
    check=check,  # plan-time rules
    build=build, preference_eval=True, before_ignores=before_ignores,
)
