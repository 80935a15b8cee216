"""PPO's configuration: transformers' TrainingArguments (optimiser, schedule, precision, logging, saving, seed) plus
the PPO fields, under the names TRL 1.12's ``trl.experimental.ppo.PPOConfig`` used, so recipes written for it run
unchanged; plus ``kl_target`` / ``kl_horizon`` for the adaptive KL controller (Ziegler et al. 2019), ``target_kl``
(early stop of an update's epochs) and ``kl_stop`` (early stop of the stage): a KL that is held, not only penalised;
``reward_aggregate`` / ``reward_std_coef``: how a reward ensemble's scores combine."""

from dataclasses import dataclass, field
from typing import Literal, Optional

from transformers import TrainingArguments


@dataclass
class PPOConfig(TrainingArguments):
    # -- TrainingArguments defaults PPO changes
    learning_rate: float = field(default=3e-6, metadata={"help": "Initial learning rate (AdamW) of policy and value."})
    logging_steps: float = field(default=10, metadata={"help": "Log every this many PPO updates (a float < 1: a "
                                                                "ratio of all updates)."})
    max_grad_norm: float = field(default=0.0, metadata={
        "help": "Clip the gradient norm of policy and value to this (0: no clipping, as in OpenAI's "
                "lm-human-preferences and TRL 1.12's PPO, which ignored this field)."})
    # -- rollouts
    total_episodes: int | None = field(default=None, metadata={
        "help": "Prompts answered in all (episodes); default num_train_epochs passes over the prompts."})
    num_mini_batches: int = field(default=1, metadata={
        "help": "Minibatches per rollout batch. A rollout batch holds per_device_train_batch_size x "
                "gradient_accumulation_steps x num_mini_batches prompts per process."})
    local_rollout_forward_batch_size: int = field(default=64, metadata={
        "help": "Sequences per forward pass while generating and scoring rollouts."})
    response_length: int = field(default=53, metadata={"help": "Most new tokens per answer."})
    stop_token: Optional[Literal["eos"]] = field(default=None, metadata={  # noqa: UP045  (the snapshot records this type)
        "help": "'eos': answers end at the tokenizer's EOS token (else at stop_token_id, else at response_length)."})
    stop_token_id: int | None = field(default=None, metadata={"help": "A token id that ends answers."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the rollouts."})
    missing_eos_penalty: float | None = field(default=None, metadata={
        "help": "Subtracted from the reward-model score of an answer that never emits the stop token."})
    # -- PPO
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the per-token rewards before GAE."})
    kl_coef: float = field(default=0.05, metadata={
        "help": "KL penalty coefficient (InstructGPT's beta); the initial value when kl_target is set."})
    kl_estimator: Literal["k1", "k3"] = field(default="k1", metadata={
        "help": "Per-token KL estimator: k1 = log(pi/ref), k3 = (ref/pi - 1) - log(ref/pi)."})
    kl_target: float | None = field(default=None, metadata={
        "help": "Target KL to the reference (nats per answer): turns on the adaptive KL controller."})
    kl_horizon: float | None = field(default=None, metadata={
        "help": "Horizon of the adaptive KL controller (Ziegler et al. 2019): episodes when >= 1, a fraction of the "
                "run's episodes when < 1; default a twentieth of the run's episodes."})
    target_kl: float | None = field(default=None, metadata={
        "help": "Stop an update's PPO epochs early once a minibatch's approximate KL between the policy before and "
                "after the update exceeds 1.5 x this (Schulman et al. 2017; the old TRL PPOConfig's target_kl)."})
    kl_stop: float | None = field(default=None, metadata={
        "help": "Stop the stage when an update's rollouts show a KL to the reference above this (nats per answer); "
                "the stage's output is then the last policy whose rollouts stayed under it."})
    keep_best_audit: bool = field(default=False, metadata={
        "help": "The stage's output is the policy whose rollouts the audit reward model (`audit:`) scored highest, "
                "not the last one (a CPU copy of the trainable weights is kept for it)."})
    reward_aggregate: Literal["mean", "min", "mean_minus_std"] = field(default="mean", metadata={
        "help": "How the scores of a reward ensemble (`reward: [rm_a, rm_b, ...]`) combine into the training signal: "
                "their mean, their minimum (worst case), or their mean minus reward_std_coef x their standard "
                "deviation (uncertainty-weighted; Coste et al. 2023)."})
    reward_std_coef: float = field(default=1.0, metadata={
        "help": "The weight of the ensemble members' disagreement (std) under reward_aggregate=mean_minus_std."})
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the policy ratio."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value prediction."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
