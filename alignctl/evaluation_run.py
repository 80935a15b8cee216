"""The work of ``alignctl eval`` (alignctl.cli.eval parses its command line): repeat a finished run's held-out
evaluation, or evaluate any model folder against a reference. Run time: loads models (torch).

:func:`eval_run` repeats every policy stage's evaluation from its ``spec.json`` (same prompts, seed, batch size and
settings as in the run, unless overridden): the stage's initial weights give the "before" answers, its ``final/`` the
"after" answers, so the after-metrics reproduce the run's. :func:`eval_model` evaluates a model folder against
``--reference`` (its answers are "before"). A run directory's ``spec.json`` is read like any input
(:func:`checked_spec`): the models it names are checked as ``plan`` checks them, and no remote code runs unless
``--trust-remote-code`` is given on the command line.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from alignctl import data, evaluate, models, report
from alignctl.config import checks, links, trl_fields
from alignctl.config.compose import compose
from alignctl.config.data_checks import normalize, to_spec
from alignctl.config.eval_settings import DEFAULTS, settings_problems, stage_settings
from alignctl.config.types import DataSpec, EvalSettings, LinkSpec, ModelSpec, StageSpec
from alignctl.errors import ConfigError, DataChanged
from alignctl.fsutil import write_json
from alignctl.policy_eval import PolicyEval
from alignctl.stages import STAGES
from alignctl.train.context import StageContext, release_memory


def _settings(overrides: list[str], base: EvalSettings) -> EvalSettings:
    """Evaluation settings: a stage's (or the defaults) with eval.<key>=<value> overrides, validated."""
    given = {}
    for o in overrides:
        key, _, value = o.partition("=")
        if not key.startswith("eval."):
            raise ConfigError([f"{key}: only eval.<key>=<value> overrides apply here (keys: "
                               f"{', '.join(DEFAULTS)})"])
        given[key[5:]] = yaml.safe_load(value)
    merged = {**{k: getattr(base, k) for k in DEFAULTS if k not in ("prompts", "reward")}, **given}
    settings, problems = settings_problems(merged)
    if problems:
        raise ConfigError(problems)
    out = base.replace(**{k: settings[k] for k in given})
    return out if out.seed is not None else out.replace(seed=0)


def _data_spec(name: str) -> DataSpec:
    """--prompts: a data set of the default configuration (configs/data; its held-out split) or a data file/folder
    (all of its training split: a file named to evaluate on is the evaluation's prompts, nothing carved from it)."""
    if Path(name).expanduser().exists():
        spec, problems = normalize({"path": str(Path(name).expanduser().absolute()), "eval_size": 0}, "--prompts")
    else:
        datasets = OmegaConf.to_container(compose([]).data, resolve=True)
        if name not in datasets:
            raise ConfigError([f"--prompts: '{name}' is neither a data file nor a data set of the default "
                               f"configuration ({', '.join(datasets)})"])
        spec, problems = normalize(dict(datasets[name]), f"data.{name}")
    if problems:
        raise ConfigError(problems)
    return to_spec({"label": "--prompts", **spec})


def _reward_path(value: str) -> str:
    if not Path(value).expanduser().is_dir():
        raise ConfigError([f"--reward: {value} is not a model folder (a reward stage's final/)"])
    return str(Path(value).expanduser().absolute())


