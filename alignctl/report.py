"""Reports: each run's ``report.md`` with training-curve plots, and ``alignctl report <sweep dir>``.

A sweep report reads every job's ``manifest.json`` under a multirun directory, finds
the overrides that differ between jobs (the swept parameters), and writes a table
of swept values against each stage's held-out metrics plus a plot of the last
stage's headline metric against the first swept parameter.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignctl.stages import STAGES

# Training curves worth plotting, in order, when a stage logged them (TRL's names).
CURVES = ("loss", "rewards/margins", "rewards/accuracies", "objective/scores", "objective/kl", "objective/rlhf_reward",
          "reward", "kl", "eval_loss", "eval_rewards/accuracies", "eval_accuracy")


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
        pts = [(h.get("step", i), h[key]) for i, h in enumerate(history) if isinstance(h.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return True


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


def write_run_report(manifest: dict) -> Path:
    run_dir = Path(manifest["run_dir"])
    lines = [f"# {manifest['recipe']} — {manifest['status']}", "",
             "| stage | trainer | status | reused | held-out metric | before | after | train loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    plots = []
    for s in manifest["stages"]:
        m = s.get("metrics") or {}
        head = STAGES[s["trainer"]].headline
        lines.append(f"| {s['name']} | {s['trainer']} | {s['status']} | {'yes' if s.get('reused_from') else 'no'} | "
                     f"{head} | {_fmt(m.get('before', {}).get(head))} | {_fmt(m.get('after', {}).get(head))} | "
                     f"{_fmt(m.get('train', {}).get('train_loss'))} |")
        hist = run_dir / s["name"] / "log_history.json"
        if hist.is_file() and plot_curves(json.loads(hist.read_text()), run_dir / s["name"] / "curves.png",
                                          f"{s['name']} ({s['trainer']})"):
            plots.append(f"![{s['name']}]({s['name']}/curves.png)")
    lines += ["", f"Final model: `{manifest['final_model']}`", ""]
    st = manifest.get("store") or {}
    if st.get("dir"):
        from alignctl.fsutil import human

        lines += [f"Store: {st['entries']} entries, {human(st['bytes'])}; this run added {human(st['added_bytes'])} "
                  f"(`alignctl store ls --store {st['dir']}`, `alignctl store gc`)", ""]
    lines += [*plots, ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out


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
        manifests.append(json.loads(path.read_text()))
    if not manifests:
        raise FileNotFoundError(f"no */manifest.json under {sweep_dir}")
    items = [_override_items(m["overrides"]) for m in manifests]
    keys = sorted({k for it in items for k in it})
    swept = [k for k in keys if len({it.get(k) for it in items}) > 1]
    rows = []
    for m, it in zip(manifests, items):
        row = {"job": Path(m["run_dir"]).name, "status": m["status"], **{k: it.get(k) for k in swept}}
        for s in m["stages"]:
            head = STAGES[s["trainer"]].headline
            row[f"{s['name']}:{head}"] = (s.get("metrics") or {}).get("after", {}).get(head)
            row[f"{s['name']}:reused"] = bool(s.get("reused_from"))
        rows.append(row)
    metric_cols = [c for c in rows[0] if ":" in c and not c.endswith(":reused")]
    cols = ["job", *swept, "status", *metric_cols]
    lines = [f"# Sweep {sweep_dir}", "", f"Swept: {', '.join(swept) or 'nothing differs between jobs'}", "",
             "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    plot = None
    if swept and metric_cols:
        param, metric = swept[0], metric_cols[-1]
        pts = sorted((_number(r[param]), r[metric]) for r in rows
                     if _number(r.get(param) or "") is not None and isinstance(r.get(metric), (int, float)))
        if pts:
            plt = _plt()
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
            if min(p[0] for p in pts) > 0 and max(p[0] for p in pts) / min(p[0] for p in pts) >= 10:
                ax.set_xscale("log")
            ax.set_xlabel(param)
            ax.set_ylabel(metric)
            ax.set_title("held-out metric vs swept parameter", fontsize=10)
            fig.tight_layout()
            plot = sweep_dir / "sweep.png"
            fig.savefig(plot, dpi=100)
            plt.close(fig)
            lines += ["", "![sweep](sweep.png)"]
    out = sweep_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out, plot, rows
