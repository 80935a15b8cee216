"""The job of a ``generate`` stage (alignctl.stages.generate declares the kind): sample ``k`` answers per prompt from
the policy, score them (reward model, LM judge, TRL reward functions), and write the preference pairs as a data
folder. :class:`GenerateJob` is the trainer alignctl.train.lifecycle drives for the kind."""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alignctl.stages.generate import GenerateConfig

log = logging.getLogger("alignctl")


def jsonl(rows) -> str:
    from alignctl.fsutil import dumps

    return "".join(dumps(r).replace("\n", " ") + "\n" for r in rows)


def as_answer(prompt, text):
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def pairs_of(prompt, answers: list[str], scores: list[float], cfg: GenerateConfig) -> list[dict]:
    """The rows one prompt yields: pairs (chosen scored higher by more than ``margin``) or KTO-labelled answers."""
    if cfg.unpaired:
        mean = sum(scores) / len(scores)
        return [{"prompt": prompt, "completion": as_answer(prompt, a), "label": s > mean, "score": s}
                for a, s in zip(answers, scores) if s != mean]
    order = sorted(range(len(answers)), key=lambda i: -scores[i])
    cands = [(order[0], order[-1])] if cfg.pairs == "best_worst" else \
        [(i, j) for n, i in enumerate(order) for j in order[n + 1:]]
    return [{"prompt": prompt, "chosen": as_answer(prompt, answers[i]), "rejected": as_answer(prompt, answers[j]),
             "score_chosen": scores[i], "score_rejected": scores[j]}
            for i, j in cands if scores[i] - scores[j] > cfg.margin and answers[i] != answers[j]]


def summary(rows: list[dict], cfg: GenerateConfig) -> dict:
    text = lambda v: v[-1]["content"] if isinstance(v, list) else v  # noqa: E731
    out = {"pairs": float(len(rows))}
    if rows and not cfg.unpaired:
        margins = [r["score_chosen"] - r["score_rejected"] for r in rows]
        out.update(margin_mean=sum(margins) / len(margins), margin_min=min(margins), margin_max=max(margins))
        out["examples"] = [{"prompt": text(r["prompt"]) if not isinstance(r["prompt"], list) else
                            r["prompt"][-1]["content"], "chosen": text(r["chosen"]), "rejected": text(r["rejected"]),
                            "margin": round(r["score_chosen"] - r["score_rejected"], 4)} for r in rows[:3]]
    return out


def round_signals(scores: list[list[float]], answers: list[list[list[int]]], eos: int | None,
                  max_new_tokens: int) -> dict[str, float]:
    """The reward-hacking monitors' signals of one round's answers (alignctl.train.monitors, under the names PPO
    logs them): score mean and std, mean length in tokens, score-length correlation, share cut at max_new_tokens."""
    import statistics

    flat = [(scores[i][j], answers[j][i]) for i in range(len(scores)) for j in range(len(scores[i]))]
    values, lengths = [s for s, _ in flat], [float(len(a)) for _, a in flat]
    out = {"objective/scores": statistics.fmean(values), "monitor/reward_std": statistics.pstdev(values),
           "monitor/length": statistics.fmean(lengths),
           "monitor/truncated": statistics.fmean(float(len(a) >= max_new_tokens and (not a or a[-1] != eos))
                                                 for _, a in flat)}
    if statistics.pstdev(values) > 0 and statistics.pstdev(lengths) > 0:
        out["monitor/length_corr"] = statistics.correlation(values, lengths)
    return {k: round(v, 6) for k, v in out.items()}


