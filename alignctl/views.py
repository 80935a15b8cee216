"""What the terminal shows: the stage graph of ``plan`` (:func:`show`) and the table at the end of a run
(:func:`summary`). Which metric a stage is judged by is alignctl.metrics' decision, not this module's."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from alignctl.config import launcher as launch
from alignctl.config import links, trl_fields
from alignctl.config.links import LINKS
from alignctl.config.peft import describe_peft
from alignctl.config.redact import redact_text
from alignctl.config.types import DataSpec, EvalSettings, RunSpec, StageSpec
from alignctl.metrics import fmt, headline, win_text
from alignctl.stages import STAGES, StageKind


def _data_label(d: DataSpec) -> str:
    src = d.path if not d.local else Path(d.path).name
    if d.name:
        src += f" ({d.name})"
    held = d.eval_split or (f"{d.eval_size} carved (seed {d.seed})" if d.eval_size else "none")
    return escape(f"{d.label}: {src} [{d.split}], held-out: {held}")


def source(key: str, overrides) -> str:
    """Where a setting came from, simply: "command line" when an override sets the key (or a key inside it)."""
    for a in overrides or ():
        k = str(a).split("=", 1)[0].lstrip("+~")
        if k == key or k.startswith(key + "."):
            return "command line"
    return "config"


def _folder_rows(spec: RunSpec, overrides) -> list[tuple[str, str]]:
    """The output root and the store (whose completed entries are reused as trained), and where each came from."""
    root = spec.output_root
    store = source("store", overrides)
    if store == "config" and spec.store_dir == str(Path(root) / ".store"):
        store = "default: <output_root>/.store"
    return [("output_root", f"{root} ({source('output_root', overrides)})"), ("store", f"{spec.store_dir} ({store})")]


def _launch_setting_rows(spec: RunSpec, overrides) -> list[tuple[str, str]]:
    """What the launcher puts before and after its command and into the ranks' environment, and where it came from.
    Environment values are never shown (names only); secrets in command words are redacted."""
    rows = []
    launcher = spec.launcher or {}
    for key in ("prefix", "extra_args"):
        if launcher.get(key):
            words = " ".join(redact_text(str(w)) for w in launcher[key])
            rows.append((key, f"{words} ({source('launcher.' + key, overrides)})"))
    if launcher.get("env"):
        rows.append(("env", f"{', '.join(sorted(launcher['env']))} (names; values not shown) "
                            f"({source('launcher.env', overrides)})"))
    return rows


def show(spec: RunSpec, console: Console | None = None, overrides=None) -> None:
    """Print the stage graph: each stage's trainer, links, data, output and explicit settings. ``overrides``: the
    command line, to say where the folders and launch settings came from."""
    console = console or Console(highlight=False, soft_wrap=True)  # a line is never wrapped mid-field
    e = _esc
    console.print(f"[bold]recipe[/bold] {e(spec.recipe)}: {e(spec.description)}")
    console.print(f"[bold]model[/bold] {e(spec.model.name_or_path)}   [bold]precision[/bold] {e(spec.precision)}")
    console.print(f"[bold]run dir[/bold] {e(spec.run_dir)}")
    for label, value in _folder_rows(spec, overrides):
        console.print(f"[bold]{label}[/bold] {e(value)}")
    console.print(f"[bold]launcher[/bold] {e(launch.describe(spec.launcher or {'kind': 'local'}))}")
    for label, value in _launch_setting_rows(spec, overrides):
        console.print(f"    {label:<10} {e(value)}")
    for note in spec.notes:
        console.print(f"[yellow]note[/yellow] {e(note)}")
    for i, s in enumerate(spec.stages, 1):
        kind = STAGES[s.kind]
        console.print(f"\n[bold cyan]\\[{i}] {e(s.name)}[/bold cyan]  trainer: {s.kind} ({e(kind.summary)})")
        for label, value in _stage_rows(spec, s, kind):
            console.print(f"    {label:<10} {value if label == 'data' else e(value)}")


def _linked_stage(s: StageSpec, name: str) -> str | None:
    """The recipe stage a link names (None: the base model, an external model, or no such link)."""
    link = s.link(name)
    return link.stage if link is not None else None


def _stage_rows(spec: RunSpec, s: StageSpec, kind: StageKind) -> list[tuple[str, str]]:
    """One stage of the plan: (label, value) rows; the data row is rich markup already, the others plain text."""
    start = "policy" if kind.output in ("causal_lm", "data") else "init"
    rows = [(start, f"← {_linked_stage(s, 'from') or 'base model ' + str(spec.model.name_or_path)}")]
    for link in LINKS:  # ref, reward, value, judge (alignctl.config.links); `from` is the row above
        if link.name == "from":
            continue
        target = links.shown(s, link) if link.external else _linked_stage(s, link.name)
        if link.name in kind.links and (target or not link.external):
            rows.append((link.label, f"← {target or 'base model'}"))
    if s.options.get("reward_funcs"):
        rows.append(("reward fns", ", ".join(f if isinstance(f, str) else next(iter(f))
                                             for f in s.options["reward_funcs"])))
    rows += [("data", _data_label(s.data)), ("output", f"<run dir>/{s.name}/final")]
    rows += _eval_rows(spec, s, kind)
    principles = s.options.get("constitution") or s.options.get("principles")  # a judge's, or a critic's
    if principles:
        rows.append(("principles", "; ".join(principles)))
    if kind.output == "data":  # a generate stage trains nothing: no peft, no batch (alignctl.stages.generate)
        rows.append(("processes", "rank 0 samples and scores every prompt"))
    else:
        rows += _peft_rows(s, kind)
        rows += _launch_rows(s, kind)
    settings = [f"{k}={s.args[k]}" for k in kind.key_fields if k in s.args]
    settings += [f"{k}={v}" for k, v in s.args.items() if k not in kind.key_fields and k != "report_to"]
    rows.append(("settings", " ".join(settings) or "TRL defaults"))
    return rows


def _stage_eval(spec: RunSpec, s: StageSpec) -> EvalSettings:
    """The stage's held-out evaluation settings (alignctl.config.eval_settings, resolved with the stage)."""
    return s.eval if s.eval is not None else spec.eval


