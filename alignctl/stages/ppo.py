"""Proximal policy optimisation against a reward model (TRL's ``trl.experimental.ppo``), InstructGPT-style.

* policy and reference: the ``from`` stage's final weights (``ref`` may name another stage);
* reward model: ``reward:`` a reward stage of the recipe or a model path (required);
* value model: initialised from the reward model unless ``value:`` names another stage or path;
* data: prompts only, conversational (chat template applied with the generation prompt) or plain
  strings; the stage tokenises them into the ``input_ids`` PPOTrainer expects (left-padded);
* every PPO knob passes through under its TRL name (kl_coef, kl_estimator, cliprange, vf_coef,
  gamma, lam, num_ppo_epochs, num_mini_batches, response_length, temperature, stop_token, ...).

Per-step metrics (objective/scores, objective/kl, objective/entropy, loss/policy_avg,
loss/value_avg, ...) go to the run log, the last ones to the manifest, together with the mean
score of the first and last quarter of the rollouts. The held-out metric ``eval_rm_score`` is
the reward model's mean score of completions sampled for the held-out prompts, before and after
(the shared evaluation of every policy stage, alignctl.evaluate: also KL and win rate; samples and
scores in ``<stage dir>/samples.jsonl``). ``final/`` is the policy alone, a plain causal LM.
"""

from __future__ import annotations

import logging

from alignctl.evaluate import encode_prompt
from alignctl.stages import StageKind

log = logging.getLogger("alignctl")

KIND = StageKind(
    name="ppo", config_class="trl.experimental.ppo.PPOConfig", data_kind="prompt",
    summary="PPO against a reward model, KL-penalised towards the reference (InstructGPT)",
    links=("ref", "reward", "value"), needs_reward=True, headline="eval_rm_score",
    key_fields=("learning_rate", "total_episodes", "per_device_train_batch_size", "num_ppo_epochs",
                "num_mini_batches", "kl_coef", "response_length", "temperature"),
)


# TRL 1.12's experimental PPOTrainer.train() takes no resume_from_checkpoint: it restarts step, optimizer, scheduler
# and data at zero. The pipeline reads this, says so in the log and starts an interrupted PPO stage again.
NO_RESUME = "TRL 1.12's trl.experimental.ppo PPOTrainer cannot resume from a checkpoint (train() takes no resume " \
            "argument)"


def _tokenized(ds, tokenizer):
    return ds.map(lambda ex: {"input_ids": encode_prompt(tokenizer, ex["prompt"])}, remove_columns=ds.column_names)


def _warn_if_template_trails_eos(tokenizer) -> None:
    """TRL's PPO scores prompt + answer cut at the EOS; a chat template that writes text after a turn's EOS (a
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


def _quarters(history: list[dict]) -> dict[str, float]:
    """Mean of ``objective/scores`` over the first and the last quarter of the PPO updates."""
    scores = [h["objective/scores"] for h in history if "objective/scores" in h]
    if not scores:
        return {}
    q = max(1, len(scores) // 4)
    return {"updates": len(scores), "score_first_quarter": sum(scores[:q]) / q,
            "score_last_quarter": sum(scores[-q:]) / q}


def run(ctx):
    import copy
    from types import SimpleNamespace

    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from alignctl import models
    from alignctl.runner import _final_train_metrics, log_to_run_log, merge_eval

    args = ctx.args_for(ctx.spec)
    args.setdefault("num_sample_generations", 0)  # TRL would print tables to stdout; samples.jsonl has them
    tokenizer = copy.deepcopy(ctx.tokenizer)
    tokenizer.padding_side = "left"  # queries are generated from: pad on the left
    _warn_if_template_trails_eos(tokenizer)
    policy = ctx.load_policy()
    reward_model = ctx.load_reward_model()
    if reward_model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        raise ValueError(f"stages.{ctx.spec['name']}.reward: the reward model's vocabulary is smaller than the "
                         "policy's tokenizer; PPO scores the policy's token ids, so both must share one tokenizer")
    config = PPOConfig(**args)
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy,
                         ref_model=ctx.load_reference(), reward_model=reward_model, value_model=ctx.load_value_model(),
                         train_dataset=_tokenized(ctx.train, tokenizer),
                         # TRL samples from it only for num_sample_generations (off); it needs a data set all the same
                         eval_dataset=_tokenized(ctx.eval if ctx.eval is not None else ctx.train, tokenizer),
                         peft_config=ctx.peft_config())
    log_to_run_log(trainer, ctx.spec["name"])
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    main = trainer.is_world_process_zero()  # with several processes, one evaluates and writes

    pe = ctx.policy_eval() if main else None  # the shared held-out evaluation (alignctl.evaluate), scored by the RM
    if pe is not None:
        pe.before(policy)
    trainer.train()
    generated = ctx.finish_policy_eval(pe, policy, trainer.ref_model, reward_model) if main else {}
    for phase in ("before", "after"):  # PPO's headline: the reward model's mean score of held-out answers
        if "eval_reward_mean" in generated.get(phase, {}):
            generated[phase]["eval_rm_score"] = generated[phase]["eval_reward_mean"]

    models.align_special_tokens(policy, ctx.tokenizer)  # PPO set generation_config.eos_token_id to its stop token
    if main:
        ctx.write_history(trainer.state.log_history)
        ctx.save(SimpleNamespace(model=policy))  # the policy alone, without the value model
    metrics = {"train": _final_train_metrics(trainer.state.log_history),
               "rollouts": _quarters(trainer.state.log_history)}
    return merge_eval(metrics, generated)