class GenerateJob:
    """The generate kind's trainer as alignctl.train.lifecycle drives it: ``train()`` samples ``k`` answers per
    prompt from the policy and scores them, ``save_model(dir)`` writes the data set (train.jsonl, and test.jsonl
    with ``eval_size`` > 0). It has no model to evaluate or save (output ``data``), logs nothing per step and does
    not resume. Under torchrun rank 0 does all the work (the data set is small next to training)."""

    model = None

    def __init__(self, ctx, config_class: type[GenerateConfig]):
        from transformers import TrainerState

        self.ctx = ctx
        self.args = config_class(**{k: v for k, v in ctx.spec.args.items()
                                    if k in config_class.__dataclass_fields__})
        self.state = TrainerState()
        self.rows: tuple[list[dict], list[dict] | None] | None = None  # (train, test or None) once generated
        self.info: dict = {}

    def is_world_process_zero(self) -> bool:
        from alignctl.ranks import rank_env

        return rank_env()[0] == 0

    def evaluate(self) -> dict:
        return {}  # no held-out metric of its own: extra_metrics summarises what it wrote

    def train(self, resume_from_checkpoint: str | None = None) -> None:
        from alignctl.evaluate import encode_prompt

        if not self.is_world_process_zero():
            return None
        ctx, cfg = self.ctx, self.args
        prompts = list(ctx.train["prompt"])  # the training split only: held-out prompts stay unseen (eval.prompts)
        prompts = prompts[:cfg.num_prompts] if cfg.num_prompts else prompts
        prompt_ids = [encode_prompt(ctx.tokenizer, p) for p in prompts]
        answers = _sample(ctx, cfg, prompt_ids)
        texts = [[ctx.tokenizer.decode(answers[j][i], skip_special_tokens=True).strip() for j in range(cfg.k)]
                 for i in range(len(prompts))]
        scores, self.info = _score(ctx, cfg, prompts, prompt_ids, answers, texts)
        self.rows = train, test = _split(ctx.spec.name, cfg, prompts, texts, scores)
        all_scores = [x for row in scores for x in row]
        self.info.update(score_mean=sum(all_scores) / len(all_scores), eval_pairs=len(test or []),
                         monitor=round_signals(scores, answers, ctx.tokenizer.eos_token_id, cfg.max_new_tokens))
        log.info("[%s] %d prompts x %d answers -> %d pairs (%d held out)", ctx.spec.name, len(prompts), cfg.k,
                 len(train), len(test or []))
        return None

    def save_model(self, output_dir: str | None = None) -> None:
        from pathlib import Path

        from alignctl.fsutil import write_text_atomic

        out = Path(output_dir or self.ctx.dir / "final")
        out.mkdir(parents=True, exist_ok=True)
        train, test = self.rows
        write_text_atomic(out / "train.jsonl", jsonl(train))
        if test is not None:
            write_text_atomic(out / "test.jsonl", jsonl(test))


def _sample(ctx, cfg: GenerateConfig, prompt_ids: list[list[int]]) -> list[list[list[int]]]:
    """k answers per prompt from the policy: answer j of every prompt is one sampling pass, seeded seed + 1000 * j."""
    from alignctl import evaluate, models
    from alignctl.train.context import release_memory

    policy = models.load_causal_lm(ctx.init_path, ctx.model_spec, ctx.precision, ctx.tokenizer)
    answers = [evaluate.generate(policy, ctx.tokenizer, prompt_ids, max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed + 1000 * j,
                                 batch_size=cfg.batch_size) for j in range(cfg.k)]
    del policy
    release_memory()
    return answers


