"""Held-out evaluation of a policy: preference accuracy, samples, KL to the reference, reward and win rate.

Preference accuracy (every preference stage). For each held-out pair, the model's own preference:
does it give the chosen completion a higher log-probability than the rejected one (given the prompt)?
Ties count half. Two versions:

* ``eval_pref_accuracy``: summed log-probabilities. Meaningful before training (unlike TRL's
  ``rewards/accuracies``, 0 before training because policy and reference coincide) and comparable
  across DPO, IPO, ORPO, SimPO and KTO, but it favours the shorter answer: every token costs
  log-probability.
* ``eval_pref_accuracy_norm``: mean log-probability per completion token (length-normalised), which
  does not reward short answers for being short.

Both at the stage's eval batch size, with prompt + completion cut to its ``max_length`` as its TRL trainer cuts
them (:func:`truncate`) and never past the model's position embeddings; log-probabilities come from chunked
logsumexps, never a full-vocabulary fp32 log-softmax of a batch (:func:`token_logps`); under torch.distributed each
process scores its share of the pairs.

Generation-based evaluation of a policy stage (alignctl.policy_eval.PolicyEval), before and after training, on at
most ``eval.max_prompts`` held-out prompts: one completion per prompt sampled with a fixed seed (at most
``eval.max_new_tokens`` tokens, cut after the first EOS), then

* ``eval_kl`` / ``eval_kl_seq``: KL of the policy to its reference estimated on those completions,
  sum over completion tokens of log pi(y_t) - log ref(y_t), per token (total over total tokens) and per
  sequence (mean of the sums); an unbiased estimate of KL(pi || ref) at temperature 1. Before training
  the policy is its reference when the reference is the initial weights: exactly 0;
* with a reward model: ``eval_reward_mean`` / ``eval_reward_std`` before and after, and ``eval_win_rate``:
  the share of prompts whose after-training answer the reward model scores above the before-training
  answer (ties count half), with a 95% Wilson score interval (``eval_win_rate_low`` / ``_high``);
  ``eval_win_rate_ref`` the same against the reference's answers; ``eval_win_rate_lc`` (``_lc_low`` / ``_lc_high``)
  the length-controlled win rate, the win rate at equal answer length (alignctl.length_control), and
  ``eval_win_rate_length_coef`` how strongly the reward model's preference followed the length difference;
* ``<stage>/samples.jsonl``: one line per prompt, {prompt, before, after, scores, kl}.

Nothing at module level imports torch. The ``eval`` group's settings are alignctl.config.eval_settings.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any


# -- statistics -----------------------------------------------------------------------------------------------------
def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (ties counted half are half a success)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(a: list[float], b: list[float]) -> dict[str, float]:
    """Share of items where ``a`` beats ``b`` (ties half), with its 95% Wilson interval."""
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b))
    lo, hi = wilson(wins, len(a))
    return {"rate": wins / len(a) if a else float("nan"), "low": lo, "high": hi}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def std(xs: list[float]) -> float:
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs)) if xs else float("nan")


# -- prompts and token ids ------------------------------------------------------------------------------------------
def held_out_prompts(dataset, limit: int) -> list | None:
    """The first ``limit`` distinct prompts of a held-out split in any TRL format: a ``prompt`` column, or
    conversations (``messages``) without their final assistant turn. None when it holds no prompts (plain text)."""
    if dataset is None:
        return None
    cols = dataset.column_names
    if "prompt" in cols:
        raw = dataset["prompt"]
    elif "messages" in cols:
        raw = []
        for m in dataset["messages"]:
            turns = list(m)
            while turns and turns[-1].get("role") == "assistant":
                turns.pop()
            if turns:
                raw.append(turns)
    else:
        return None
    out, seen = [], set()
    for p in raw:
        key = json.dumps(p, sort_keys=True)
        if key not in seen and p:
            seen.add(key)
            out.append(p)
        if len(out) >= limit:
            break
    return out or None


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Token ids of one prompt: chat template with the generation prompt for messages, the plain string otherwise."""
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True,
                                                  add_generation_prompt=True)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (else 0)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def generate(model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float, seed: int,
             batch_size: int, top_p: float = 1.0, batches: list[int] | None = None) -> list[list[int]]:
    """One completion per prompt (token ids, cut after the first EOS), sampled in batches (greedy at temperature 0).
    Each batch is seeded with ``seed`` + its index, so the same model gives the same completions every time; the
    global random state is left as it was. ``batches``: only those batch indices (in that order; a process's share
    under torch.distributed), each seeded as in the full pass, so the shares together are the full pass's answers."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad, eos = pad_id(tokenizer), tokenizer.eos_token_id
    sample = temperature > 0
    sampling = {"temperature": float(temperature), "top_k": 0, "top_p": float(top_p)} if sample else {}
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, eos_token_id=eos, pad_token_id=pad,
                              use_cache=True, **sampling)
    out: list[list[int]] = []
    # the global random state is restored afterwards: evaluating must not change what training samples
    forked = [device.index or 0] if device.type == "cuda" else []
    with eval_mode(model), torch.random.fork_rng(devices=forked):
        for b in range(-(-len(prompt_ids) // batch_size)) if batches is None else batches:
            chunk = prompt_ids[b * batch_size:(b + 1) * batch_size]
            width = max(len(x) for x in chunk)
            ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk], device=device)  # left-padded
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=device)
            torch.manual_seed(seed + b)
            with torch.no_grad():
                seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for row in seqs[:, width:].tolist():  # the answer up to and including its first EOS
                out.append(row[:row.index(eos) + 1] if eos in row else [t for t in row if t != pad])
    return out


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode (dropout off) for the block, then back in the mode it was in."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def token_logps(model, tokenizer, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                batch_size: int) -> list[tuple[float, int]]:
    """(sum of log-probabilities of the completion's tokens given the prompt, number of completion tokens scored)
    for each prompt/completion pair of token ids; right-padded batches. A first token without any prompt before it
    has no prediction and is not scored.

    Memory: the logits of a batch are asked for only from the position predicting its first completion token on
    (transformers' ``logits_to_keep``), in the model's dtype; each row's log-probabilities are its target logits
    minus a logsumexp computed :data:`LSE_ELEMENTS` logits at a time, upcast to fp32 per chunk, so no
    full-vocabulary fp32 copy or log-softmax of the batch is ever made."""
    import torch

    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    out: list[tuple[float, int]] = []
    with eval_mode(model), torch.no_grad():
        for i in range(0, len(prompt_ids), batch_size):
            seqs = [p + c for p, c in zip(prompt_ids[i:i + batch_size], completion_ids[i:i + batch_size])]
            starts = [max(len(p), 1) for p in prompt_ids[i:i + batch_size]]  # the first scored position of each row
            width = max(len(x) for x in seqs)
            lo = min(starts) - 1  # logits before this position predict no completion token
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in seqs], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs], device=device)
            logits = _logits(model, input_ids, mask, width - lo)  # position lo + j at index j
            for row, (x, start) in enumerate(zip(seqs, starts)):
                n = max(0, len(x) - start)
                rows = logits[row, start - 1 - lo:start - 1 - lo + n]
                out.append((_sum_logps(rows, input_ids[row, start:start + n]), n))
            del logits
    return out


LSE_ELEMENTS = 1 << 22  # logits upcast to fp32 at a time for the log-softmax normaliser (16 MiB)


def _sum_logps(rows, targets) -> float:
    """Sum over positions of log softmax(rows)[target]: target logit minus logsumexp, a chunk of positions at a time."""
    import torch

    step = max(1, LSE_ELEMENTS // max(1, rows.shape[-1]))
    total = 0.0
    for k in range(0, rows.shape[0], step):
        part = rows[k:k + step].float()
        picked = part.gather(-1, targets[k:k + step, None]).squeeze(-1)
        total += float((picked - torch.logsumexp(part, dim=-1)).sum(dtype=torch.float64))
    return total


def _logits(model, input_ids, mask, keep: int):
    """The logits of the last ``keep`` positions; only those are computed where the model takes ``logits_to_keep``
    (transformers' causal LMs; a PEFT model passes it on to its base model)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" in inspect.signature(inner.forward).parameters:
        return model(input_ids=input_ids, attention_mask=mask, logits_to_keep=keep).logits
    return model(input_ids=input_ids, attention_mask=mask).logits[:, -keep:]


# -- preference accuracy --------------------------------------------------------------------------------------------
def _turns(value: Any, role: str) -> list[dict]:
    """A conversation as a list of messages; a string becomes one turn of ``role``."""
    if isinstance(value, list):
        return list(value)
    return [{"role": role, "content": "" if value is None else str(value)}]


def _texts(tokenizer, prompt: Any, completion: Any) -> tuple[str, str]:
    """(prompt text, prompt+completion text) for conversational or plain examples. When either side is a conversation,
    both are formatted with the chat template (a string prompt as a user turn, a string completion as an assistant
    turn), so a string prompt beside conversational completions cannot break the evaluation."""
    if isinstance(prompt, list) or isinstance(completion, list):
        turns = _turns(prompt, "user")
        p = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(turns + _turns(completion, "assistant"), tokenize=False)
        return p, full
    return prompt or "", (prompt or "") + (completion or "")


def max_positions(model) -> int | None:
    """The longest sequence the model's position embeddings cover (max_position_embeddings, GPT-2's n_positions)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def truncate(prompt: list[int], completion: list[int], limit: int | None, truncation_mode: str = "keep_start"
             ) -> tuple[list[int], list[int]] | None:
    """Prompt and completion ids cut to ``limit`` tokens together as TRL 1.16's preference trainers do: the
    completion's end goes (``keep_start``, every kind's default), or with DPO's ``truncation_mode: keep_end`` the
    sequence's start (the prompt first). None: nothing of the completion is left (``keep_start`` with a prompt that
    fills ``limit``; TRL drops such a pair)."""
    over = len(prompt) + len(completion) - (limit or 0)
    if limit is None or over <= 0:
        return prompt, completion
    if truncation_mode == "keep_end":
        from_prompt = min(over, len(prompt))
        kept = completion[over - from_prompt:]
        return (prompt[from_prompt:], kept) if kept else None
    if len(prompt) >= limit:
        return None
    return prompt, completion[:limit - len(prompt)]


def completion_stats(model, tokenizer, prompts: list, completions: list, batch_size: int = 8,
                     max_length: int | None = None, truncation_mode: str = "keep_start"
                     ) -> list[tuple[float, int] | None]:
    """(summed log-probability, token count) of each completion given its prompt (texts or conversations), prompt
    and completion cut to ``max_length`` and never beyond the model's position embeddings (:func:`truncate`); None
    for a pair that truncation leaves without completion tokens."""
    limits = [v for v in (max_length, max_positions(model)) if v]
    limit = min(limits) if limits else None
    p_ids, c_ids, kept = [], [], []
    for p, c in zip(prompts, completions):
        p_text, full = _texts(tokenizer, p, c)
        pi = tokenizer(p_text, add_special_tokens=False)["input_ids"]
        fi = tokenizer(full, add_special_tokens=False)["input_ids"]
        cut = truncate(fi[:len(pi)], fi[len(pi):], limit, truncation_mode)
        kept.append(cut is not None)
        # a pair without completion left is still run (cut to the limit), so that every rank runs as many forward
        # passes (sharded weights gather in them); its result is dropped
        p_ids.append(cut[0] if cut else fi[:limit])
        c_ids.append(cut[1] if cut else [])
    stats = token_logps(model, tokenizer, p_ids, c_ids, batch_size)
    return [s if k else None for s, k in zip(stats, kept)]


def completion_logps(model, tokenizer, prompts: list, completions: list, batch_size: int = 8) -> list[float]:
    """Sum of log-probabilities of each completion's tokens given its prompt (NaN for one cut away entirely)."""
    return [s[0] if s else float("nan") for s in completion_stats(model, tokenizer, prompts, completions, batch_size)]


def pref_settings(args: Any) -> dict[str, Any]:
    """preference_accuracy's batch size and truncation, from a stage's TRL config (an object, or a mapping of its
    fields): ``per_device_eval_batch_size``, ``max_length`` and ``truncation_mode`` (DPO's; the others keep the
    start)."""
    get = args.get if isinstance(args, dict) else (lambda key, default=None: getattr(args, key, default))
    batch = get("per_device_eval_batch_size", None)
    return {"batch_size": batch if isinstance(batch, int) and batch > 0 else 8, "max_length": get("max_length", None),
            "truncation_mode": get("truncation_mode", None) or "keep_start"}


def preference_accuracy(model, tokenizer, dataset, batch_size: int = 8, max_length: int | None = None,
                        truncation_mode: str = "keep_start") -> dict[str, float]:
    """``eval_pref_accuracy`` / ``eval_pref_margin`` (summed log-probabilities) and ``eval_pref_accuracy_norm`` /
    ``eval_pref_margin_norm`` (mean log-probability per token) on a prompt/chosen/rejected dataset, batched at the
    stage's eval batch size and cut to its ``max_length`` (:func:`pref_settings`). Pairs that truncation leaves
    without completion tokens are left out. Under torch.distributed each process scores its share of the pairs and
    all of them get every result (all_gather_object)."""
    prompts, chosen, rejected = list(dataset["prompt"]), list(dataset["chosen"]), list(dataset["rejected"])
    mine = _my_share(len(prompts))
    pick = lambda xs: [xs[max(i, 0)] for i in mine]  # noqa: E731  (-1: a filler, see _my_share)
    kw = dict(batch_size=max(1, int(batch_size)), max_length=max_length, truncation_mode=truncation_mode)
    c = completion_stats(model, tokenizer, pick(prompts), pick(chosen), **kw)
    r = completion_stats(model, tokenizer, pick(prompts), pick(rejected), **kw)
    rows = sorted(gather([(i, a, b) for i, a, b in zip(mine, c, r) if i >= 0]))
    pairs = [(a, b) for _, a, b in rows if a is not None and b is not None]
    if len(pairs) < len(prompts):
        import logging

        logging.getLogger("alignctl").info("preference accuracy: %d of %d held-out pairs left out (the prompt alone "
                                           "fills max_length=%s)", len(prompts) - len(pairs), len(prompts),
                                           max_length)
    if not pairs:
        return {}
    out = {}
    for suffix, f in (("", lambda s, n: s), ("_norm", lambda s, n: s / max(n, 1))):
        cs, rs = [f(*a) for a, _ in pairs], [f(*b) for _, b in pairs]
        out[f"eval_pref_accuracy{suffix}"] = win_rate(cs, rs)["rate"]
        out[f"eval_pref_margin{suffix}"] = mean([a - b for a, b in zip(cs, rs)])
    return out


def distributed():
    """torch.distributed when a process group with several processes is initialised, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _my_share(n: int) -> list[int]:
    """The indices of ``n`` items this process scores: every item on one process; under several processes every
    world-th one, padded with -1 (a filler that runs item 0 and is dropped) so that every rank runs as many forward
    passes (under ZeRO-3 / FSDP every rank must take part in each)."""
    dist = distributed()
    if dist is None:
        return list(range(n))
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, n, world))
    return mine + [-1] * (-(-n // world) - len(mine))


def my_batches(n: int, batch_size: int) -> list[int]:
    """The batches of ``n`` items (``batch_size`` each) this process takes: all of them on one process, every
    world-th one under torch.distributed (DDP: no rank waits for another, unlike :func:`_my_share`)."""
    dist = distributed()
    count = -(-n // max(1, batch_size))
    return list(range(count)) if dist is None else list(range(dist.get_rank(), count, dist.get_world_size()))


def gather(rows: list) -> list:
    """Every process's ``rows``, concatenated (just ``rows`` on one process)."""
    dist = distributed()
    if dist is None:
        return rows
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


# -- reward-model scores --------------------------------------------------------------------------------------------
def reward_scores(reward_model, reward_tokenizer, tokenizer, prompt_ids: list[list[int]],
                  completion_ids: list[list[int]], batch_size: int) -> list[float]:
    """The reward model's score of each prompt + completion: the sequence classifier's output at the last non-pad
    token (where TRL's RewardTrainer trained it and TRL's PPO reads it). A reward model with another vocabulary gets
    the text re-tokenised with its own tokenizer."""
    import torch

    rtok = reward_tokenizer or tokenizer
    if rtok.get_vocab() == tokenizer.get_vocab():
        seqs = [p + c for p, c in zip(prompt_ids, completion_ids)]
    else:
        seqs = [rtok(tokenizer.decode(p + c), add_special_tokens=False)["input_ids"]
                for p, c in zip(prompt_ids, completion_ids)]
    pad = pad_id(rtok)
    reward_model.config.pad_token_id = pad  # the classifier finds each row's last token by its padding
    device = next(reward_model.parameters()).device
    out: list[float] = []
    with eval_mode(reward_model):
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i:i + batch_size]
            width = max(len(x) for x in chunk)
            ids = torch.tensor([x + [pad] * (width - len(x)) for x in chunk], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk], device=device)
            with torch.no_grad():
                out += reward_model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
    return out
