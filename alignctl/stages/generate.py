"""Generate and label preference data with a policy (iterative / on-policy DPO, RLAIF): output is a data set.

For each prompt of the stage's prompt data (its training split; ``num_prompts`` caps it) the policy (the ``from``
stage, or the base model) samples ``k`` answers (plain transformers, batched, through alignctl.evaluate.generate;
vLLM is not used), a scorer scores them, and the stage writes ``final/train.jsonl`` (and ``final/test.jsonl`` with
``eval_size`` > 0 of the prompts) — a data folder later stages name like any data set (``data: gen1``):

* ``pairs: best_worst`` (default): one pair per prompt, best vs worst answer, kept when their scores differ by more
  than ``margin``; ``pairs: all``: every pair of answers more than ``margin`` apart; ``pairs: kto``: scored
  completions labelled desirable (above the prompt's mean score) or not, for KTO.
* scorers (summed when several): ``reward:`` a reward stage or model path (alignctl.evaluate.reward_scores);
  ``judge:`` a causal LM (a stage or path) asked which of two answers is better under the ``constitution``
  (alignctl.judge), in both orders, each answer's score being its decisive wins (an order-dependent verdict is a tie
  and counts for neither); ``reward_funcs:`` TRL's built-in reward functions, checked as grpo's.

Its settings are alignctl's own dataclass :class:`GenerateConfig` (snapshotted in trl_fields.json like PPO's), so
the fingerprint covers them with the policy, scorer and prompts: a changed temperature regenerates that round only.
Under torchrun rank 0 does all the work (the others wait). ``rounds:`` (:func:`expand_rounds`) writes N rounds of
generate + train stages compactly.
"""

import copy
import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from alignctl.stages import StageKind

if TYPE_CHECKING:
    from alignctl.config.types import DataSpec, StageSpec

log = logging.getLogger("alignctl")


@dataclass
class GenerateConfig:
    k: int = field(default=4, metadata={"help": "Answers sampled per prompt (at least 2)."})
    num_prompts: int | None = field(default=None, metadata={"help": "Use at most this many prompts."})
    max_new_tokens: int = field(default=32, metadata={"help": "Most new tokens per answer."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (0 < top_p <= 1)."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per generation / scoring batch."})
    pairs: Literal["best_worst", "all", "kto"] = field(default="best_worst", metadata={
        "help": "best_worst: best vs worst answer per prompt; all: every pair more than `margin` apart; kto: "
                "scored completions labelled desirable or not."})
    margin: float = field(default=0.0, metadata={"help": "Keep a pair only when its score difference exceeds this."})
    eval_size: float = field(default=0.0, metadata={"help": "Fraction of the prompts whose pairs go to test.jsonl."})
    judge_template: str | None = field(default=None, metadata={
        "help": "The judge's comparison prompt with {principles}, {prompt}, {a}, {b} (default: alignctl.judge)."})
    seed: int = field(default=42, metadata={"help": "Seed of the sampling."})
    # filled in by alignctl for every stage (no effect here)
    output_dir: str | None = None
    disable_tqdm: bool = True
    bf16: bool = False
    fp16: bool = False
    report_to: str | None = None


def _linked(stage: "StageSpec", link: str) -> str | None:
    """The model path of one of the stage's links (None: not set)."""
    found = stage.link(link)
    return found.path if found is not None else None


