"""Held-out preference accuracy of a causal LM, the same measure for every preference method.

For each held-out pair, the model's own preference is whether it gives the chosen
completion a higher total log-probability than the rejected one (given the prompt);
ties count half. Unlike TRL's ``rewards/accuracies`` (implicit reward versus the
reference, which is 0 for every pair before training because policy and reference
coincide), it is meaningful before training too, and it compares DPO, IPO, ORPO,
SimPO and KTO on one scale.
"""

from __future__ import annotations

from typing import Any


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


def completion_logps(model, tokenizer, prompts: list, completions: list, batch_size: int = 32) -> list[float]:
    """Sum of log-probabilities of each completion's tokens given its prompt."""
    import torch

    device = next(model.parameters()).device
    out: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(prompts), batch_size):
            items = [_texts(tokenizer, p, c) for p, c in zip(prompts[i:i + batch_size], completions[i:i + batch_size])]
            ids, starts = [], []
            for p, full in items:
                p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
                f_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
                ids.append(f_ids)
                starts.append(len(p_ids))
            width = max(len(x) for x in ids)
            pad = tokenizer.pad_token_id or 0
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
            with torch.no_grad():
                logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            for row, (x, start) in enumerate(zip(ids, starts)):
                out.append(float(logp[row, start - 1:len(x) - 1].sum()))
    finally:
        model.train(was_training)
    return out


def preference_accuracy(model, tokenizer, dataset) -> dict[str, float]:
    """``eval_pref_accuracy`` and ``eval_pref_margin`` (mean log-prob margin) on a prompt/chosen/rejected dataset."""
    prompts = list(dataset["prompt"])
    chosen = completion_logps(model, tokenizer, prompts, list(dataset["chosen"]))
    rejected = completion_logps(model, tokenizer, prompts, list(dataset["rejected"]))
    wins = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)]
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"eval_pref_accuracy": sum(wins) / len(wins), "eval_pref_margin": sum(margins) / len(margins)}
