"""Reward-hacking monitors of the stages that sample answers while training (the kinds with ``monitor_signals``:
ppo, grpo, rloo): per update, the signals practitioners watch for over-optimisation, each against a threshold; a
warning in the console when one crosses it, an optional stop.

Signals (what each kind logs, read under one name; :data:`SOURCES`):

* ``reward_mean`` / ``reward_std``: the reward of the update's answers; ``reward_std_drop`` fires when the std falls
  below that fraction of its first-update value (variance collapse: every answer scores the same);
* ``length``: mean answer length in tokens; ``length_growth`` fires when it exceeds that multiple of its first value;
* ``length_corr``: Pearson correlation of reward and answer length over the update's answers (PPO only: TRL's
  GRPO/RLOO do not log one); ``length_corr`` fires above it (the reward pays for length);
* ``truncated``: share of answers that hit the length limit without their stop token; fires above it;
* ``kl``: KL to the reference per answer token (nats; TRL's ``kl`` for GRPO/RLOO); fires above it (off by default:
  PPO's ``kl_target``/``kl_stop`` hold KL);
* ``entropy``: policy entropy per token; ``entropy_drop`` fires below that fraction of its first value;
* ``audit_mean``: the mean score of the update's answers by the stage's ``audit`` reward model (an ``audit:`` link
  of ppo, grpo or rloo), which never trains the policy; ``audit_drop`` fires when it falls more than that much below its
  best so far (over-optimisation: the proxy reward keeps rising, the independent one falls).

A monitor warns the first time it fires (each later onset, after it recovered, goes to the run log and the
events); ``stop_when`` lists
monitors that stop the stage instead (its output: the weights at that update). The stage's metrics get
``monitors``: thresholds, every signal per update, the events, and the stop if one happened; report.md shows them.
Settings are the stage's ``monitors:`` key (:func:`resolve`, at plan time); without one the defaults warn only.
"""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger("alignctl")

ALL_SIGNALS = ("reward_mean", "reward_std", "length", "length_corr", "truncated", "kl", "entropy", "audit_mean")
TRL_SIGNALS = ("reward_mean", "reward_std", "length", "truncated", "kl", "entropy", "audit_mean")  # TRL's GRPO/RLOO
# monitor -> (signal, rule, default threshold, what crossing it suggests)
MONITORS: dict[str, tuple[str, str, float | None, str]] = {
    "reward_std_drop": ("reward_std", "below_first", 0.25, "reward variance collapsed"),
    "length_growth": ("length", "above_first", 2.0, "answers grew long"),
    "length_corr": ("length_corr", "above", 0.7, "the reward pays for length"),
    "truncated": ("truncated", "above", 0.5, "answers hit the length limit"),
    "kl": ("kl", "above", None, "the policy drifted from its reference"),
    "entropy_drop": ("entropy", "below_first", 0.25, "the policy collapsed onto few answers"),
    "audit_drop": ("audit_mean", "below_best", 0.5, "the audit reward fell while the proxy is optimised"),
}
# signal -> the logged names it is read from, per kind family (alignctl's PPO, TRL's GRPO/RLOO)
SOURCES: dict[str, tuple[str, ...]] = {
    "reward_mean": ("objective/scores", "reward"),
    "reward_std": ("monitor/reward_std", "reward_std"),
    "length": ("monitor/length", "completions/mean_length"),
    "length_corr": ("monitor/length_corr",),
    "truncated": ("monitor/truncated", "completions/clipped_ratio"),
    "kl": ("monitor/kl_token", "kl"),
    "entropy": ("monitor/entropy_token", "entropy"),
    "audit_mean": ("audit/scores", "rewards/audit/mean"),
}


def defaults() -> dict[str, Any]:
    return {**{name: m[2] for name, m in MONITORS.items()}, "stop_when": []}


