"""An adaptive KL coefficient for TRL's GRPO and RLOO trainers: the ``beta`` of their loss held near a target KL.

TRL's GRPO/RLOO keep ``beta`` fixed. A grpo/rloo stage's ``kl_target`` (per token, TRL's logged ``kl``: the mean KL of
the sampled completions to the reference) turns on the proportional controller of Ziegler et al. (2019) that
alignctl's PPO uses (alignctl.rl.kl.AdaptiveKL): at every logging step ``beta`` is multiplied by
``1 + clip(kl / kl_target - 1, -0.2, 0.2) * steps / kl_horizon``, where ``kl_horizon`` is in optimiser steps (a
fraction of the run's steps when below 1, default a twentieth). The trainer is TRL's, subclassed (:func:`adaptive`):
its ``log`` reads the logging interval's KL before TRL averages and clears its metrics, updates ``beta`` (which TRL's
loss reads every step) and logs it as ``beta``.
"""

from __future__ import annotations

from typing import Any

from alignctl.rl.kl import AdaptiveKL, horizon_episodes


def check(stage, where: str, default_beta: float) -> list[str]:
    """Plan time: kl_target / kl_horizon are positive numbers, and beta (``default_beta``: TRL's default for the
    kind, when unset) starts above 0 (TRL loads no reference model for beta 0, so there is no KL to hold)."""
    problems = []
    for key in ("kl_target", "kl_horizon"):
        v = stage.options.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            problems.append(f"{where}.{key}: must be a number > 0, got {v!r}")
    if "kl_horizon" in stage.options and stage.options.get("kl_target") is None:
        problems.append(f"{where}.kl_horizon: is read with kl_target only; set {where}.kl_target or drop kl_horizon")
    beta = stage.args.get("beta", default_beta)
    if stage.options.get("kl_target") is not None and not (isinstance(beta, (int, float)) and beta > 0):
        problems.append(f"{where}.kl_target: adapts beta from its initial value, and beta {beta} means no reference "
                        f"model (no KL to hold); set {where}.beta > 0, e.g. 0.04")
    return problems


def adaptive(trainer_class: type, options: dict[str, Any]) -> type:
    """``trainer_class`` (TRL's GRPOTrainer or RLOOTrainer), with an adaptive beta when ``options`` set kl_target."""
    target = options.get("kl_target")
    if target is None:
        return trainer_class
    horizon_setting = options.get("kl_horizon")

    class AdaptiveBeta(trainer_class):
        _controller: AdaptiveKL | None = None
        _last_step = 0

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            kl = self._metrics["train"].get("kl") if self.model.training else None
            if kl:
                if self._controller is None:
                    steps = self.state.max_steps or self.state.global_step or 1
                    self._controller = AdaptiveKL(self.beta, target, horizon_episodes(horizon_setting, steps))
                self._controller.update(sum(kl) / len(kl), self.state.global_step - self._last_step)
                self._last_step = self.state.global_step
                self.beta = self._controller.value
                logs = {**logs, "beta": self.beta}
            super().log(logs, start_time)

    AdaptiveBeta.__name__ = f"AdaptiveBeta{trainer_class.__name__}"
    return AdaptiveBeta
