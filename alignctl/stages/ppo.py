"""Proximal policy optimisation against a reward model, InstructGPT-style: alignctl's own PPO (``alignctl.rl``).

* policy and reference: the ``from`` stage's final weights (``ref`` may name another stage); with an adapter
  (lora/qlora) the reference is the policy with its adapter disabled, without a second copy;
* reward model: ``reward:`` a reward stage of the recipe or a model path (required); or an ensemble, a list of
  them (``reward: [rm, rm_b]``), whose scores combine by ``reward_aggregate`` (mean, min, mean_minus_std with
  ``reward_std_coef``) into the training signal; each member is checked, fingerprinted and digested like a single
  reward link; the first member is the ensemble's face where one model is needed (the value model's default, the
  held-out evaluation's scorer without an audit);
* value model: initialised from the reward model unless ``value:`` names another stage or path;
* audit model (optional): ``audit:`` a reward stage or model that never trains the policy: it scores every update's
  answers (``audit/scores`` beside the proxy's ``objective/scores``, the ``audit_drop`` monitor) and judges the
  held-out answers (win rates) instead of the reward model being optimised; ``keep_best_audit`` makes the output the
  policy whose rollouts it scored highest;
* data: prompts only, conversational (chat template applied with the generation prompt) or plain strings;
* every PPO knob keeps the name TRL 1.12's PPOConfig gave it (kl_coef, kl_estimator, cliprange, vf_coef, gamma,
  lam, num_ppo_epochs, num_mini_batches, response_length, temperature, stop_token, ...); ``kl_target`` (with
  ``kl_horizon``, relative to the run's length) turns on the adaptive KL controller (alignctl.rl.kl); ``target_kl``
  stops an update's epochs early, ``kl_stop`` the stage.

Per-step metrics (objective/scores, objective/kl, objective/kl_coef, objective/entropy, loss/policy_avg,
loss/value_avg, ...) go to the run log and log_history.json, the last ones to the manifest, together with the
first/last-quarter mean scores and the KL and kl_coef of every step (``metrics.rollouts``). The held-out metric
``eval_rm_score`` is the reward model's mean score of completions sampled for the held-out prompts, before and after
(the shared evaluation of every policy stage, alignctl.evaluate: also KL and win rate; samples and scores in
``<stage dir>/samples.jsonl``). ``final/`` is the policy alone, a plain causal LM. Checkpoints follow
``save_strategy``/``save_steps``; an interrupted stage resumes from its newest valid one.
"""

from __future__ import annotations

import logging

from alignctl.config import links
from alignctl.evaluate import encode_prompt
from alignctl.stages import StageKind
from alignctl.train import monitors

log = logging.getLogger("alignctl")


def build(ctx):
    """alignctl's PPO (alignctl.rl) on the stage's prompts: the policy, its reference (the policy with its adapter
    disabled under lora/qlora), the reward model and the value model."""
    import copy

    from alignctl.rl.ppo_config import PPOConfig
    from alignctl.rl.ppo_trainer import PPOTrainer

    config = ctx.trl_config(PPOConfig)
    tokenizer = copy.deepcopy(ctx.tokenizer)
    tokenizer.padding_side = "left"  # queries are generated from: pad on the left
    _warn_if_template_trails_eos(tokenizer)
    policy = ctx.load_policy()
    reward_model = [ctx.load_classifier(*ctx.link_model(key)) for key in links.member_keys(ctx.spec.links, "reward")]
    ref, lora = ctx.load_reference(), ctx.peft_config()
    if lora is not None:
        from peft import get_peft_model

        policy = get_peft_model(policy, lora)  # the reference (unless `ref` names another model): adapter disabled
    elif ref is None:
        ref = copy.deepcopy(policy)
    if ref is not None:
        ref.requires_grad_(False)
    link = ctx.spec.link("audit")  # every link of the kind is in the spec; an unset one has no path
    audit = ctx.load_classifier(*ctx.link_model("audit")) if link is not None and link.path else None
    for name, model in [*zip(links.member_keys(ctx.spec.links, "reward"), reward_model), ("audit", audit)]:
        if model is not None and model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            raise ValueError(f"stages.{ctx.spec.name}.{name}: the model's vocabulary is smaller than the policy's "
                             "tokenizer; PPO scores the policy's token ids, so both must share one tokenizer")
    reward_model = reward_model[0] if len(reward_model) == 1 else reward_model
    return PPOTrainer(config, policy, ctx.load_value_model(), reward_model, tokenizer,
                      [encode_prompt(tokenizer, p) for p in ctx.train["prompt"]], ref_policy=ref, stage=ctx.spec.name,
                      audit_model=audit)