def check(stage: "StageSpec", where: str) -> list[str]:
    """Plan-time checks: a scorer is named, the reward functions are TRL's (grpo's check), values are in range."""
    from alignctl.stages import grpo

    problems = []
    if not (_linked(stage, "reward") or _linked(stage, "judge") or stage.options.get("reward_funcs")):
        problems.append(f"{where}: a generate stage needs a scorer: `reward: <reward stage or path>`, "
                        "`judge: <stage or causal LM path>` and/or `reward_funcs: [...]`")
    problems += grpo.check(stage.replace(args={}), where)
    args = stage.args
    if isinstance(args.get("k"), int) and args["k"] < 2:
        problems.append(f"{where}.k: must be at least 2 (answers to compare), got {args['k']}")
    t, p = args.get("temperature", 1.0), args.get("top_p", 1.0)
    if isinstance(t, (int, float)) and t <= 0:
        problems.append(f"{where}.temperature: must be > 0 (k greedy answers would be identical), got {t}")
    if isinstance(p, (int, float)) and not 0 < p <= 1:
        problems.append(f"{where}.top_p: must be in (0, 1], got {p}")
    e = args.get("eval_size", 0.0)
    if isinstance(e, (int, float)) and not 0 <= e < 1:
        problems.append(f"{where}.eval_size: must be a fraction in [0, 1), got {e}")
    c = stage.options.get("constitution")
    if c is not None and (not isinstance(c, list) or not all(isinstance(x, str) and x for x in c)):
        problems.append(f"{where}.constitution: must be a list of principles (strings), got {c!r}")
    if c is not None and not _linked(stage, "judge"):
        problems.append(f"{where}.constitution: is read by a judge only; set `judge:` too")
    return problems


def data_source(stage: "StageSpec", run_dir: str) -> "DataSpec":
    """The data spec of a later stage's ``data: <this generate stage>``: its final/ folder, held-out split test."""
    from pathlib import Path

    from alignctl.config.data_checks import normalize, to_spec

    e = stage.args.get("eval_size", 0.0)
    spec, _ = normalize({"path": str(Path(run_dir) / stage.name / "final"), "split": "train",
                         "eval_split": "test" if e else None, "eval_size": 0}, f"stages.{stage.name}")
    return to_spec({**spec, "label": f"stages.{stage.name} (generated)"}, stage=stage.name)


def produces(stage: "StageSpec") -> str:
    """The data kind the stage writes: KTO-style labelled completions, or preference pairs."""
    return "unpaired" if stage.args.get("pairs") == "kto" else "preference"


# -- rounds: N ------------------------------------------------------------------------------------------------------
def expand_rounds(stages: dict, problems: list[str]) -> dict:
    """A stage entry ``{rounds: N, <gen>: {trainer: generate, ...}, <train>: {trainer: dpo, ...}, round2: {<gen>:
    {...}}}`` becomes stages <gen>1, <train>1, ..., <gen>N, <train>N: round i generates with the policy of round
    i-1 (round 1: <gen>'s `from`) and trains from it on <gen>i; ``round<i>`` holds per-round overrides."""
    out = {}
    for name, raw in stages.items():
        if not isinstance(raw, dict) or "rounds" not in raw:
            out[name] = raw
            continue
        n = raw["rounds"]
        subs = [k for k, v in raw.items() if isinstance(v, dict) and not str(k).startswith("round")]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or len(subs) != 2 or \
                raw[subs[0]].get("trainer") != "generate":
            problems.append(f"stages.{name}: a rounds block needs `rounds: <N >= 1>` and two stages, a generate "
                            f"stage then the stage it trains (e.g. {{rounds: 2, gen: {{trainer: generate, ...}}, "
                            f"dpo: {{trainer: dpo, ...}}}}), got keys {', '.join(map(str, raw))}")
            continue
        gen, train = subs
        unknown = [k for k in raw if k not in ("rounds", gen, train) and not
                   (str(k).startswith("round") and str(k)[5:].isdigit() and 1 <= int(str(k)[5:]) <= n)]
        if unknown:
            problems.append(f"stages.{name}: unknown key(s) {', '.join(map(str, unknown))} (per-round overrides are "
                            f"round1..round{n})")
        policy = raw[gen].get("from")
        for i in range(1, n + 1):
            extra = raw.get(f"round{i}") or {}
            g = {**copy.deepcopy(raw[gen]), **(extra.get(gen) or {}), "from": policy}
            t = {**copy.deepcopy(raw[train]), **(extra.get(train) or {}), "data": f"{gen}{i}"}
            t.setdefault("from", policy)
            if i > 1:
                t["from"] = policy
            out[f"{gen}{i}"], out[f"{train}{i}"] = g, t
            policy = f"{train}{i}"
    return out