def _write(result: dict, out: Path, pes: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, pe in pes.items():
        pe.write(out / f"{name}.samples.jsonl")
        png = out / f"{name}.rewards.png"
        if report.plot_rewards(pe.rows(), png, name):
            result["stages"][name]["plot"] = png.name
    write_json(out / "eval.json", result)


def eval_run(run_dir: Path, opts: dict, overrides: list[str]) -> tuple[dict, Path]:
    """Every completed policy stage of a finished run, as evaluated in the run (spec.json), before vs final/."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    result: dict[str, Any] = {"run_dir": str(run_dir.absolute()), "stages": {}}
    pes = {}
    for st in manifest["stages"]:
        spec_path = run_dir / st["name"] / "spec.json"
        final = run_dir / st["name"] / "final"
        if st.get("status") != "completed" or not spec_path.is_file() or not final.is_dir() or \
                STAGES[st["trainer"]].output != "causal_lm":
            continue
        spec = _stage_spec(StageSpec.from_json(spec_path.read_text()), opts, overrides)
        spec = checked_spec(spec, final, f"{st['name']}/spec.json", bool(opts.get("--trust-remote-code")))
        try:
            ctx = StageContext(spec)
        except DataChanged:  # the held-out rows would not be the ones the run was evaluated on
            raise ConfigError([f"eval: stage {st['name']}: its data ({spec.data.label}) changed on disk "
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


def _stage_spec(spec: StageSpec, opts: dict, overrides: list[str]) -> StageSpec:
    """A stage's spec.json with the evaluation the command line asks for: its settings (eval.<key>=... overrides),
    --reward, --prompts and --reference in place of the run's."""
    base = spec.eval or stage_settings(EvalSettings(), spec, [spec], spec.args.get("seed", 42))
    settings = _settings(overrides, base.replace(enabled=True))
    if opts.get("--reward"):  # a folder of its own
        settings = settings.replace(reward="--reward", reward_path=_reward_path(opts["--reward"]),
                                    reward_load={"revision": None, "trust_remote_code": False})
    if opts.get("--prompts"):
        settings = settings.replace(prompts_data=_data_spec(opts["--prompts"]))
    spec = spec.replace(eval=settings)
    if opts.get("--reference"):
        ref = LinkSpec("ref", str(Path(opts["--reference"]).expanduser().absolute()))
        spec = spec.replace(links={**spec.links, "ref": ref})
    return spec


def checked_spec(spec: StageSpec, final: Path, where: str, trust: bool) -> StageSpec:
    """A stage's spec.json as ``alignctl eval`` uses it, read like any input: the models it loads (initial weights,
    reference, final/, the evaluation's reward model) are checked as ``plan`` checks them, and remote code stays off
    unless ``--trust-remote-code`` is given (``trust``), whatever the file says: a run directory may come from
    elsewhere, and its final/ may ship code."""
    problems: list[str] = []
    notes: list[str] = []
    model, ev = spec.model, spec.eval or EvalSettings()
    init, ref = spec.link("from"), spec.link("ref")
    for key, path, rev in (("init_path", init.path if init else None, model.revision),
                           ("ref_path", ref.path if ref else None, model.revision), ("final", str(final), None),
                           ("eval.reward_path", ev.reward_path, (ev.reward_load or {}).get("revision"))):
        gguf = model.gguf_file if path == model.name_or_path else None  # de-quantised at load
        if path:
            problems += links.model_problems(str(path), rev, f"eval: {where}: {key}", True, notes, gguf)
    problems += filter(None, [checks.writable_problem(Path(str(spec.cache_dir or ".")), f"eval: {where}: cache_dir")])
    if problems:
        raise ConfigError(problems)
    if trust:
        return spec
    loads = [links.load_settings(spec, name) or {} for name in spec.links] + [ev.reward_load or {}]
    if model.trust_remote_code is True or any(load.get("trust_remote_code") for load in loads):
        logging.getLogger("alignctl").warning("eval: %s asks for remote code; it stays off (pass --trust-remote-code "
                                              "to run code shipped with its models)", where)
    off = lambda load: {**load, "trust_remote_code": False} if load else load  # noqa: E731
    return spec.replace(model=model.replace(trust_remote_code=False), eval=ev.replace(reward_load=off(ev.reward_load)),
                        links={k: ln.replace(trust_remote_code=False) for k, ln in spec.links.items()})


def _overlap(stage: dict, metrics: dict) -> dict:
    """The run's after-metrics that this evaluation measured again (to compare)."""
    run_after = (stage.get("metrics") or {}).get("after") or {}
    return {k: run_after[k] for k in metrics.get("after", {}) if k in run_after}


def _eval_stage(ctx, final: Path):
    """before = the stage's initial weights, after = its final/ (reference and reward as in the run)."""
    pe = ctx.policy_eval()
    if pe is None:
        return {}, None
    load = lambda path: models.load_causal_lm(models.materialize(path, ctx.spec.cache_dir, ctx.model_spec),  # noqa
                                              ctx.model_spec, ctx.precision, ctx.tokenizer)
    initial = load(ctx.spec.source.path)
    pe.before(initial)
    del initial
    release_memory()
    model = load(str(final))
    generated = ctx.finish_policy_eval(pe, model, samples_to=None)  # the store entry is never written to
    after = generated["after"]
    if ctx.kind.data_kind == "preference" and ctx.eval is not None:  # as in the run: the stage's batch and length
        defaults = {k: f.get("default") for k, f in trl_fields.fields(ctx.kind.config_class).items()}
        after.update(evaluate.preference_accuracy(model, ctx.tokenizer, ctx.eval,
                                                  **evaluate.pref_settings({**defaults, **ctx.spec.args})))
    return generated, pe


def eval_model(path: Path, opts: dict, overrides: list[str]) -> tuple[dict, Path]:
    """A model folder against --reference (its answers are "before"), on --prompts, scored by --reward."""
    if not opts.get("--prompts"):
        raise ConfigError(["eval: a model folder needs --prompts (a data set name such as prompts, or a data file)"])
    settings = _settings(overrides, EvalSettings(**DEFAULTS))
    dspec = _data_spec(opts["--prompts"])
    train, held = data.load(dspec, "prompt", "--prompts")
    prompts = evaluate.held_out_prompts(held if held is not None else train, settings.max_prompts)
    # remote code of the model and its reference only with --trust-remote-code; the reward model never runs any
    model_spec = ModelSpec(str(path), trust_remote_code=bool(opts.get("--trust-remote-code")))
    precision = models.precision_for("auto")
    ref_path = opts.get("--reference")
    _folders_checked([("eval", path), ("--reference", ref_path), ("--reward", opts.get("--reward"))])
    tok = models.load_tokenizer(str(path), model_spec)
    pe = PolicyEval(settings, tok, prompts, 8, ref_is_initial=True)
    if ref_path:
        ref = models.load_causal_lm(str(Path(ref_path).expanduser()), model_spec, precision, tok)
        pe.before(ref)
        del ref
        release_memory()
    model = models.load_causal_lm(str(path), model_spec, precision, tok)
    reference = _loaded_reference(ref_path, model_spec, precision, tok) if ref_path else None
    reward = _loaded_reward(opts["--reward"], precision) if opts.get("--reward") else None
    pe.after(model, reference, reward)
    before, after = pe.metrics()
    name = path.name if path.name != "final" else path.parent.name  # <run dir>/<stage>/final -> <stage>
    result = {"model": str(path.absolute()), "reference": ref_path, "stages": {name: {
        "before": before, "after": after, "eval": pe.info()}}}
    out = Path(opts.get("--out") or f"eval-{name}")
    _write(result, out, {name: pe})
    return result, out


def _loaded_reference(ref_path: str, model_spec: ModelSpec, precision, tok):
    """The reference model while PolicyEval.after needs it (loaded again: "before" released it)."""
    @contextlib.contextmanager
    def reference():
        ref = models.load_causal_lm(str(Path(ref_path).expanduser()), model_spec, precision, tok)
        try:
            yield ref
        finally:
            del ref

    return reference


def _loaded_reward(given: str, precision):
    """The --reward model and its tokenizer while PolicyEval.after scores the answers (never remote code)."""
    @contextlib.contextmanager
    def reward():
        rpath = _reward_path(given)
        own = ModelSpec(rpath)  # its own tokenizer and settings, never remote code
        rtok = models.load_tokenizer(rpath, own)
        yield models.load_sequence_classifier(rpath, own, precision, rtok), rtok

    return reward


def _folders_checked(folders: list[tuple[str, Any]]) -> None:
    """Model folders given on the command line hold what alignctl loads (config.json, tokenizer, safetensors)."""
    problems = [p for where, f in folders if f for p in checks.local_model_problems(Path(f).expanduser(), where)]
    if problems:
        raise ConfigError(problems)
