"""``alignctl eval`` and ``alignctl generate``: the held-out evaluation of a finished run or of any model folder.

``alignctl eval <run dir>`` repeats every policy stage's evaluation from its ``spec.json`` (same prompts, seed,
batch size and settings as in the run, unless overridden): the stage's initial weights give the "before" answers,
its ``final/`` the "after" answers, so the after-metrics reproduce the run's. ``alignctl eval <model folder>
--reference R --prompts DATA`` evaluates any model against a reference (the reference's answers are "before").
Results: ``eval.json``, ``<stage>.samples.jsonl`` and reward histograms in ``<run dir>/eval/`` (``--out``).
A run directory's ``spec.json`` is read like any input (:func:`checked_spec`): the models it names are checked as
``plan`` checks them, and no remote code runs unless ``--trust-remote-code`` is given on the command line.

``alignctl generate <run dir | model folder> --prompt "..." (or --prompts-file F, one prompt per line)`` prints
answers of the run's final model (or the folder's model).

Nothing here is imported by ``--help``; torch is imported when a command runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from alignctl.errors import ConfigError

EVAL_USAGE = """\
usage: alignctl eval <run dir | model folder> [--reference PATH] [--reward PATH] [--prompts DATA] [--out DIR]
                     [--trust-remote-code] [eval.max_prompts=N eval.max_new_tokens=N eval.temperature=T eval.seed=S]
  a run dir: every policy stage, before (its initial weights) vs after (its final/), as in the run
  a model folder: against --reference (its answers are "before"); --prompts is a data set name of the default
  configuration (e.g. prompts, prefs) or a data file; --reward a reward model folder (win rate, reward histogram)
  --trust-remote-code: let models run Python code shipped with them, where the run allowed it (its spec.json) or
  for a model folder; without it no remote code runs, whatever a run directory's spec.json says"""
GENERATE_USAGE = """\
usage: alignctl generate <run dir | model folder> (--prompt TEXT ... | --prompts-file FILE)
                         [--max-new-tokens N] [--temperature T] [--seed S]"""


def _parse(args: list[str], flags: set[str], usage: str, switches: frozenset[str] = frozenset()
           ) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """(positional, {flag: [values]}, key=value overrides); a switch (a flag without value) maps to ["1"]."""
    pos, opts, overrides, it = [], {}, [], iter(args)
    for a in it:
        if a in ("-h", "--help"):
            print(usage)
            raise SystemExit(0)
        key, eq, value = a.partition("=")
        if a in switches:
            opts[a] = ["1"]
        elif key in flags:
            value = value if eq else next(it, None)
            if value is None:
                raise ConfigError([f"{key}: needs a value\n{usage}"])
            opts.setdefault(key, []).append(value)
        elif a.startswith("-"):
            raise ConfigError([f"unknown option {a}\n{usage}"])
        elif eq:
            overrides.append(a)
        else:
            pos.append(a)
    return pos, opts, overrides


def _settings(overrides: list[str], base: dict | None) -> dict:
    """Evaluation settings: a stage's (or the defaults) with eval.<key>=<value> overrides, validated."""
    import yaml

    from alignctl import evaluate

    given = {}
    for o in overrides:
        key, _, value = o.partition("=")
        if not key.startswith("eval."):
            raise ConfigError([f"{key}: only eval.<key>=<value> overrides apply here (keys: "
                               f"{', '.join(evaluate.DEFAULTS)})"])
        given[key[5:]] = yaml.safe_load(value)
    base = dict(base or {})
    merged = {**{k: v for k, v in base.items() if k in evaluate.DEFAULTS and k not in ("prompts", "reward")},
              **given}
    settings, problems = evaluate.settings_problems(merged)
    if problems:
        raise ConfigError(problems)
    out = {**base, **{k: settings[k] for k in given}}
    if out.get("seed") is None:
        out["seed"] = 0
    return out


def _data_spec(name: str) -> dict:
    """--prompts: a data set of the default configuration (configs/data) or a data file/folder."""
    from alignctl import data

    if Path(name).expanduser().exists():
        spec, problems = data.normalize({"path": str(Path(name).expanduser().absolute())}, "--prompts")
    else:
        from omegaconf import OmegaConf

        from alignctl.cli import compose

        datasets = OmegaConf.to_container(compose([]).data, resolve=True)
        if name not in datasets:
            raise ConfigError([f"--prompts: '{name}' is neither a data file nor a data set of the default "
                               f"configuration ({', '.join(datasets)})"])
        spec, problems = data.normalize(dict(datasets[name]), f"data.{name}")
    if problems:
        raise ConfigError(problems)
    spec.setdefault("label", "--prompts")
    return spec


def _reward_path(value: str) -> str:
    if not Path(value).expanduser().is_dir():
        raise ConfigError([f"--reward: {value} is not a model folder (a reward stage's final/)"])
    return str(Path(value).expanduser().absolute())