def _eval_rows(spec: RunSpec, s: StageSpec, kind: StageKind) -> list[tuple[str, str]]:
    """The stage's held-out evaluation (alignctl.evaluate): its cost bound and reward source."""
    if kind.output != "causal_lm":
        return []
    ev = _stage_eval(spec, s)
    if not ev.enabled:
        return [("eval", "off (eval.enabled=false)")]
    if s.distributed in ("deepspeed-zero3", "fsdp"):
        return [("eval", f"skipped under {s.distributed} (sharded weights): `alignctl eval <run dir>` evaluates "
                         "the finished run on one process")]
    shared = f", shared by {s.world_size} processes" if s.world_size > 1 else ""
    prompts = (ev.prompts_data.label if ev.prompts_data is not None else None) or "held-out split"
    return [("eval", f"≤ {ev.max_prompts} prompts ({prompts}) × ≤ {ev.max_new_tokens} new tokens, "
                     f"temperature {ev.temperature}, seed {ev.seed}; KL to the reference; "
                     + (f"reward model {ev.reward} (win rate)" if ev.reward else "no reward model") + shared)]


def _peft_rows(s: StageSpec, kind: StageKind) -> list[tuple[str, str]]:
    """The stage's peft mode; with an adapter, where it is kept and how the reference is obtained."""
    peft = s.peft or {"method": "none"}
    rows = [("peft", describe_peft(peft))]
    if peft.get("method", "none") != "none":
        rows.append(("adapter", f"<run dir>/{s.name}/adapter (final/ is it merged into the base weights)"))
        if "ref" in kind.links and _linked_stage(s, "ref") == _linked_stage(s, "from"):
            rows.append(("", "reference = the policy with its adapter disabled (no second copy)"))
    return rows


def _launch_rows(s: StageSpec, kind: StageKind) -> list[tuple[str, str]]:
    """World size, engine and global batch = per-device batch × gradient accumulation × world size."""
    total, per_device, gas, ws = launch.global_batch(s, trl_fields.fields(kind.config_class))
    engine = launch.ENGINE_NAMES.get(s.distributed, s.distributed)
    return [("world size", f"{ws} ({engine})"),
            ("batch", f"global {total} = {per_device} per device × {gas} accumulation × {ws} world size")]


def _esc(v) -> str:
    """Text from the user (names, descriptions, values) shown literally: `[/INST]` is not rich markup."""
    return escape(str(v))


def summary(manifest: dict, console: Console | None = None) -> None:
    """The table at the end of a run: each stage's status, time, train loss and headline metric before -> after."""
    console = console or Console(width=max(Console().width, 140), soft_wrap=True)
    table = Table("stage", "trainer", "status", "seconds", "train loss", "held-out metric", "before", "after",
                  "KL/token", "win rate [95% CI], length-controlled",
                  title=_esc(f"{manifest['recipe']}: {manifest['status']}"))
    for s in manifest["stages"]:
        m = s.get("metrics") or {}
        head, after = headline(s), m.get("after") or {}
        win = win_text(after)
        table.add_row(_esc(s["name"]), s["trainer"], s["status"], fmt(s.get("seconds", "")),
                      fmt(m.get("train", {}).get("train_loss", "")), head,
                      fmt(m.get("before", {}).get(head, "")), fmt(after.get(head, "")),
                      fmt(after.get("eval_kl", "")), win)
    console.print(table)
    console.print(_esc(f"final model: {manifest['final_model']}\n"
                       f"manifest: {Path(manifest['run_dir']) / 'manifest.json'}"))