KIND = StageKind(
    name="generate", config_class="alignctl.stages.generate.GenerateConfig", data_kind="prompt",
    summary="sample k answers per prompt from a policy, score them (reward model / judge / reward functions), "
            "write preference pairs", links=("reward", "judge"), output="data", options=("reward_funcs",
                                                                                          "constitution"),
    key_fields=("k", "num_prompts", "temperature", "top_p", "max_new_tokens", "pairs", "margin"), headline="pairs",
    # plan-time rules
    check=check, expand=expand_rounds, produces=produces, data_source=data_source,
)


# -- the stage -------------------------------------------------------------------------------------------------------
def _write(path, rows) -> None:
    from alignctl.fsutil import dumps

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(dumps(r).replace("\n", " ") + "\n" for r in rows))
    tmp.replace(path)


def _answer(prompt, text):
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _rows(prompt, answers: list[str], scores: list[float], cfg: GenerateConfig) -> list[dict]:
    """The rows one prompt yields: pairs (chosen scored higher by more than ``margin``) or KTO-labelled answers."""
    if cfg.pairs == "kto":
        mean = sum(scores) / len(scores)
        return [{"prompt": prompt, "completion": _answer(prompt, a), "label": s > mean, "score": s}
                for a, s in zip(answers, scores) if s != mean]
    order = sorted(range(len(answers)), key=lambda i: -scores[i])
    cands = [(order[0], order[-1])] if cfg.pairs == "best_worst" else \
        [(i, j) for n, i in enumerate(order) for j in order[n + 1:]]
    return [{"prompt": prompt, "chosen": _answer(prompt, answers[i]), "rejected": _answer(prompt, answers[j]),
             "score_chosen": scores[i], "score_rejected": scores[j]}
            for i, j in cands if scores[i] - scores[j] > cfg.margin and answers[i] != answers[j]]


def _summary(rows: list[dict], cfg: GenerateConfig) -> dict:
    text = lambda v: v[-1]["content"] if isinstance(v, list) else v  # noqa: E731
    out = {"pairs": float(len(rows))}
    if rows and cfg.pairs != "kto":
        margins = [r["score_chosen"] - r["score_rejected"] for r in rows]
        out.update(margin_mean=sum(margins) / len(margins), margin_min=min(margins), margin_max=max(margins))
        out["examples"] = [{"prompt": text(r["prompt"]) if not isinstance(r["prompt"], list) else
                            r["prompt"][-1]["content"], "chosen": text(r["chosen"]), "rejected": text(r["rejected"]),
                            "margin": round(r["score_chosen"] - r["score_rejected"], 4)} for r in rows[:3]]
    return out


