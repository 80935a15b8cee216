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
the reward model's mean score of sampled completions to the held-out prompts, before and after;
those completions and their scores are written to ``<stage dir>/samples.jsonl``. ``final/`` is
the policy alone, a plain causal LM.
"""

from __future__ import annotations

import json
import logging

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
    from alignctl.runner import _final_train_metrics, log_to_run_log

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

    before = held_out_rm_score(ctx, policy, reward_model, config, "before") if main else {}
    trainer.train()
    after = held_out_rm_score(ctx, policy, reward_model, config, "after") if main else {}

    models.align_special_tokens(policy, ctx.tokenizer)  # PPO set generation_config.eos_token_id to its stop token
    if main:
        ctx.write_history(trainer.state.log_history)
        ctx.save(SimpleNamespace(model=policy))  # the policy alone, without the value model
    metrics = {"train": _final_train_metrics(trainer.state.log_history),
               "rollouts": _quarters(trainer.state.log_history)}
    if ctx.eval is not None:
        metrics.update(before=before, after=after)
    return metrics


# -- the held-out metric: the reward model's score of sampled answers ---------------------------------------------
def encode_prompt(tokenizer, prompt) -> list[int]:
    """Token ids of one prompt: chat template with the generation prompt for messages, the plain string otherwise."""
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True,
                                                  add_generation_prompt=True)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def rm_score(policy, reward_model, tokenizer, prompts: list, *, max_new_tokens: int, temperature: float,
             samples: int = 4, seed: int = 0, batch_size: int = 64) -> tuple[float, list[dict]]:
    """Mean reward-model score of completions sampled for ``prompts`` (``samples`` each), and the scored samples.

    Generation, truncation at EOS and scoring are TRL's PPO functions, so the score is the
    one PPO optimises: the reward model's output at the last token of prompt + answer.
    """
    import torch
    from transformers import GenerationConfig
    from trl.experimental.ppo.ppo_trainer import batch_generation, truncate_response
    from trl.experimental.utils import get_reward

    device = next(policy.parameters()).device
    pad = tokenizer.pad_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature + 1e-7, top_k=0, top_p=1.0,
                              do_sample=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    encoded = [encode_prompt(tokenizer, p) for p in prompts for _ in range(samples)]
    was_training = policy.training
    policy.eval()
    torch.manual_seed(seed)
    rows: list[dict] = []
    try:
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i:i + batch_size]
            width = max(len(x) for x in chunk)
            queries = torch.tensor([[pad] * (width - len(x)) + x for x in chunk], device=device)  # left-padded
            query_responses, _ = batch_generation(policy, queries, len(chunk), pad, config)
            responses = truncate_response(tokenizer.eos_token_id, pad, query_responses[:, width:])
            with torch.no_grad():
                _, scores, _ = get_reward(reward_model, torch.cat((queries, responses), 1), pad, width)
            for x, r, s in zip(chunk, responses, scores.float().tolist()):
                rows.append({"prompt": tokenizer.decode(x, skip_special_tokens=True),
                             "completion": tokenizer.decode(r[r != pad], skip_special_tokens=True), "score": s})
    finally:
        policy.train(was_training)
    return sum(r["score"] for r in rows) / len(rows), rows


def held_out_rm_score(ctx, policy, reward_model, config, phase: str) -> dict[str, float]:
    """``eval_rm_score`` of ``policy`` on the held-out prompts (sampled at the stage's temperature and response
    length); the scored samples go to <stage dir>/samples.jsonl."""
    if ctx.eval is None:
        return {}
    mean, rows = rm_score(policy, reward_model, ctx.tokenizer, list(ctx.eval["prompt"]),
                          max_new_tokens=config.response_length, temperature=config.temperature, seed=config.seed)
    ctx.dir.mkdir(parents=True, exist_ok=True)
    with open(ctx.dir / "samples.jsonl", "w" if phase == "before" else "a") as f:
        for row in rows:
            f.write(json.dumps({"phase": phase, **row}) + "\n")
    return {"eval_rm_score": mean}
