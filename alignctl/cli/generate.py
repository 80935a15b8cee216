"""``alignctl generate <run dir | model folder> --prompt "..."`` (or ``--prompts-file F``, one prompt per line):
print answers of the run's final model (or the folder's model). Torch is imported once the arguments are checked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alignctl.cli.options import parse, quiet
from alignctl.config.types import ModelSpec
from alignctl.errors import ConfigError

GENERATE_USAGE = """\
usage: alignctl generate <run dir | model folder> (--prompt TEXT ... | --prompts-file FILE)
                         [--max-new-tokens N] [--temperature T] [--seed S]"""

# flag, type, default, accepted, what it must be (the message of a bad value)
SETTINGS = (("--max-new-tokens", int, "64", lambda v: 1 <= v <= 32768, "a whole number from 1 to 32768"),
            ("--temperature", float, "0", lambda v: 0 <= v <= 100, "a number from 0 (greedy) to 100"),
            ("--seed", int, "0", lambda v: 0 <= v < 2**32, "a whole number in [0, 2**32)"))


def run(args: list[str]) -> int:
    pos, opts, overrides = parse(args, {"--prompt", "--prompts-file", *(s[0] for s in SETTINGS)}, GENERATE_USAGE)
    quiet()
    if len(pos) != 1 or overrides or not (opts.get("--prompt") or opts.get("--prompts-file")):
        raise ConfigError([f"generate: name one run directory or model folder and --prompt or --prompts-file\n"
                           f"{GENERATE_USAGE}"])
    target = _model_folder(pos[0])
    prompts = _prompts(opts)
    values = _settings(opts)
    for p, text in zip(prompts, _answers(target, prompts, values)):
        print(f"> {p}\n{text}\n" if len(prompts) > 1 else text)
    sys.stdout.flush()
    return 0


def _model_folder(given: str) -> Path:
    """The model to answer with: a model folder, or a run directory's final model."""
    target = Path(given).expanduser()
    if (target / "manifest.json").is_file():
        target = Path(json.loads((target / "manifest.json").read_text())["final_model"])
    if not (target / "config.json").is_file():
        raise ConfigError([f"generate: {given} is neither a run directory with a final model nor a model folder"])
    return target


def _prompts(opts: dict[str, list[str]]) -> list[str]:
    prompts = list(opts.get("--prompt", []))
    for f in opts.get("--prompts-file", []):
        try:
            prompts += [line.strip() for line in Path(f).read_text().splitlines() if line.strip()]
        except OSError as e:
            raise ConfigError([f"--prompts-file: cannot read {f}: {e.strerror}"]) from None
    return prompts


def _settings(opts: dict[str, list[str]]) -> dict[str, int | float]:
    """--max-new-tokens, --temperature, --seed: the last value given (or the default), every bad one reported."""
    values, problems = {}, []
    for flag, cast, default, ok, what in SETTINGS:
        raw = opts.get(flag, [default])[-1]
        try:
            values[flag] = cast(raw)
            if not ok(values[flag]):
                raise ValueError
        except ValueError:
            problems.append(f"{flag}: must be {what}, got {raw!r}")
    if problems:
        raise ConfigError(problems)
    return values


def _answers(target: Path, prompts: list[str], values: dict) -> list[str]:
    """The model's answer to each prompt (as a chat turn when its tokenizer has a chat template)."""
    from alignctl import evaluate, models

    model_spec = ModelSpec(str(target))
    tok = models.load_tokenizer(str(target), model_spec)
    model = models.load_causal_lm(str(target), model_spec, models.precision_for("auto"), tok)
    turns = [[{"role": "user", "content": p}] if tok.chat_template else p for p in prompts]
    ids = [evaluate.encode_prompt(tok, t) for t in turns]
    answers = evaluate.generate(model, tok, ids, max_new_tokens=values["--max-new-tokens"],
                                temperature=values["--temperature"], seed=values["--seed"], batch_size=8)
    return [tok.decode(a, skip_special_tokens=True).strip() for a in answers]
