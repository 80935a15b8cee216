"""Reports: each run's ``report.md`` with training-curve plots, and ``alignctl report <sweep dir>``.

A sweep report reads every job's ``manifest.json`` under a multirun directory, finds
the overrides that differ between jobs (the swept parameters), and writes a table
of swept values against each stage's held-out metrics plus a plot of the last
stage's headline metric against the first swept parameter. A job whose manifest
still says "running" but whose run-directory lock has no live holder is shown as
"died" (killed before it could record anything).
"""

from __future__ import annotations

import json
from pathlib import Path

from alignctl.metrics import (
    fmt,  # the one number format of tables and reports
    headline,
)

# Besides each stage's headline, the sweep table shows these metrics after training (when measured).
SWEEP_EXTRA = ("eval_win_rate", "eval_win_rate_lc", "eval_kl", "eval_reward_mean", "eval_pref_accuracy_norm")
# Training curves worth plotting, in order, when a stage logged them (TRL's names).
CURVES = ("loss", "rewards/margins", "rewards/accuracies", "objective/scores", "objective/kl", "objective/kl_coef",
          "objective/rlhf_reward", "monitor/reward_std", "monitor/length", "monitor/length_corr", "monitor/truncated",
          "reward", "reward_std", "completions/mean_length", "kl", "eval_loss", "eval_rewards/accuracies",
          "eval_accuracy")


