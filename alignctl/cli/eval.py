"""``alignctl eval <run dir | model folder>``: the held-out evaluation of a finished run or of any model folder.

``alignctl eval <run dir>`` repeats every policy stage's evaluation from its ``spec.json`` (same prompts, seed,
batch size and settings as in the run, unless overridden): the stage's initial weights give the "before" answers,
its ``final/`` the "after" answers, so the after-metrics reproduce the run's. ``alignctl eval <model folder>
--reference R --prompts DATA`` evaluates any model against a reference (the reference's answers are "before").
Results: ``eval.json``, ``<stage>.samples.jsonl`` and reward histograms in ``<run dir>/eval/`` (``--out``).
The work is alignctl.evaluation_run's (imported once the arguments are checked, so ``--help`` loads no torch);
this module parses the command line and prints the table.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from alignctl.cli.options import parse, quiet
from alignctl.config import checks
from alignctl.errors import ConfigError
from alignctl.metrics import fmt, win_text

EVAL_USAGE = """\
usage: alignctl eval <run dir | model folder> [--reference PATH] [--reward PATH] [--prompts DATA] [--out DIR]
                     [--trust-remote-code] [eval.max_prompts=N eval.max_new_tokens=N eval.temperature=T eval.seed=S]
  a run dir: every policy stage, before (its initial weights) vs after (its final/), as in the run
  a model folder: against --reference (its answers are "before"); --prompts is a data set name of the default
  configuration (e.g. prompts, prefs: its held-out split) or a data file (all its prompts, up to
  eval.max_prompts); --reward a reward model folder (win rate, reward histogram)
  --trust-remote-code: let models run Python code shipped with them, where the run allowed it (its spec.json) or
  for a model folder; without it no remote code runs, whatever a run directory's spec.json says"""


def run(args: list[str]) -> int:
    pos, opts, overrides = parse(args, {"--reference", "--reward", "--prompts", "--out"}, EVAL_USAGE,
                                 frozenset({"--trust-remote-code"}))
    quiet()
    if len(pos) != 1:
        raise ConfigError([f"eval: name one run directory or model folder\n{EVAL_USAGE}"])
    target = Path(pos[0]).expanduser()
    if not target.exists():
        raise ConfigError([f"eval: {target} does not exist"])
    one = {k: v[-1] for k, v in opts.items()}
    if one.get("--out"):  # checked before any model loads, not when the results are written
        bad = checks.writable_problem(Path(one["--out"]).expanduser().absolute(), "--out")
        if bad:
            raise ConfigError([bad])
    is_run, is_model = (target / "manifest.json").is_file(), (target / "config.json").is_file()
    if not (is_run or is_model):
        raise ConfigError([f"eval: {target} is neither a run directory (manifest.json) nor a model folder "
                           "(config.json)"])
    from alignctl import evaluation_run

    if is_run:
        result, out = evaluation_run.eval_run(target, one, overrides)
    else:
        result, out = evaluation_run.eval_model(target, one, overrides)
    _print(result, out)
    return 0


def _print(result: dict, out: Path) -> None:
    table = Table("stage", "prompts", "KL/token before", "KL/token after", "reward before", "reward after",
                  "win rate [95% CI], length-controlled", "pref acc (norm)")
    for name, r in result["stages"].items():
        b, a = r.get("before", {}), r.get("after", {})
        win = win_text(a)
        table.add_row(name, str(r["eval"].get("prompts", "")), fmt(b.get("eval_kl")), fmt(a.get("eval_kl")),
                      fmt(b.get("eval_reward_mean")), fmt(a.get("eval_reward_mean")), win,
                      fmt(a.get("eval_pref_accuracy_norm")))
    Console(width=160, soft_wrap=True).print(table)
    print(f"eval: {out / 'eval.json'}")
