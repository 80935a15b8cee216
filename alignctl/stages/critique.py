"""Critique and revise answers against written principles (Constitutional AI's supervised half, Bai et al. 2022):
output is data, SFT rows and preference pairs.

For each prompt of the stage's prompt data (its training split; ``num_prompts`` caps it) the policy (the ``from``
stage, or the base model) answers; then, ``revisions`` times, the critic (``critic:`` a causal LM, a stage or a path;
by default the policy itself, as in the paper) is shown the conversation so far and asked to critique the latest
answer against one principle drawn from ``principles`` (a YAML list of strings, or the path of a file of them: one per
line, or a YAML/JSON list), then to rewrite the answer given its critique. The stage writes to ``final/``:

* ``sft.jsonl``: prompt -> final revision (messages for conversational prompts, else prompt/completion), for an SFT
  stage (``data: <this stage>``);
* ``pairs.jsonl``: the final revision chosen over the original answer, for a DPO-like stage (same ``data:``);
* ``triples.jsonl``: every (original, principle, critique, revision) of every prompt, for reading;
* with ``eval_size`` > 0, ``sft_test.jsonl`` and ``pairs_test.jsonl`` from that share of the prompts.

A revision identical to its original yields no row. With a scorer (``reward:`` a reward stage or model, and/or
``judge:`` a causal LM asked in both orders, as in ``generate``), only revisions it prefers to their original by more
than ``margin`` are kept; the share it preferred is in the manifest and the report. The critique and revision
requests are ``critique_template`` / ``revision_template`` with ``{principle}`` (defaults: alignctl.critique); a
stage that lists no principles gets :data:`DEFAULT_PRINCIPLES`. ``audit:`` (a reward stage or model) scores original
and revision too but decides nothing: the share of revisions it prefers measures whether revising helped, by a judge
the selection never used. Every setting, the principles' text, the policy, the critic, the scorer and the audit are
in the fingerprint: a re-run reuses the stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from alignctl.stages import StageKind
from alignctl.stages.generate import DataStageFields

if TYPE_CHECKING:
    from alignctl.config.types import DataSpec, StageSpec

# The principles of a stage that lists none (written for this project): plan shows them, the fingerprint covers them.
DEFAULT_PRINCIPLES = ("An answer should help with what was asked, plainly and without padding.",
                      "An answer should be honest: no invented facts, and uncertainty said as such.",
                      "An answer should be kind and respectful, and should not help anyone cause harm.")
FILES = {"sft": "sft", "preference": "pairs"}  # data kind -> the split (file stem) of final/ holding it


@dataclass
class CritiqueConfig(DataStageFields):
    revisions: int = field(default=1, metadata={"help": "Critique/revision rounds per prompt (each one principle)."})
    num_prompts: int | None = field(default=None, metadata={"help": "Use at most this many prompts."})
    max_new_tokens: int = field(default=64, metadata={"help": "Most new tokens per answer, critique and revision."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (0: greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (0 < top_p <= 1)."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per generation / scoring batch."})
    critique_template: str | None = field(default=None, metadata={
        "help": "The critique request (a user turn) with {principle} (default: alignctl.critique)."})
    revision_template: str | None = field(default=None, metadata={
        "help": "The revision request (a user turn) with {principle} (default: alignctl.critique)."})
    margin: float = field(default=0.0, metadata={
        "help": "With a scorer: keep a revision only when it scores above its original by more than this."})
    eval_size: float = field(default=0.0, metadata={"help": "Fraction of the prompts whose rows go to *_test.jsonl."})
    judge_template: str | None = field(default=None, metadata={
        "help": "The judge's comparison prompt with {principles}, {prompt}, {a}, {b} (default: alignctl.judge)."})
    seed: int = field(default=42, metadata={"help": "Seed of the sampling and of the principles drawn."})


# -- plan time ------------------------------------------------------------------------------------------------------
def read_principles(value, where: str) -> tuple[list | None, list[str]]:
    """``principles:`` as written: a list, or the path of a file of them (a YAML/JSON list, else one per line;
    blank lines and lines starting with # are skipped). Returns (the list or the value as it was, problems)."""
    if not isinstance(value, str):
        return value, []
    path = Path(value).expanduser()
    if not path.is_file():
        return None, [f"{where}.principles: no file {value} (give a list of principles, or the path of a file "
                      "with one per line)"]
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        return None, [f"{where}.principles: cannot read {value} as text: {getattr(e, 'strerror', None) or e}"]
    if path.suffix in (".yaml", ".yml", ".json"):
        import yaml

        try:
            found = yaml.safe_load(text)
        except yaml.YAMLError as e:
            return None, [f"{where}.principles: {value} is not valid YAML: {str(e).splitlines()[0]}"]
        if not isinstance(found, list):
            return None, [f"{where}.principles: {value} must hold a list of principles, got {type(found).__name__}"]
        return found, []
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")], []


def expand_principles(stages: dict, problems: list[str]) -> dict:
    """A critique stage's ``principles`` file becomes the list it holds (so the fingerprint covers the text); a
    stage without principles gets the default ones."""
    out = {}
    for name, raw in stages.items():
        if isinstance(raw, dict) and raw.get("trainer") == "critique":
            found, more = read_principles(raw.get("principles", list(DEFAULT_PRINCIPLES)), f"stages.{name}")
            problems += more
            raw = {**raw, "principles": found}
        out[name] = raw
    return out


def check(stage: StageSpec, where: str) -> list[str]:
    """Principles are a non-empty list of text; templates name {principle}; values are in range."""
    problems = []
    p = stage.options.get("principles")
    if p is not None and (not isinstance(p, list) or not p or not all(isinstance(x, str) and x.strip() for x in p)):
        problems.append(f"{where}.principles: must be a non-empty list of principles (text), got {p!r}")
    args = stage.args
    for key in ("critique_template", "revision_template"):
        t = args.get(key)
        if t is not None and "{principle}" not in str(t):
            problems.append(f"{where}.{key}: must contain {{principle}} (where the principle goes), got {t!r}")
    n = args.get("revisions", 1)
    if isinstance(n, int) and not isinstance(n, bool) and n < 1:
        problems.append(f"{where}.revisions: must be at least 1, got {n}")
    t, top = args.get("temperature", 0.7), args.get("top_p", 1.0)
    if isinstance(t, (int, float)) and t < 0:
        problems.append(f"{where}.temperature: must be >= 0 (0: greedy), got {t}")
    if isinstance(top, (int, float)) and not 0 < top <= 1:
        problems.append(f"{where}.top_p: must be in (0, 1], got {top}")
    e = args.get("eval_size", 0.0)
    if isinstance(e, (int, float)) and not 0 <= e < 1:
        problems.append(f"{where}.eval_size: must be a fraction in [0, 1), got {e}")
    return problems


def produces(stage: StageSpec) -> tuple[str, ...]:
    return ("sft", "preference")


def data_source(stage: StageSpec, run_dir: str, data_kind: str) -> DataSpec:
    """A later stage's ``data: <this stage>``: the revisions for an SFT stage, the pairs for a preference stage."""
    from alignctl.config.data_checks import normalize, to_spec

    split = FILES.get(data_kind, "pairs")
    e = stage.args.get("eval_size", 0.0)
    spec, _ = normalize({"path": str(Path(run_dir) / stage.name / "final"), "split": split,
                         "eval_split": f"{split}_test" if e else None, "eval_size": 0}, f"stages.{stage.name}")
    return to_spec({**spec, "label": f"stages.{stage.name} ({split}, generated)"}, stage=stage.name)


# -- run time -------------------------------------------------------------------------------------------------------
def build(ctx):
    from alignctl.critique import CritiqueJob

    return CritiqueJob(ctx, CritiqueConfig)


def extra_metrics(job, metrics: dict) -> dict:
    """What the stage wrote (``data``: prompts, revised, kept, preferred share, examples); headline ``pairs``."""
    if job.rows is None:  # not rank 0
        return metrics
    return {**metrics, "data": job.info, "after": {"pairs": float(job.info["pairs"])}}


def report_section(stage: dict, run_dir, stages: list[dict]) -> list[str]:
    """The critique stage in the run report: how many revisions changed and were preferred, and a few triples."""
    from alignctl.metrics import fmt
    from alignctl.report import cell

    d = (stage.get("metrics") or {}).get("data")
    if not d:
        return []
    lines = [f"### {stage['name']}: {d['revised']} of {d['prompts']} answers revised ({d['revisions']} round(s) "
             f"against {d['principles']} principles), {d['pairs']} pairs and {d['sft_rows']} SFT rows kept", ""]
    if d.get("scorers"):
        lines.append(f"Scored by {', '.join(d['scorers'])}: it preferred the revision to the original for "
                     f"{d['preferred']} of {d['revised']} revised answers (share {fmt(d.get('preferred_share'))}).")
        lines.append("")
    a = d.get("audit")
    if a:
        lines.append(f"Audit {a['model']} (never used to select): it prefers the revision for {a['preferred']} of "
                     f"{a['revised']} revised answers (share {fmt(a['preferred_share'])}; mean score "
                     f"{fmt(a['score_original'])} -> {fmt(a['score_revision'])}).")
        lines.append("")
    lines += ["| prompt | original | principle | critique | revision |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {cell(e['prompt'])} | {cell(e['original'])} | {cell(e['principle'])} | {cell(e['critique'])} | "
              f"{cell(e['revision'])} |" for e in d.get("examples", [])[:3]]
    return lines + [""]


KIND = StageKind(
    name="critique", config_class="alignctl.stages.critique.CritiqueConfig", data_kind="prompt",
    summary="answer, critique against a principle and revise (Constitutional AI): write SFT rows of the revisions "
            "and pairs of revision over original", links=("critic", "reward", "judge", "audit"), output="data",
    options=("principles",),
    key_fields=("revisions", "num_prompts", "temperature", "max_new_tokens", "margin"), headline="pairs",
    # plan-time rules
    check=check, expand=expand_principles, produces=produces, data_source=data_source,
    # run-time behaviour
    build=build, resumable=False, extra_metrics=extra_metrics, report_section=report_section,
    report_heading="Critiques and revisions",
)