AUDIT = "audit/scores"  # plotted with objective/scores


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], out: Path, title: str) -> bool:
    keys = [k for k in CURVES if sum(isinstance(h.get(k), (int, float)) for h in history) >= 2]
    if not keys:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        shown = [key, *([AUDIT] if key == "objective/scores" and any(AUDIT in h for h in history) else [])]
        for k in shown:  # PPO's proxy reward and its audit reward on one panel: over-optimisation shows as a gap
            pts = [(h.get("step", i), h[k]) for i, h in enumerate(history) if isinstance(h.get(k), (int, float))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None, label=k)
        if len(shown) > 1:
            ax.legend(fontsize=7)
        ax.set_title(" vs ".join(shown), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return True


def read_samples(path: Path) -> list[dict]:
    """Rows of a samples.jsonl written by alignctl.evaluate (one per prompt: prompt, before, after, scores, kl)."""
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []
    return [r for r in rows if isinstance(r, dict) and "after" in r]


def plot_rewards(rows: list[dict], out: Path, title: str) -> bool:
    """Histogram of the reward model's scores of the held-out answers, before vs after (and the reference's)."""
    phases = [p for p in ("before", "after", "reference") if sum(p in (r.get("scores") or {}) for r in rows) >= 2]
    if "after" not in phases:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    values = {p: [r["scores"][p] for r in rows if p in (r.get("scores") or {})] for p in phases}
    lo, hi = min(min(v) for v in values.values()), max(max(v) for v in values.values())
    bins = [lo + (hi - lo) * i / 20 for i in range(21)] if hi > lo else 10
    for p in phases:
        ax.hist(values[p], bins=bins, alpha=0.55, label=f"{p} (mean {sum(values[p]) / len(values[p]):.3g})")
    ax.set_xlabel("reward-model score", fontsize=8)
    ax.set_ylabel("answers", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title(f"{title}: held-out answers", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return True


def cell(text) -> str:
    """Text in one markdown table cell: one line, pipes escaped, at most 160 characters."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= 160 else text[:157] + "..."


def _evaluation_section(run_dir: Path, s: dict) -> list[str]:
    """A stage's held-out evaluation: KL, reward, win rate, preference accuracies, histogram, three answers."""
    m = s.get("metrics") or {}
    before, after, info = m.get("before") or {}, m.get("after") or {}, m.get("eval") or {}
    if "eval_kl" not in after and "eval_pref_accuracy" not in after:
        return []
    lines = [f"### {s['name']} ({s['trainer']})", ""]
    if info.get("prompts"):
        lines += [f"{info['prompts']} held-out prompts, one answer each (at most {info.get('max_new_tokens')} new "
                  f"tokens, temperature {info.get('temperature')}, seed {info.get('seed')}); reward model: "
                  f"{info.get('reward') or 'none'}.", ""]
    elif info.get("skipped"):
        lines += [f"Held-out answers not evaluated: {info['skipped']}.", ""]
    lines += ["| metric | before | after |", "| --- | --- | --- |"]
    for key, label in (("eval_kl", "KL to reference per token"), ("eval_kl_seq", "KL to reference per answer"),
                       ("eval_reward_mean", "reward (mean)"), ("eval_reward_std", "reward (std)"),
                       ("eval_completion_tokens", "answer length (tokens)"),
                       ("eval_pref_accuracy", "preference accuracy (summed log-prob)"),
                       ("eval_pref_accuracy_norm", "preference accuracy (per-token log-prob)"),
                       ("eval_rewards/accuracies", "TRL implicit-reward accuracy")):
        if key in after:
            lines.append(f"| {label} | {fmt(before.get(key))} | {fmt(after.get(key))} |")
    if "eval_win_rate" in after:
        lines.append(f"| win rate after vs before [95% Wilson CI, ties half] | | {after['eval_win_rate']:.3f} "
                     f"[{after['eval_win_rate_low']:.3f}, {after['eval_win_rate_high']:.3f}] |")
    if "eval_win_rate_lc" in after:
        lines.append(f"| length-controlled win rate after vs before [95% bootstrap CI] (length coefficient "
                     f"{after.get('eval_win_rate_length_coef', float('nan')):.2f}) | | {after['eval_win_rate_lc']:.3f} "
                     f"[{after['eval_win_rate_lc_low']:.3f}, {after['eval_win_rate_lc_high']:.3f}] |")
    if "eval_win_rate_ref" in after:
        lines.append(f"| win rate after vs reference | | {after['eval_win_rate_ref']:.3f} |")
    lines.append("")
    rows = read_samples(run_dir / s["name"] / "samples.jsonl")
    if rows and plot_rewards(rows, run_dir / s["name"] / "rewards.png", s["name"]):
        lines += [f"![{s['name']} rewards]({s['name']}/rewards.png)", ""]
    if rows:
        scored = any(r.get("scores") for r in rows)
        lines += ["| prompt | before | after |" + (" score before → after |" if scored else ""),
                  "| --- | --- | --- |" + (" --- |" if scored else "")]
        for r in rows[:3]:
            sc = r.get("scores") or {}
            extra = f" {fmt(sc.get('before'))} → {fmt(sc.get('after'))} |" if scored else ""
            lines.append(f"| {cell(r['prompt'])} | {cell(r.get('before', ''))} | {cell(r['after'])} |{extra}")
        lines.append("")
    return lines


def _monitor_section(s: dict) -> list[str]:
    """A stage's reward-hacking monitors (alignctl.train.monitors): each signal first and last, its threshold,
    when it fired; a stop."""
    from alignctl.train.monitors import MONITORS

    mon = (s.get("metrics") or {}).get("monitors")
    if not mon:
        return []
    series, thr = mon.get("series") or {}, mon.get("thresholds") or {}
    fired: dict[str, list[int]] = {}
    for e in mon.get("events") or []:
        fired.setdefault(e["monitor"], []).append(e["step"])
    lines = [f"### {s['name']} ({s['trainer']})", "",
             "| monitor | signal | first | last | threshold | fired at update |", "|" + " --- |" * 6]
    for name, (signal, rule, _, _) in MONITORS.items():
        pts = series.get(signal) or []
        if not pts:
            continue
        t = thr.get(name)
        limit = "off" if t is None else f"< best − {t:g}" if rule == "below_best" else \
            f"{'<' if rule.startswith('below') else '>'} {t:g}" + (" × first" if rule.endswith("_first") else "")
        stop = " (stops)" if name in thr.get("stop_when", []) else ""
        lines.append(f"| {name}{stop} | {signal} | {fmt(pts[0][1])} | {fmt(pts[-1][1])} | {limit} | "
                     f"{', '.join(map(str, fired.get(name, []))) or '—'} |")
    if mon.get("stopped"):
        lines += ["", f"Stopped at update {mon['stopped']['step']} by `{mon['stopped']['monitor']}`."]
    return [*lines, ""]


def _kind_sections(manifest: dict, run_dir: Path) -> list[str]:
    """The sections stage kinds add to the report (their ``report_section``), one per kind, under its heading."""
    from alignctl.stages import STAGES

    lines = []
    for kind in STAGES.values():
        if kind.report_section is None:
            continue
        body = [line for s in manifest["stages"] if s["trainer"] == kind.name
                for line in kind.report_section(s, run_dir, manifest["stages"])]
        if body:
            lines += [f"## {kind.report_heading}", "", *body]
    return lines


def write_run_report(manifest: dict) -> Path:
    run_dir = Path(manifest["run_dir"])
    lines = [f"# {manifest['recipe']} — {manifest['status']}", "",
             "| stage | trainer | status | reused | held-out metric | before | after | train loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    plots = []
    for s in manifest["stages"]:
        m = s.get("metrics") or {}
        head = headline(s)
        # measured on resumed weights (alignctl.train.lifecycle.before_resumed)
        mark = " (resumed)" if m.get("before_resumed") else ""
        lines.append(f"| {s['name']} | {s['trainer']} | {s['status']} | {'yes' if s.get('reused_from') else 'no'} | "
                     f"{head} | {fmt(m.get('before', {}).get(head))}{mark} | {fmt(m.get('after', {}).get(head))} | "
                     f"{fmt(m.get('train', {}).get('train_loss'))} |")
        hist = run_dir / s["name"] / "log_history.json"
        if hist.is_file() and plot_curves(json.loads(hist.read_text()), run_dir / s["name"] / "curves.png",
                                          f"{s['name']} ({s['trainer']})"):
            plots.append(f"![{s['name']}]({s['name']}/curves.png)")
    notes = [f"- {s['name']}: \"before\" was measured on the weights resumed from a checkpoint (ZeRO-3/FSDP "
             "evaluate inside training), not on the stage's initial weights" for s in manifest["stages"]
             if (s.get("metrics") or {}).get("before_resumed")]
    notes += [f"- {s['name']}: trained again: its store entry {s['retrained']}" for s in manifest["stages"]
              if s.get("retrained")]
    final = f"`{manifest['final_model']}`" if manifest["status"] == "completed" else "none (the run did not complete)"
    lines += ["", *_outcome(manifest), *notes, *([""] if notes else []), f"Final model: {final}", ""]
    st = manifest.get("store") or {}
    if st.get("dir"):
        from alignctl.fsutil import human

        lines += [f"Store: {st['entries']} entries, {human(st['bytes'])}; this run added {human(st['added_bytes'])} "
                  f"(`alignctl store ls --store {st['dir']}`, `alignctl store gc`)", ""]
    lines += [*plots, ""]
    lines += _kind_sections(manifest, run_dir)
    watched = [line for s in manifest["stages"] for line in _monitor_section(s)]
    if watched:
        lines += ["## Reward-hacking monitors", "", *watched]
    evaluation = [line for s in manifest["stages"] for line in _evaluation_section(run_dir, s)]
    if evaluation:
        lines += ["## Held-out evaluation", "", *evaluation]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out


def _outcome(manifest: dict) -> list[str]:
    """For a run that did not complete: which stage stopped it, and why (the manifest's error line)."""
    status = manifest.get("status")
    if status == "completed":
        return []
    stopped = next((s for s in manifest["stages"] if s.get("status") in ("failed", "interrupted", "running")), None)
    error = " ".join(str(manifest.get("error") or "no error recorded").split())
    if stopped is None:
        return [f"**{status}** before any stage ran: {error.rstrip('.')}.", ""]
    hint = (" Re-run the same command to resume: completed stages are reused, this one resumes from its last "
            "checkpoint." if status == "interrupted" else "")
    return [f"**{status}** in stage {stopped['name']} ({stopped['trainer']}): {error.rstrip('.')}.{hint}", ""]


def _override_items(overrides: list[str]) -> dict[str, str]:
    out = {}
    for o in overrides:
        if "=" in o:
            key, value = o.split("=", 1)
            out[key.lstrip("+~")] = value
    return out


def _number(v: str):
    try:
        return float(v)
    except ValueError:
        return None


def sweep_report(sweep_dir: str | Path) -> tuple[Path, Path | None, list[dict]]:
    """Write report.md and sweep.png into a multirun directory; returns (report, plot, rows)."""
    sweep_dir = Path(sweep_dir)
    manifests = []
    for path in sorted(sweep_dir.glob("*/manifest.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        m = json.loads(path.read_text())
        if m.get("status") == "running" and not _holder_alive(path.parent):
            m["status"] = "died"  # killed (kill -9, out of memory, a lost node) before it could record anything
        manifests.append(m)
    if not manifests:
        raise FileNotFoundError(f"no */manifest.json under {sweep_dir}")
    items = [_override_items(m["overrides"]) for m in manifests]
    keys = sorted({k for it in items for k in it})
    swept = [k for k in keys if len({it.get(k) for it in items}) > 1]
    rows = []
    for m, it in zip(manifests, items):
        row = {"job": Path(m["run_dir"]).name, "status": m["status"], **{k: it.get(k) for k in swept}}
        for s in m["stages"]:
            after = (s.get("metrics") or {}).get("after") or {}
            for key in dict.fromkeys([headline(s), *SWEEP_EXTRA]):
                if key in after:
                    row[f"{s['name']}:{key}"] = after[key]
            row[f"{s['name']}:reused"] = bool(s.get("reused_from"))
        rows.append(row)
    metric_cols = list(dict.fromkeys(c for r in rows for c in r if ":" in c and not c.endswith(":reused")))
    every = list(dict.fromkeys(c for r in rows for c in r))
    rows = [{c: r.get(c) for c in every} for r in rows]  # one column set (a failed job lacks metrics)
    cols = ["job", *swept, "status", *metric_cols]
    lines = [f"# Sweep {sweep_dir}", "", f"Swept: {', '.join(swept) or 'nothing differs between jobs'}", "",
             "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    plot = None
    if swept and metric_cols:
        plot = _sweep_plot(rows, swept[0], metric_cols, sweep_dir / "sweep.png")
        if plot:
            lines += ["", "![sweep](sweep.png)"]
    out = sweep_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out, plot, rows


def _holder_alive(run_dir: Path) -> bool:
    """Whether the process that holds a run directory's lock (alignctl.pipeline: ``.alignctl.lock``, removed when
    the run ends) is still alive."""
    from alignctl import fsutil

    return fsutil.lock_is_live(fsutil.read_lock(run_dir / ".alignctl.lock"), fsutil.lock_settings()["stale"])


def _sweep_plot(rows: list[dict], param: str, metric_cols: list[str], out: Path) -> Path | None:
    """The last stage's headline, win rate and KL against the swept parameter (the KL-reward frontier of a beta
    sweep), one panel each."""
    last = metric_cols[-1].split(":")[0]
    ours = [c for c in metric_cols if c.split(":")[0] == last]
    panels = [ours[0]] + [c for c in ours[1:] if c.split(":")[1] in ("eval_win_rate", "eval_kl")]
    series = []
    for metric in panels:
        pts = sorted((_number(r[param]), r[metric]) for r in rows
                     if _number(r.get(param) or "") is not None and isinstance(r.get(metric), (int, float)))
        if pts:
            series.append((metric, pts))
    if not series:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.4), squeeze=False)
    for ax, (metric, pts) in zip(axes[0], series):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        if min(p[0] for p in pts) > 0 and max(p[0] for p in pts) / min(p[0] for p in pts) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(param, fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
        ax.set_title(metric, fontsize=9)
    fig.suptitle("held-out metrics vs swept parameter", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