def _score(ctx, cfg: GenerateConfig, prompts: list, prompt_ids: list, answers: list, texts: list[list[str]]
           ) -> tuple[list[list[float]], dict]:
    """Each answer's score, summed over the stage's scorers (reward model, judge, reward functions), and what
    scored them."""
    k = cfg.k
    scores = [[0.0] * k for _ in prompts]
    info: dict = {"prompts": len(prompts), "k": k, "scorers": []}

    def add(flat: list[float]) -> None:  # one score per answer, prompt by prompt
        for n, v in enumerate(flat):
            scores[n // k][n % k] += v

    flat_ids = [answers[j][i] for i in range(len(prompts)) for j in range(k)]
    reward, judge_link = ctx.spec.link("reward"), ctx.spec.link("judge")
    if reward is not None and reward.path:
        add(reward_scores(ctx, [p for p in prompt_ids for _ in range(k)], flat_ids, cfg.batch_size))
        info["scorers"].append(reward.stage or reward.path)
    if judge_link is not None and judge_link.path:
        wins, info["judge"] = judge_wins(ctx, prompts, texts, ctx.spec.options.get("constitution"),
                                         cfg.judge_template, cfg.batch_size)
        add([w for row in wins for w in row])
        info["scorers"].append(f"judge {judge_link.stage or judge_link.path}")
    funcs = ctx.spec.options.get("reward_funcs")
    if funcs:
        for flat in _function_scores(cfg, funcs, prompts, texts, flat_ids):
            add(flat)
        info["scorers"] += [f if isinstance(f, str) else next(iter(f)) for f in funcs]
    return scores, info


def reward_scores(ctx, prompt_ids: list, answer_ids: list, batch_size: int, link: str = "reward") -> list[float]:
    """The score of each prompt + answer (token ids of the stage's tokenizer) by the classifier of the stage's link
    ``link`` (its reward model, or an audit's)."""
    from alignctl import evaluate
    from alignctl.train.context import release_memory

    rm, rtok = ctx.load_classifier(*ctx.link_model(link)), ctx.link_tokenizer(link)  # an outside model: its own
    flat = evaluate.reward_scores(rm, rtok, ctx.tokenizer, prompt_ids, answer_ids, batch_size)
    del rm
    release_memory()
    return flat


def judge_wins(ctx, prompts: list, texts: list[list[str]], principles: list[str] | None, template: str | None,
               batch_size: int) -> tuple[list[list[float]], dict]:
    """Each answer's decisive wins over the prompt's other answers, by the stage's judge under ``principles`` (both
    orders; alignctl.judge), and the judge's statistics."""
    from alignctl import judge, models
    from alignctl.train.context import release_memory

    jpath, jspec = ctx.link_model("judge")  # an outside judge: its own revision, template and consent
    jtok = models.load_tokenizer(jpath, jspec)
    jmodel = models.load_causal_lm(jpath, jspec, ctx.precision, jtok)
    ask = judge.LMJudge(jmodel, jtok, principles, template, batch_size)
    wins, stats = judge.round_robin(ask, [judge.prompt_text(p) for p in prompts], texts)
    del jmodel, ask
    release_memory()
    return wins, stats


def _function_scores(cfg: GenerateConfig, funcs: list, prompts: list, texts: list[list[str]], flat_ids: list
                     ) -> list[list[float]]:
    """Each of TRL's reward functions (checked as grpo's) over every answer, called as GRPO calls them."""
    from alignctl.stages import grpo

    flat_p = [p for p in prompts for _ in range(cfg.k)]
    flat_c = [as_answer(p, texts[i][j]) for i, p in enumerate(prompts) for j in range(cfg.k)]
    return [[float(v if v is not None else 0.0) for v in f(prompts=flat_p, completions=flat_c, completion_ids=flat_ids)]
            for f in grpo.builtin_rewards(funcs)]


def _split(stage: str, cfg: GenerateConfig, prompts: list, texts: list[list[str]], scores: list[list[float]]
           ) -> tuple[list[dict], list[dict] | None]:
    """(train rows, held-out rows or None without ``eval_size``): ``eval_size`` of the prompts, drawn with the
    stage's seed, give the held-out rows; fails the stage when no pairs are left."""
    order = list(range(len(prompts)))
    random.Random(cfg.seed).shuffle(order)
    held = set(order[:int(round(cfg.eval_size * len(prompts)))])
    train: list[dict] = []
    test: list[dict] = []
    for i, p in enumerate(prompts):
        (test if i in held else train).extend(pairs_of(p, texts[i], scores[i], cfg))
    if not train or (held and not test):
        from alignctl.errors import StageFailed

        raise StageFailed(stage, "(no pairs)", f"no {'held-out ' if train else ''}pairs left ({len(prompts)} "
                          f"prompts, {cfg.k} answers each): the scorer ranked the answers alike (ties, or margins "
                          f"≤ {cfg.margin}); raise k, num_prompts or temperature, or lower margin")
    return train, test if held else None
