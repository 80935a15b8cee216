"""The metric policy: which held-out metric a stage is judged by (:func:`headline`), what a sweep optimises
(:func:`objective`), and how a metric value is written in tables and reports (:func:`fmt`). No torch."""

from __future__ import annotations

import numbers

from alignctl.stages import STAGES

PREFERENCE_ACCURACY = "eval_pref_accuracy"


def headline(stage: dict) -> str:
    """The held-out metric a stage is judged by (summaries, reports, a sweep's default objective):
    with a reward model, the win rate of its answers after training over before (what users ask: did it get
    better?); for preference stages without one, the length-normalised preference accuracy (the summed one favours
    short answers); otherwise the stage kind's own headline (SFT: eval_loss, reward: eval_accuracy, ...). A
    preference accuracy needs held-out pairs: where there were none (KTO on natively unpaired rows), the stage is
    judged by its trainer's held-out loss instead. ``stage``: a stage of a run's manifest."""
    after = (stage.get("metrics") or {}).get("after") or {}
    if "eval_win_rate" in after:
        return "eval_win_rate"
    head = STAGES[stage["trainer"]].headline
    if head == PREFERENCE_ACCURACY and f"{head}_norm" in after:
        return f"{head}_norm"
    if head == PREFERENCE_ACCURACY and head not in after and "eval_loss" in after:
        return "eval_loss"
    return head


def win_text(after: dict, digits: int = 2) -> str:
    """``0.80 [0.69, 0.88], LC 0.74 [0.60, 0.85]``: the win rate with its interval, and the length-controlled one
    (alignctl.length_control) where measured; empty without a win rate."""
    if "eval_win_rate" not in after:
        return ""
    f = f".{digits}f"
    out = f"{after['eval_win_rate']:{f}} [{after['eval_win_rate_low']:{f}}, {after['eval_win_rate_high']:{f}}]"
    if "eval_win_rate_lc" in after:
        out += (f", LC {after['eval_win_rate_lc']:{f}} [{after['eval_win_rate_lc_low']:{f}}, "
                f"{after['eval_win_rate_lc_high']:{f}}]")
    return out


def metric(manifest: dict, name: str | None = None) -> float | None:
    """A metric after training: ``name`` of the last stage, ``<stage>:<name>``, or (None) the last stage's headline."""
    stages = manifest["stages"]
    stage = stages[-1]
    if name and ":" in name:
        wanted, name = name.split(":", 1)
        stage = next((s for s in stages if s["name"] == wanted), None)
        if stage is None:
            return None
    value = ((stage.get("metrics") or {}).get("after") or {}).get(name or headline(stage))
    return value if isinstance(value, (int, float)) else None


def objective(manifest: dict, name: str | None = None) -> float | None:
    """What a Hydra sweeper optimises: ``sweep.objective`` (a metric of the last stage, or <stage>:<metric>), by
    default the last stage's headline metric after training."""
    return metric(manifest, name)


def fmt(value) -> str:
    """A value as tables and reports write it: a float (numpy's too) to 4 significant digits, nothing for None,
    anything else (whole numbers, text) as it is."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return f"{value:.4g}"
    return "" if value is None else str(value)