def run(ctx):
    from pathlib import Path

    from alignctl import evaluate, judge, models
    from alignctl.ranks import rank_env
    from alignctl.runner import _release_memory
    from alignctl.stages import grpo

    if rank_env()[0] != 0:
        return {}  # rank 0 generates everything (the data set is small next to training)
    cfg = GenerateConfig(**{k: v for k, v in ctx.spec["args"].items() if k in GenerateConfig.__dataclass_fields__})
    prompts = list(ctx.train["prompt"])  # the training split only: held-out prompts stay unseen (eval.prompts)
    prompts = prompts[:cfg.num_prompts] if cfg.num_prompts else prompts
    tok = ctx.tokenizer
    prompt_ids = [evaluate.encode_prompt(tok, p) for p in prompts]
    policy = models.load_causal_lm(ctx.init_path, ctx.model_spec, ctx.precision, tok)
    # k answers per prompt: answer j of every prompt is one sampling pass, seeded seed + 1000 * j
    answers = [evaluate.generate(policy, tok, prompt_ids, max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed + 1000 * j,
                                 batch_size=cfg.batch_size) for j in range(cfg.k)]
    del policy
    _release_memory()
    texts = [[tok.decode(answers[j][i], skip_special_tokens=True).strip() for j in range(cfg.k)]
             for i in range(len(prompts))]
    scores = [[0.0] * cfg.k for _ in prompts]
    info: dict = {"prompts": len(prompts), "k": cfg.k, "scorers": []}
    if ctx.spec.get("reward_path"):
        rm, rtok = ctx.load_reward_model(), ctx.link_tokenizer("reward")  # an outside model: its own settings
        flat = evaluate.reward_scores(rm, rtok, tok, [p for p in prompt_ids for _ in range(cfg.k)],
                                      [answers[j][i] for i in range(len(prompts)) for j in range(cfg.k)],
                                      cfg.batch_size)
        for i in range(len(prompts)):
            for j in range(cfg.k):
                scores[i][j] += flat[i * cfg.k + j]
        info["scorers"].append(ctx.spec.get("reward") or ctx.spec["reward_path"])
        del rm
        _release_memory()
    if ctx.spec.get("judge_path"):
        jpath, jspec = ctx.link_model("judge")  # an outside judge: its own revision, template and consent
        jtok = models.load_tokenizer(jpath, jspec)
        jmodel = models.load_causal_lm(jpath, jspec, ctx.precision, jtok)
        ask = judge.LMJudge(jmodel, jtok, ctx.spec.get("constitution"), cfg.judge_template, cfg.batch_size)
        wins, stats = judge.round_robin(ask, [judge.prompt_text(p) for p in prompts], texts)
        for i in range(len(prompts)):
            for j in range(cfg.k):
                scores[i][j] += wins[i][j]
        info["scorers"].append(f"judge {ctx.spec.get('judge') or ctx.spec['judge_path']}")
        info["judge"] = stats
        del jmodel, ask
        _release_memory()
    if ctx.spec.get("reward_funcs"):
        funcs, _ = grpo.reward_functions(_NoRM(ctx))
        flat_p = [p for p in prompts for _ in range(cfg.k)]
        flat_c = [_answer(p, texts[i][j]) for i, p in enumerate(prompts) for j in range(cfg.k)]
        flat_ids = [answers[j][i] for i in range(len(prompts)) for j in range(cfg.k)]
        for f in funcs:  # TRL's reward-function interface, as GRPO calls it
            vals = f(prompts=flat_p, completions=flat_c, completion_ids=flat_ids)
            for n, v in enumerate(vals):
                scores[n // cfg.k][n % cfg.k] += float(v if v is not None else 0.0)
        info["scorers"] += [f if isinstance(f, str) else next(iter(f)) for f in ctx.spec["reward_funcs"]]
    order = list(range(len(prompts)))
    random.Random(cfg.seed).shuffle(order)
    held = set(order[:int(round(cfg.eval_size * len(prompts)))])
    train, test = [], []
    for i, p in enumerate(prompts):
        (test if i in held else train).extend(_rows(p, texts[i], scores[i], cfg))
    if not train or (held and not test):
        from alignctl.errors import StageFailed

        raise StageFailed(ctx.spec["name"], "(no pairs)", f"no {'held-out ' if train else ''}pairs left ({len(prompts)} "
                         f"prompts, {cfg.k} answers each): the scorer ranked the answers alike (ties, or margins "
                         f"≤ {cfg.margin}); raise k, num_prompts or temperature, or lower margin")
    out = Path(ctx.dir) / "final"
    _write(out / "train.jsonl", train)
    if held:
        _write(out / "test.jsonl", test)
    all_scores = [s for row in scores for s in row]
    info.update(score_mean=sum(all_scores) / len(all_scores), eval_pairs=len(test))
    log.info("[%s] %d prompts x %d answers -> %d pairs (%d held out)", ctx.spec["name"], len(prompts), cfg.k,
             len(train), len(test))
    summary = _summary(train, cfg)
    return {"data": {**summary, **info}, "after": {k: v for k, v in summary.items() if k in ("pairs", "margin_mean")}}


class _NoRM:
    """What grpo.reward_functions reads of a stage context, without the reward model (scored separately here)."""

    def __init__(self, ctx):
        self.spec = {**ctx.spec, "reward_path": None}
