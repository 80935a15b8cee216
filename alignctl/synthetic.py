"""The project's own synthetic data sets (bundled under ``alignctl/assets/data``).

A toy assistant world: the user asks about a thing, the assistant answers
``the <thing> is <adjective> and <adjective> .``.  Answers with warm adjectives
are preferred over answers with cold ones.  SFT data mixes both kinds half and
half, so a model fresh from SFT has no preference; preference training (DPO,
ORPO, KTO, SimPO, a reward model plus PPO/GRPO) has something clear to learn,
and held-out accuracy shows whether it did.  Chosen and rejected answers have
the same length, so sequence log-probabilities compare fairly.

Regenerate with ``python -m alignctl.synthetic`` (deterministic; a test checks
the bundled files match).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).parent / "assets" / "data"

THINGS = [
    "river", "garden", "city", "forest", "song", "book", "market", "bridge", "lake", "house",
    "road", "tree", "storm", "meal", "train", "school", "park", "letter", "island", "valley",
    "tower", "harbor", "field", "painting", "village", "window", "desert", "festival", "library", "mountain",
]
WARM = ["bright", "calm", "kind", "lovely", "warm", "gentle", "happy", "clear", "sunny", "friendly", "sweet",
        "pleasant"]
COLD = ["dull", "cold", "harsh", "ugly", "grim", "sad", "bitter", "rude", "gloomy", "nasty", "sour", "dreary"]
ASKS = [
    "tell me about the {t} .",
    "describe the {t} .",
    "what is the {t} like ?",
    "how would you describe the {t} ?",
    "say something about the {t} .",
]


def _ask(rng: random.Random) -> tuple[str, str]:
    thing = rng.choice(THINGS)
    return thing, rng.choice(ASKS).format(t=thing)


def _answer(rng: random.Random, thing: str, words: list[str]) -> str:
    a, b = rng.sample(words, 2)
    return f"the {thing} is {a} and {b} ."


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def sft(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        thing, ask = _ask(rng)
        words = WARM if i % 2 == 0 else COLD
        rows.append({"messages": _user(ask) + _assistant(_answer(rng, thing, words))})
    return rows


def prefs(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        thing, ask = _ask(rng)
        rows.append({
            "prompt": _user(ask),
            "chosen": _assistant(_answer(rng, thing, WARM)),
            "rejected": _assistant(_answer(rng, thing, COLD)),
        })
    return rows


def prompts(n: int, rng: random.Random) -> list[dict]:
    return [{"prompt": _user(_ask(rng)[1])} for _ in range(n)]


def unpaired(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        thing, ask = _ask(rng)
        good = i % 2 == 0
        rows.append({
            "prompt": _user(ask),
            "completion": _assistant(_answer(rng, thing, WARM if good else COLD)),
            "label": good,
        })
    return rows


# Everyday questions in plain English for a real instruct model (not the tiny world's, nor in its tokenizer corpus):
# every template x every activity once, so a held-out carve shares no prompt with the rest.
ACTIVITIES = ["gardening", "cooking at home", "running in the morning", "learning a new language",
              "playing the guitar", "saving money", "speaking in public", "painting with watercolours",
              "camping in the woods", "baking bread", "playing chess", "swimming", "knitting", "taking photos",
              "cycling to work", "keeping a journal", "hiking in the hills", "doing yoga", "writing poems",
              "fixing a bicycle"]
QUESTIONS = ["How do I get started with {a}?", "What is a common mistake people make when {a}?",
             "Can you give me some advice about {a}?", "My friend gave up on {a}. What could I say to cheer them up?",
             "Why do some people find {a} hard?", "What do you like about {a}?",
             "I tried {a} today and it went badly. Any thoughts?", "Explain {a} to a ten-year-old.",
             "How can I get better at {a}?", "Is {a} a good hobby for a busy person?",
             "Write a short message for someone who is {a} for the first time.", "What should I avoid when {a}?"]


def questions(n: int, rng: random.Random) -> list[dict]:
    rows = [{"prompt": _user(q.format(a=a))} for q in QUESTIONS for a in ACTIVITIES]
    rng.shuffle(rows)
    return rows[:n]


SETS = {"sft": (sft, 640), "prefs": (prefs, 640), "prompts": (prompts, 256), "unpaired": (unpaired, 640),
        "questions": (questions, 240)}


def build(name: str) -> list[dict]:
    make, n = SETS[name]
    return make(n, random.Random(f"alignctl-{name}"))


def write_all(out: Path = DATA_DIR) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in SETS:
        with open(out / f"{name}.jsonl", "w") as f:
            for row in build(name):
                f.write(json.dumps(row) + "\n")


def corpus() -> list[str]:
    """Every text of the synthetic world (used to train the tiny tokenizer)."""
    texts = list(ASKS) + [f"the {t} is {w} and {w} ." for t in THINGS for w in WARM + COLD]
    texts += [a.format(t=t) for a in ASKS for t in THINGS]
    return texts


if __name__ == "__main__":
    write_all()