def _quiet() -> None:
    """Library progress bars and warnings off the console (alignctl.console), alignctl's own lines on stderr."""
    import logging

    from alignctl import console

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    console.setup()


def cmd_eval(args: list[str]) -> int:
    pos, opts, overrides = _parse(args, {"--reference", "--reward", "--prompts", "--out"}, EVAL_USAGE,
                                  frozenset({"--trust-remote-code"}))
    _quiet()
    if len(pos) != 1:
        raise ConfigError([f"eval: name one run directory or model folder\n{EVAL_USAGE}"])
    target = Path(pos[0]).expanduser()
    if not target.exists():
        raise ConfigError([f"eval: {target} does not exist"])
    one = {k: v[-1] for k, v in opts.items()}
    if one.get("--out"):  # checked before any model loads, not when the results are written
        from alignctl.config import checks

        bad = checks.writable_problem(Path(one["--out"]).expanduser().absolute(), "--out")
        if bad:
            raise ConfigError([bad])
    if (target / "manifest.json").is_file():
        result, out = eval_run(target, one, overrides)
    elif (target / "config.json").is_file():
        result, out = eval_model(target, one, overrides)
    else:
        raise ConfigError([f"eval: {target} is neither a run directory (manifest.json) nor a model folder "
                           "(config.json)"])
    _print(result, out)
    return 0


