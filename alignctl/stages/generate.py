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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from alignctl.stages import StageKind

if TYPE_CHECKING:
    from alignctl.config.types import DataSpec, StageSpec


# -- run time: the job (alignctl.generation.GenerateJob), its metrics and its report section ---------------------
def build(ctx):
    from alignctl.generation import GenerateJob

    return GenerateJob(ctx, GenerateConfig)


def extra_metrics(job, metrics: dict) -> dict:
    """What the stage wrote (``data``: pairs, margins, scorers, judge statistics, examples) and its headline after
    it (``pairs``, ``margin_mean``)."""
    if job.rows is None:  # not rank 0
        return metrics
    from alignctl.generation import summary as summarize

    summary = summarize(job.rows[0], job.args)
    return {**metrics, "data": {**summary, **job.info},
            "after": {k: v for k, v in summary.items() if k in ("pairs", "margin_mean")}}


def report_section(stage: dict, run_dir, stages: list[dict]) -> list[str]:
    """A generate stage in the run report: the data it wrote, and how the stage after it (the round's training)
    did against its starting policy, i.e. the previous round."""
    from alignctl.metrics import fmt
    from alignctl.report import cell

    d = (stage.get("metrics") or {}).get("data")
    if not d:
        return []
    lines = [f"### {stage['name']}: {int(d.get('pairs', 0))} pairs from {d.get('prompts')} prompts x {d.get('k')} "
             f"answers (scored by {', '.join(d.get('scorers') or [])}; {d.get('eval_pairs', 0)} held out)", ""]
    if "margin_mean" in d:
        lines.append(f"Score margin chosen - rejected: mean {fmt(d['margin_mean'])}, min {fmt(d['margin_min'])}, "
                     f"max {fmt(d['margin_max'])}; mean score of all answers {fmt(d.get('score_mean'))}.")
    j = d.get("judge")
    if j:
        lines.append(f"Judge: {j['comparisons']} comparisons asked in both orders, {j['decisive']} decisive, "
                     f"{j['ties']} ties (identical answers, or a verdict that flipped with the order: no pair); "
                     f"position consistency {fmt(j['position_consistency'])}.")
    n = next(i for i, s in enumerate(stages) if s["name"] == stage["name"])
    nxt = stages[n + 1] if n + 1 < len(stages) else None
    after = ((nxt or {}).get("metrics") or {}).get("after") or {}
    if "eval_win_rate" in after:
        lines.append(_next_round_line(nxt["name"], after))
    lines.append("")
    lines += _round_monitors(stage, stages)
    if d.get("examples"):
        lines += ["| prompt | chosen | rejected | margin |", "| --- | --- | --- | --- |"]
        lines += [f"| {cell(e['prompt'])} | {cell(e['chosen'])} | {cell(e['rejected'])} | {fmt(e['margin'])} |"
                  for e in d["examples"][:3]]
        lines.append("")
    return lines


def _round_monitors(stage: dict, stages: list[dict]) -> list[str]:
    """Under the first generate stage, the reward-hacking monitors round by round (the default thresholds of
    alignctl.train.monitors, round 1 as the first value): the generated answers' score mean and std, length,
    score-length correlation and share truncated, and the KL to its reference of the stage trained on the round."""
    from alignctl.metrics import fmt
    from alignctl.train import monitors

    rounds = [(n, s) for n, s in enumerate(stages) if ((s.get("metrics") or {}).get("data") or {}).get("monitor")]
    if len(rounds) < 2 or rounds[0][1]["name"] != stage["name"]:
        return []
    watch = monitors.Monitor(monitors.defaults(), "rounds", quiet=True)
    rows = ["Reward-hacking monitors per round (thresholds as for PPO, round 1 the reference; KL: the stage trained "
            "on the round, per token):", "", "| round | score mean | score std | length | length corr | truncated | "
            "KL | fired |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, (n, s) in enumerate(rounds, start=1):
        sig = s["metrics"]["data"]["monitor"]
        watch.observe(i, sig)
        fired = ", ".join(e["monitor"] for e in watch.events if e["step"] == i) or "—"
        nxt = stages[n + 1] if n + 1 < len(stages) else {}
        kl = ((nxt.get("metrics") or {}).get("after") or {}).get("eval_kl")
        rows.append(f"| {s['name']} | {fmt(sig['objective/scores'])} | {fmt(sig['monitor/reward_std'])} | "
                    f"{fmt(sig['monitor/length'])} | {fmt(sig.get('monitor/length_corr'))} | "
                    f"{fmt(sig['monitor/truncated'])} | {fmt(kl)} | {fired} |")
    return rows + [""]


def _next_round_line(name: str, after: dict) -> str:
    from alignctl.metrics import fmt, win_text

    return (f"{name} trained on it: held-out win rate vs its starting policy (the previous round) "
            f"{win_text(after, 3)}"
            + (f", vs its reference {after['eval_win_rate_ref']:.3f}" if "eval_win_rate_ref" in after else "")
            + (f"; reward {fmt(after.get('eval_reward_mean'))}" if "eval_reward_mean" in after else "")
            + (f"; KL to reference {fmt(after.get('eval_kl'))}/token" if "eval_kl" in after else "") + ".")




@dataclass
class DataStageFields:
    """The fields alignctl fills in for every stage's config (alignctl.train.context.args_for): a stage whose output
    is data reads none of them; its config class takes them so they are accepted."""
    output_dir: str | None = None
    disable_tqdm: bool = True
    bf16: bool = False
    fp16: bool = False
    report_to: str | None = None


@dataclass
class GenerateConfig(DataStageFields):
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

    @property
    def unpaired(self) -> bool:
        """Scored completions labelled desirable or not (``pairs: kto``), rather than pairs."""
        return self.pairs == "kto"


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
    problems += grpo.reward_problems(stage.replace(args={}), where)
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


def data_source(stage: "StageSpec", run_dir: str, data_kind: str | None = None) -> "DataSpec":
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
    # run-time behaviour
    build=build, resumable=False, extra_metrics=extra_metrics, report_section=report_section,
    report_heading="Generated data",
)
