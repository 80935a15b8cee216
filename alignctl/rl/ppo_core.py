"""The PPO algorithm on token sequences (InstructGPT; Ziegler et al. 2019; Huang et al. 2024, "The N+ implementation
details of RLHF with PPO"), as tensor functions the trainer composes:

* rollouts: sample an answer per prompt from the policy, cut after the first stop token;
* scores: a sequence classifier's output at every position (:func:`token_scores`): the reward model's at the last
  answer token is the score, the value model's at the positions before each answer token are the values;
* rewards: per token ``-kl_coef * KL_t`` to the reference, plus the score at the answer's last token, minus
  ``missing_eos_penalty`` when the answer never stopped;
* advantages: GAE(gamma, lambda), whitened; returns = advantages + values;
* losses: clipped policy surrogate and clipped value loss, averaged over answer tokens.

Queries are left-padded and answers right-padded in one tensor; position ids count real tokens only.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask of token-id lists."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


@torch.no_grad()
def generate(policy, queries: torch.Tensor, query_mask: torch.Tensor, *, max_new_tokens: int, temperature: float,
             stop_ids: list[int], pad: int) -> torch.Tensor:
    """Sampled answers (batch, <= max_new_tokens): pure sampling at ``temperature`` (no top-k/top-p), stopping at
    any of ``stop_ids``; tokens after an answer's first stop token are ``pad``."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=max(temperature, 1e-7),
                              top_k=0, top_p=1.0, eos_token_id=stop_ids or None, pad_token_id=pad)
    out = policy.generate(input_ids=queries, attention_mask=query_mask, generation_config=config)
    return cut_after_stop(out[:, queries.shape[1]:], stop_ids, pad)


def cut_after_stop(responses: torch.Tensor, stop_ids: list[int], pad: int) -> torch.Tensor:
    if not stop_ids or responses.shape[1] == 0:
        return responses
    is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))
    after = (is_stop.cumsum(1) - is_stop.long()) > 0  # strictly after the first stop token
    return responses.masked_fill(after, pad)


def answer_lengths(responses: torch.Tensor, stop_ids: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of each answer (up to and including its stop token) and whether it stopped."""
    width = responses.shape[1]
    idx = torch.arange(width, device=responses.device).expand_as(responses)
    if stop_ids:
        is_stop = torch.isin(responses, torch.tensor(stop_ids, device=responses.device))
        stopped = is_stop.any(1)
        first = torch.where(is_stop, idx, width).min(1).values
        return torch.where(stopped, first + 1, width), stopped
    return torch.full((responses.shape[0],), width, device=responses.device), \
        torch.zeros(responses.shape[0], dtype=torch.bool, device=responses.device)


def sequence_inputs(queries, query_mask, responses, lengths):
    """Ids, attention mask and position ids of query + answer (answer positions beyond its length masked out)."""
    answer_mask = torch.arange(responses.shape[1], device=responses.device)[None] < lengths[:, None]
    mask = torch.cat((query_mask, answer_mask.long()), 1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return torch.cat((queries, responses), 1), mask, positions


def answer_logprobs(logits: torch.Tensor, responses: torch.Tensor, width: int, temperature: float):
    """Log-probabilities of the answer tokens (at the sampling temperature) and the per-token entropy, from the
    logits of query + answer."""
    logits = logits[:, width - 1:-1].float() / max(temperature, 1e-7)
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def token_scores(classifier, ids, mask, positions) -> torch.Tensor:
    """A one-output sequence classifier's score at every position (its head applied to every hidden state)."""
    backbone = getattr(classifier, classifier.base_model_prefix)
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
    head = getattr(classifier, "score", None) or classifier.classifier
    return head(hidden).squeeze(-1)


def rewards_and_advantages(scores, kl, values, mask, lengths, *, kl_coef: float, gamma: float, lam: float,
                           whiten_rewards: bool):
    """Per-token rewards (KL penalty + score at the last answer token), GAE advantages (whitened) and returns."""
    non_score = -kl_coef * kl * mask
    rewards = non_score.clone()
    last = (lengths - 1).clamp(min=0)
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    if whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False) * mask
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(scores)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(scores)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    returns = advantages + values
    return rewards, non_score, whiten(advantages, mask) * mask, returns


def policy_loss(logp, old_logp, advantages, mask, cliprange: float):
    """Clipped surrogate loss, clip fraction and approximate KL (old || new)."""
    ratio = (logp - old_logp).exp()
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    clipfrac = masked_mean(((ratio - 1).abs() > cliprange).float(), mask)
    return masked_mean(losses, mask), clipfrac, 0.5 * masked_mean((logp - old_logp) ** 2, mask), \
        masked_mean(ratio, mask)


def value_loss(values, old_values, returns, mask, cliprange_value: float):
    """Clipped value loss (0.5 x the larger squared error) and the fraction clipped."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    losses = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(losses, mask), masked_mean(((clipped - returns) ** 2 > (values - returns) ** 2).float(),
                                                        mask)