def extra_metrics(trainer, metrics: dict) -> dict:
    """PPO's headline ``eval_rm_score`` (the reward model's mean score of held-out answers, the policy evaluation's
    ``eval_reward_mean``), and the per-update summary under ``rollouts``."""
    for phase in ("before", "after"):
        if "eval_reward_mean" in metrics.get(phase, {}):
            metrics[phase]["eval_rm_score"] = metrics[phase]["eval_reward_mean"]
    rollouts = _quarters(trainer.state.log_history)
    if getattr(trainer.kl, "horizon", None) is not None:
        rollouts["kl_horizon_episodes"] = trainer.kl.horizon
    if trainer.stopped is not None:  # kl_stop or a stop_when monitor ended the stage early
        rollouts["stopped"] = trainer.stopped
    if trainer.best_audit is not None:  # keep_best_audit: which update's policy is the output
        rollouts["best_audit"] = trainer.best_audit
    return {**metrics, "rollouts": rollouts}


def check(stage, where: str) -> list[str]:
    """An ensemble's aggregation needs an ensemble (with one reward model reward_aggregate changes nothing);
    keep_best_audit needs an audit."""
    audit = stage.link("audit")
    if stage.args.get("keep_best_audit") and (audit is None or not audit.path):
        return [f"{where}.keep_best_audit: picks the policy the audit scored highest; set {where}.audit (a reward "
                "model trained apart from the reward) or drop keep_best_audit"]
    several = len(links.member_keys(stage.links, "reward")) > 1
    set_ = [k for k in ("reward_aggregate", "reward_std_coef") if k in stage.args]
    if set_ and not several:
        return [f"{where}.{set_[0]}: combines the scores of several reward models; this stage has one: list "
                f"several under {where}.reward (e.g. [rm, rm_b]) or drop {set_[0]}"]
    if "reward_std_coef" in stage.args and stage.args.get("reward_aggregate", "mean") != "mean_minus_std":
        return [f"{where}.reward_std_coef: is read by reward_aggregate=mean_minus_std only (here: "
                f"{stage.args.get('reward_aggregate', 'mean')})"]
    return []


KIND = StageKind(
    monitor_signals=monitors.ALL_SIGNALS, ensemble_links=("reward",), check=check,
    name="ppo", config_class="alignctl.rl.ppo_config.PPOConfig", data_kind="prompt",
    summary="PPO against a reward model, KL-penalised towards the reference (InstructGPT)",
    links=("ref", "reward", "value", "audit"), needs_reward=True, headline="eval_rm_score",
    key_fields=("learning_rate", "total_episodes", "per_device_train_batch_size", "num_ppo_epochs",
                "num_mini_batches", "kl_coef", "response_length", "temperature"),
    # plan-time rules
    sharded_unsupported="alignctl's PPO stage samples held-out completions from and saves the policy outside TRL's "
                        "parameter gathering, which sharded weights need; use zero2 or ddp",
    build=build, extra_metrics=extra_metrics,
)


def _warn_if_template_trails_eos(tokenizer) -> None:
    """PPO scores prompt + answer cut at the EOS; a chat template that writes text after a turn's EOS (a
    newline, ...) trained the reward model to score at that text instead, which weakens the reward signal."""
    if not tokenizer.chat_template or not tokenizer.eos_token:
        return
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                             tokenize=False)
    except Exception:  # a template that insists on other turns (a system prompt, ...): nothing to check here
        return
    tail = text.rsplit(tokenizer.eos_token, 1)[-1] if tokenizer.eos_token in text else ""
    if tail:
        log.warning("the chat template writes %r after the final EOS: a reward model trained on chat-formatted "
                    "pairs scores that text, while PPO scores answers cut at the EOS", tail)


def _quarters(history: list[dict]) -> dict:
    """Mean ``objective/scores`` of the first and the last quarter of the PPO updates; KL and kl_coef per step."""
    rows = [h for h in history if "objective/scores" in h]
    if not rows:
        return {}
    q = max(1, len(rows) // 4)
    scores, kl = [h["objective/scores"] for h in rows], [h["objective/kl"] for h in rows]
    return {"updates": len(rows), "score_first_quarter": sum(scores[:q]) / q,
            "score_last_quarter": sum(scores[-q:]) / q, "kl_last_quarter": sum(kl[-q:]) / q, "kl": kl,
            "kl_coef": [h["objective/kl_coef"] for h in rows],
            "early_stops": sum(h.get("policy/early_stop", 0) > 0 for h in rows)}
