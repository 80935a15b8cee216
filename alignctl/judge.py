"""An AI judge for preference data (RLAIF, Constitutional-AI style): a causal LM picks the better of two answers.

The judge reads a comparison prompt (the recipe's ``constitution`` principles, the question, answer A, answer B)
and its verdict is which of the next tokens " A" / " B" it finds more likely. Every pair is asked in both orders
(A/B and B/A) to cancel position bias: a verdict that follows the position rather than the answer is a tie, which
counts for neither answer (and so yields no pair). :func:`round_robin` turns the verdicts into per-answer scores
(decisive wins) and reports how often the two orders disagreed.
"""

from __future__ import annotations

from collections.abc import Callable

DEFAULT_PRINCIPLES = ("Prefer the answer that is kind, warm and helpful.",
                      "Prefer the answer that is honest and not hurtful.")
DEFAULT_TEMPLATE = "{principles}\nQuestion: {prompt}\nA: {a}\nB: {b}\nThe better answer is"


def prompt_text(prompt) -> str:
    """The question a judge reads: the last user turn of a conversation, or the plain prompt."""
    if isinstance(prompt, list):
        users = [t.get("content", "") for t in prompt if isinstance(t, dict) and t.get("role") == "user"]
        return str(users[-1]) if users else ""
    return str(prompt)


class LMJudge:
    """``judge(items)`` for items (prompt, answer A, answer B): log P(" A") - log P(" B") after the comparison
    prompt, per item (> 0: A is better)."""

    def __init__(self, model, tokenizer, principles: list[str] | None = None, template: str | None = None,
                 batch_size: int = 16):
        self.model, self.tok, self.batch_size = model, tokenizer, max(1, batch_size)
        self.principles = "\n".join(f"- {p}" for p in (principles or DEFAULT_PRINCIPLES))
        self.template = template or DEFAULT_TEMPLATE
        a, b = (tokenizer(f" {x}", add_special_tokens=False)["input_ids"] for x in "AB")
        if a[-1] == b[-1] or a[:-1] != b[:-1]:
            raise ValueError("the judge's tokenizer does not tell ' A' from ' B' by one last token; use another judge")
        # " A" may be two tokens (a space, then the letter): the verdict is read after the shared prefix
        self.prefix, self.letters = a[:-1], [a[-1], b[-1]]

    def __call__(self, items: list[tuple[str, str, str]]) -> list[float]:
        import torch

        from alignctl.evaluate import eval_mode, pad_id

        texts = [self.template.format(principles=self.principles, prompt=p, a=a, b=b) for p, a, b in items]
        device = next(self.model.parameters()).device
        pad, out = pad_id(self.tok), []
        with eval_mode(self.model), torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                ids = [self.tok(t)["input_ids"] + self.prefix for t in texts[i:i + self.batch_size]]
                width = max(len(x) for x in ids)
                x = torch.tensor([[pad] * (width - len(r)) + r for r in ids], device=device)  # left-padded
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids], device=device)
                logits = self.model(input_ids=x, attention_mask=mask).logits[:, -1].float()
                logp = torch.log_softmax(logits, dim=-1)
                out += (logp[:, self.letters[0]] - logp[:, self.letters[1]]).tolist()
        return out


def round_robin(judge: Callable[[list[tuple[str, str, str]]], list[float]], prompts: list[str],
                answers: list[list[str]]) -> tuple[list[list[float]], dict]:
    """Every pair of a prompt's answers judged in both orders. Returns (wins per answer, stats): answer i wins over
    j when the judge prefers i both as A and as B; an order-dependent verdict (or identical answers) is a tie."""
    items, index = [], []
    for n, (p, ans) in enumerate(zip(prompts, answers)):
        for i in range(len(ans)):
            for j in range(i + 1, len(ans)):
                items += [(p, ans[i], ans[j]), (p, ans[j], ans[i])]
                index.append((n, i, j))
    verdicts = judge(items) if items else []
    wins = [[0.0] * len(a) for a in answers]
    decisive = 0
    for m, (n, i, j) in enumerate(index):
        first, swapped = verdicts[2 * m], verdicts[2 * m + 1]  # > 0: the answer in position A is better
        if answers[n][i] == answers[n][j]:
            continue
        if first > 0 and swapped < 0:
            wins[n][i] += 1.0
            decisive += 1
        elif first < 0 and swapped > 0:
            wins[n][j] += 1.0
            decisive += 1
    return wins, {"comparisons": len(index), "decisive": decisive, "ties": len(index) - decisive,
                  "position_consistency": decisive / len(index) if index else 0.0}


def training_rows(pairs: list[dict], principles: list[str] | None = None, template: str | None = None) -> list[dict]:
    """Judge training examples (prompt -> " A" / " B") from preference pairs, each pair in both orders (so the
    verdict cannot follow the position): what trains the recipes' tiny local judge (``python -m alignctl.judge``)."""
    rules = "\n".join(f"- {p}" for p in (principles or DEFAULT_PRINCIPLES))
    fill = (template or DEFAULT_TEMPLATE).format
    text = lambda v: v[-1]["content"] if isinstance(v, list) else str(v)  # noqa: E731
    rows = []
    for r in pairs:
        q, good, bad = prompt_text(r["prompt"]), text(r["chosen"]), text(r["rejected"])
        rows.append({"prompt": fill(principles=rules, prompt=q, a=good, b=bad), "completion": " A"})
        rows.append({"prompt": fill(principles=rules, prompt=q, a=bad, b=good), "completion": " B"})
    return rows


if __name__ == "__main__":  # writes alignctl/assets/data/judge.jsonl from the built-in preference pairs
    import json
    from pathlib import Path

    assets = Path(__file__).parent / "assets" / "data"
    pairs = [json.loads(line) for line in (assets / "prefs.jsonl").read_text().splitlines() if line.strip()]
    out = assets / "judge.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in training_rows(pairs)))
    print(f"wrote {out}")