def resolve(raw: Any, kind: Any, where: str) -> tuple[dict[str, Any] | None, list[str]]:
    """A stage's ``monitors:`` key (None: the defaults) as thresholds + ``stop_when``, or problems (plan time).
    ``kind``: the stage's StageKind (its ``monitor_signals``: what it logs; none: it takes no monitors)."""
    from alignctl.errors import suggest

    signals = kind.monitor_signals
    if not signals:
        if raw is not None:
            return None, [f"{where}.monitors: only stages that sample answers while training (ppo, grpo, rloo) have "
                          f"per-update monitors; a {kind.name} stage samples none"]
        return None, []
    out = {k: v for k, v in defaults().items() if k == "stop_when" or MONITORS[k][0] in signals}
    if raw is None:
        return out, []
    if not isinstance(raw, dict):
        return None, [f"{where}.monitors: must be a mapping of monitor: threshold (and stop_when: [...]), "
                      f"got {raw!r}"]
    problems = []
    for key, value in raw.items():
        if key == "stop_when":
            continue
        if key not in MONITORS:
            problems.append(f"{where}.monitors: unknown monitor '{key}'{suggest(str(key), MONITORS)}; known: "
                            f"{', '.join(MONITORS)}, stop_when")
        elif MONITORS[key][0] not in signals:
            problems.append(f"{where}.monitors.{key}: a {kind.name} stage does not log {MONITORS[key][0]} "
                            f"(TRL's trainer has no such metric); remove it")
        elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                    or not value >= 0 or not math.isfinite(value)):
            problems.append(f"{where}.monitors.{key}: must be a number >= 0 or null (off), got {value!r}")
        else:
            out[key] = None if value is None else float(value)
    stop = raw.get("stop_when", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        problems.append(f"{where}.monitors.stop_when: must be a list of monitor names, got {raw.get('stop_when')!r}")
        stop = []
    for name in stop:
        if name not in MONITORS:
            problems.append(f"{where}.monitors.stop_when: unknown monitor '{name}'{suggest(name, MONITORS)}")
        elif out.get(name) is None:
            problems.append(f"{where}.monitors.stop_when: {name} has no threshold here; set monitors.{name}")
    out["stop_when"] = sorted(set(stop) & set(out) - {"stop_when"})
    return (out if not problems else None), problems


def stop_rules(settings: dict[str, Any] | None) -> dict[str, float]:
    """The monitors that can stop the stage, with their thresholds (they change the weights: fingerprinted)."""
    if not settings:
        return {}
    return {name: settings[name] for name in settings.get("stop_when", [])}


def read(logs: dict[str, Any]) -> dict[str, float]:
    """The signals a logged entry carries."""
    out = {}
    for signal, names in SOURCES.items():
        for n in names:
            v = logs.get(n)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[signal] = float(v)
                break
    return out


class Monitor:
    """Watches one stage's updates: ``observe(step, logs)`` -> True when a ``stop_when`` monitor fired."""

    def __init__(self, settings: dict[str, Any], stage: str, quiet: bool = False):
        from alignctl.ranks import rank_env

        self.settings, self.stage, self.rank = settings, stage, rank_env()[0]
        self.quiet = quiet  # events only, no log lines (a report replaying what a run logged)
        self.first: dict[str, float] = {}
        self.best: dict[str, float] = {}
        self.series: dict[str, list[list[float]]] = {}  # signal -> [[step, value], ...]
        self.events: list[dict[str, Any]] = []
        self.firing: set[str] = set()
        self.stopped: dict[str, Any] | None = None

    def limit(self, name: str) -> float | None:
        signal, rule, _, _ = MONITORS[name]
        thr = self.settings.get(name)
        if thr is None:
            return None
        if rule.endswith("_first"):
            base = self.first.get(signal)
            return None if base is None or base <= 0 else thr * base
        if rule == "below_best":
            return None if signal not in self.best else self.best[signal] - thr
        return thr

    def observe(self, step: int, logs: dict[str, Any]) -> bool:
        values = read(logs)
        for signal, v in values.items():
            self.first.setdefault(signal, v)
            self.best[signal] = max(self.best.get(signal, v), v)
            self.series.setdefault(signal, []).append([step, round(v, 6)])
        stop = False
        for name, (signal, rule, _, meaning) in MONITORS.items():
            limit, v = self.limit(name), values.get(signal)
            if limit is None or v is None:
                continue
            fired = v < limit if rule.startswith("below") else v > limit
            if fired and name not in self.firing:
                warned = any(e["monitor"] == name for e in self.events)
                self.events.append({"monitor": name, "step": step, "value": round(v, 6), "limit": round(limit, 6)})
                how = "below" if rule.startswith("below") else "above"
                say = log.debug if self.rank or self.quiet else log.info if warned else log.warning  # rank 0 speaks
                say("[%s] monitor %s at update %d: %s %.4g %s %.4g (%s)", self.stage, name, step, signal, v, how,
                    limit, meaning)
                if name in self.settings.get("stop_when", []) and self.stopped is None:
                    self.stopped = {"monitor": name, "step": step}
                    stop = True
            if fired:
                self.firing.add(name)
            else:
                self.firing.discard(name)
        return stop

    def summary(self) -> dict[str, Any]:
        out = {"thresholds": {k: v for k, v in self.settings.items()}, "series": self.series, "events": self.events}
        if self.stopped is not None:
            out["stopped"] = self.stopped
        return out


def callback(monitor: Monitor):
    """A TrainerCallback feeding a TRL trainer's logs to ``monitor`` and stopping training when it says so."""
    from transformers import TrainerCallback

    class MonitorCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and monitor.observe(state.global_step, logs):
                control.should_training_stop = True

    return MonitorCallback()