def _print(result: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("stage", "prompts", "KL/token before", "KL/token after", "reward before", "reward after",
                  "win rate [95% CI]", "pref acc (norm)")
    f = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
    for name, r in result["stages"].items():
        b, a = r.get("before", {}), r.get("after", {})
        win = (f"{a['eval_win_rate']:.2f} [{a['eval_win_rate_low']:.2f}, {a['eval_win_rate_high']:.2f}]"
               if "eval_win_rate" in a else "")
        table.add_row(name, str(r["eval"].get("prompts", "")), f(b.get("eval_kl")), f(a.get("eval_kl")),
                      f(b.get("eval_reward_mean")), f(a.get("eval_reward_mean")), win,
                      f(a.get("eval_pref_accuracy_norm")))
    Console(width=160, soft_wrap=True).print(table)
    print(f"eval: {out / 'eval.json'}")


def _write(result: dict, out: Path, pes: dict[str, Any]) -> None:
    from alignctl import report
    from alignctl.fsutil import write_json

    out.mkdir(parents=True, exist_ok=True)
    for name, pe in pes.items():
        pe.write(out / f"{name}.samples.jsonl")
        png = out / f"{name}.rewards.png"
        if report.plot_rewards(pe.rows(), png, name):
            result["stages"][name]["plot"] = png.name
    write_json(out / "eval.json", result)


def eval_run(run_dir: Path, opts: dict, overrides: list[str]) -> tuple[dict, Path]:
    """Every completed policy stage of a finished run, as evaluated in the run (spec.json), before vs final/."""
    from alignctl import evaluate, store
    from alignctl.runner import StageContext
    from alignctl.stages import STAGES

    manifest = json.loads((run_dir / "manifest.json").read_text())
    result: dict[str, Any] = {"run_dir": str(run_dir.absolute()), "stages": {}}
    pes = {}
    for st in manifest["stages"]:
        spec_path = run_dir / st["name"] / "spec.json"
        final = run_dir / st["name"] / "final"
        if st.get("status") != "completed" or not spec_path.is_file() or not final.is_dir() or \
                STAGES[st["trainer"]].output != "causal_lm":
            continue
        spec = json.loads(spec_path.read_text())
        base = spec.get("eval") or evaluate.stage_settings({}, spec, [spec], spec["args"].get("seed", 42))
        settings = _settings(overrides, {**base, "enabled": True})
        if opts.get("--reward"):
            settings["reward"], settings["reward_path"] = "--reward", _reward_path(opts["--reward"])
            settings["reward_load"] = {"revision": None, "trust_remote_code": False}  # a folder of its own
        if opts.get("--prompts"):
            settings["prompts_data"] = _data_spec(opts["--prompts"])
        spec = {**spec, "eval": settings}
        if opts.get("--reference"):
            spec["ref_path"] = str(Path(opts["--reference"]).expanduser().absolute())
        spec = checked_spec(spec, final, f"{st['name']}/spec.json", bool(opts.get("--trust-remote-code")))
        try:
            ctx = StageContext(spec)
        except store.DataChanged:  # the held-out rows would not be the ones the run was evaluated on
            raise ConfigError([f"eval: stage {st['name']}: its data ({spec['data'].get('label')}) changed on disk "
                               "since the run trained on it; restore it to evaluate this run"]) from None
        metrics, pe = _eval_stage(ctx, final)
        if pe is not None:
            result["stages"][st["name"]] = {**metrics, "run_after": _overlap(st, metrics)}
            pes[st["name"]] = pe
    if not result["stages"]:
        raise ConfigError([f"eval: {run_dir} has no completed language-model stage with held-out prompts"])
    out = Path(opts.get("--out") or run_dir / "eval")
    _write(result, out, pes)
    return result, out


def checked_spec(spec: dict, final: Path, where: str, trust: bool) -> dict:
    """A stage's spec.json as ``alignctl eval`` uses it, read like any input: the models it loads (initial weights,
    reference, final/, the evaluation's reward model) are checked as ``plan`` checks them, and remote code stays off
    unless ``--trust-remote-code`` is given (``trust``), whatever the file says: a run directory may come from
    elsewhere, and its final/ may ship code."""
    from alignctl.config import checks, links

    problems: list[str] = []
    notes: list[str] = []
    model = dict(spec.get("model") or {})
    ev = dict(spec.get("eval") or {})
    for key, path, rev in (("init_path", spec.get("init_path"), model.get("revision")),
                           ("ref_path", spec.get("ref_path"), model.get("revision")), ("final", str(final), None),
                           ("eval.reward_path", ev.get("reward_path"), (ev.get("reward_load") or {}).get("revision"))):
        gguf = model.get("gguf_file") if path == model.get("name_or_path") else None  # de-quantised at load
        if path:
            problems += links.model_problems(str(path), rev, f"eval: {where}: {key}", True, notes, gguf)
    problems += filter(None, [checks.writable_problem(Path(str(spec.get("cache_dir") or ".")), f"eval: {where}: "
                                                                                              "cache_dir")])
    if problems:
        raise ConfigError(problems)
    if trust:
        return spec
    loads = {**(spec.get(links.LOAD_KEY) or {}), "eval.reward": ev.get("reward_load") or {}}
    if model.get("trust_remote_code") is True or any(v.get("trust_remote_code") for v in loads.values()):
        import logging

        logging.getLogger("alignctl").warning("eval: %s asks for remote code; it stays off (pass --trust-remote-code "
                                              "to run code shipped with its models)", where)
    off = lambda load: {**load, "trust_remote_code": False} if load else load  # noqa: E731
    ev["reward_load"] = off(ev.get("reward_load"))
    return {**spec, "model": {**model, "trust_remote_code": False}, "eval": ev,
            links.LOAD_KEY: {k: off(v) for k, v in (spec.get(links.LOAD_KEY) or {}).items()}}


def _overlap(stage: dict, metrics: dict) -> dict:
    """The run's after-metrics that this evaluation measured again (to compare)."""
    run_after = (stage.get("metrics") or {}).get("after") or {}
    return {k: run_after[k] for k in metrics.get("after", {}) if k in run_after}


def _eval_stage(ctx, final: Path):
    """before = the stage's initial weights, after = its final/ (reference and reward as in the run)."""
    from alignctl import evaluate, models
    from alignctl.runner import _release_memory

    pe = ctx.policy_eval()
    if pe is None:
        return {}, None
    load = lambda path: models.load_causal_lm(models.materialize(path, ctx.spec["cache_dir"], ctx.model_spec),  # noqa
                                              ctx.model_spec, ctx.precision, ctx.tokenizer)
    initial = load(ctx.spec["init_path"])
    pe.before(initial)
    del initial
    _release_memory()
    model = load(str(final))
    generated = ctx.finish_policy_eval(pe, model, samples_to=None)  # the store entry is never written to
    after = generated["after"]
    if ctx.kind.data_kind == "preference" and ctx.eval is not None:  # as in the run: the stage's batch and length
        from alignctl.config import trl_fields

        defaults = {k: f.get("default") for k, f in trl_fields.fields(ctx.kind.config_class).items()}
        after.update(evaluate.preference_accuracy(model, ctx.tokenizer, ctx.eval,
                                                  **evaluate.pref_settings({**defaults, **ctx.spec["args"]})))
    return generated, pe


def eval_model(path: Path, opts: dict, overrides: list[str]) -> tuple[dict, Path]:
    """A model folder against --reference (its answers are "before"), on --prompts, scored by --reward."""
    from alignctl import data, evaluate, models
    from alignctl.runner import _release_memory

    if not opts.get("--prompts"):
        raise ConfigError(["eval: a model folder needs --prompts (a data set name such as prompts, or a data file)"])
    settings = _settings(overrides, {k: v for k, v in evaluate.DEFAULTS.items() if k not in ("prompts", "reward")})
    dspec = _data_spec(opts["--prompts"])
    train, held = data.load(dspec, "prompt", "--prompts")
    prompts = evaluate.held_out_prompts(held if held is not None else train, settings["max_prompts"])
    # remote code of the model and its reference only with --trust-remote-code; the reward model never runs any
    model_spec = {"name_or_path": str(path), "trust_remote_code": bool(opts.get("--trust-remote-code"))}
    precision = models.precision_for("auto")
    ref_path = opts.get("--reference")
    _folders_checked([("eval", path), ("--reference", ref_path), ("--reward", opts.get("--reward"))])
    tok = models.load_tokenizer(str(path), model_spec)
    pe = evaluate.PolicyEval(settings, tok, prompts, 8, ref_is_initial=True)
    if ref_path:
        ref = models.load_causal_lm(str(Path(ref_path).expanduser()), model_spec, precision, tok)
        pe.before(ref)
        del ref
        _release_memory()
    model = models.load_causal_lm(str(path), model_spec, precision, tok)

    import contextlib

    @contextlib.contextmanager
    def reference():
        ref = models.load_causal_lm(str(Path(ref_path).expanduser()), model_spec, precision, tok)
        try:
            yield ref
        finally:
            del ref

    @contextlib.contextmanager
    def reward():
        rpath = _reward_path(opts["--reward"])
        rtok = models.load_tokenizer(rpath, {})
        yield models.load_sequence_classifier(rpath, {}, precision, rtok), rtok

    pe.after(model, reference if ref_path else None, reward if opts.get("--reward") else None)
    before, after = pe.metrics()
    name = path.name if path.name != "final" else path.parent.name  # <run dir>/<stage>/final -> <stage>
    result = {"model": str(path.absolute()), "reference": ref_path, "stages": {name: {
        "before": before, "after": after, "eval": pe.info()}}}
    out = Path(opts.get("--out") or f"eval-{name}")
    _write(result, out, {name: pe})
    return result, out


def _folders_checked(folders: list[tuple[str, Any]]) -> None:
    """Model folders given on the command line hold what alignctl loads (config.json, tokenizer, safetensors)."""
    from alignctl.config import checks

    problems = [p for where, f in folders if f for p in checks.local_model_problems(Path(f).expanduser(), where)]
    if problems:
        raise ConfigError(problems)


def cmd_generate(args: list[str]) -> int:
    from alignctl import evaluate, models

    pos, opts, overrides = _parse(args, {"--prompt", "--prompts-file", "--max-new-tokens", "--temperature", "--seed"},
                                  GENERATE_USAGE)
    _quiet()
    if len(pos) != 1 or overrides or not (opts.get("--prompt") or opts.get("--prompts-file")):
        raise ConfigError([f"generate: name one run directory or model folder and --prompt or --prompts-file\n"
                           f"{GENERATE_USAGE}"])
    target = Path(pos[0]).expanduser()
    if (target / "manifest.json").is_file():
        target = Path(json.loads((target / "manifest.json").read_text())["final_model"])
    if not (target / "config.json").is_file():
        raise ConfigError([f"generate: {pos[0]} is neither a run directory with a final model nor a model folder"])
    prompts = list(opts.get("--prompt", []))
    for f in opts.get("--prompts-file", []):
        try:
            prompts += [line.strip() for line in Path(f).read_text().splitlines() if line.strip()]
        except OSError as e:
            raise ConfigError([f"--prompts-file: cannot read {f}: {e.strerror}"]) from None
    values, problems = {}, []
    for flag, cast, default, ok, what in (
            ("--max-new-tokens", int, "64", lambda v: 1 <= v <= 32768, "a whole number from 1 to 32768"),
            ("--temperature", float, "0", lambda v: 0 <= v <= 100, "a number from 0 (greedy) to 100"),
            ("--seed", int, "0", lambda v: 0 <= v < 2**32, "a whole number in [0, 2**32)")):
        raw = opts.get(flag, [default])[-1]
        try:
            values[flag] = cast(raw)
            if not ok(values[flag]):
                raise ValueError
        except ValueError:
            problems.append(f"{flag}: must be {what}, got {raw!r}")
    if problems:
        raise ConfigError(problems)
    max_new, temperature, seed = values["--max-new-tokens"], values["--temperature"], values["--seed"]
    model_spec = {"name_or_path": str(target)}
    tok = models.load_tokenizer(str(target), model_spec)
    model = models.load_causal_lm(str(target), model_spec, models.precision_for("auto"), tok)
    conversational = bool(tok.chat_template)
    turns = [[{"role": "user", "content": p}] if conversational else p for p in prompts]
    ids = [evaluate.encode_prompt(tok, t) for t in turns]
    answers = evaluate.generate(model, tok, ids, max_new_tokens=max_new, temperature=temperature, seed=seed,
                                batch_size=8)
    for p, a in zip(prompts, answers):
        text = tok.decode(a, skip_special_tokens=True).strip()
        print(f"> {p}\n{text}\n" if len(prompts) > 1 else text)
    sys.stdout.flush()
    return 0
