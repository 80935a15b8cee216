"""The KL penalty: per-token estimators of KL(policy || reference) and the controllers of its coefficient.

Estimators (Schulman, "Approximating KL divergence", 2020), with r = ref(y_t) / pi(y_t) for a sampled token:
``k1`` = -log r (unbiased, can be negative per token), ``k3`` = (r - 1) - log r (unbiased, never negative).

Controllers: :class:`FixedKL` keeps ``kl_coef``; :class:`AdaptiveKL` (Ziegler et al. 2019, "Fine-tuning language
models from human preferences") moves it towards a target KL after every rollout batch:
``kl_coef <- kl_coef * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)``, where KL is the batch's mean
KL per answer and n_steps the episodes of the batch. The paper's horizon, 10000 episodes, was a fraction of its runs'
length; on a run of a few hundred episodes it moves kl_coef by under 1 % in all, so the horizon is taken relative to
the run (:func:`horizon_episodes`): by default a twentieth of the run's episodes, which lets a sustained error move
kl_coef by up to e^±4 (×55) over any run, long or short.
"""

from __future__ import annotations


def kl_per_token(logprobs, ref_logprobs, estimator: str):
    """Per-token KL estimate from the sampled tokens' log-probabilities under the policy and the reference."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return (-log_ratio).exp() - 1 + log_ratio
    raise ValueError(f"kl_estimator: unknown estimator {estimator!r}; use k1 or k3")


class FixedKL:
    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, kl: float, n_steps: int) -> None:
        pass

    def state(self) -> dict:
        return {"kl_coef": self.value}

    def load(self, state: dict) -> None:
        self.value = float(state.get("kl_coef", self.value))


class AdaptiveKL(FixedKL):
    def __init__(self, kl_coef: float, target: float, horizon: int):
        if not target > 0 or not horizon > 0:
            raise ValueError(f"the adaptive KL controller needs kl_target > 0 and kl_horizon > 0, got {target}, "
                             f"{horizon}")
        super().__init__(kl_coef)
        self.target, self.horizon = float(target), float(horizon)

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


DEFAULT_HORIZON = 0.05  # of the run's episodes


def horizon_episodes(kl_horizon: float | None, episodes: int) -> float:
    """The controller's horizon in episodes: ``kl_horizon`` episodes when it is >= 1, that fraction of the run's
    ``episodes`` when it is below 1, a twentieth of them when it is None; never under one episode."""
    h = DEFAULT_HORIZON if kl_horizon is None else float(kl_horizon)
    return max(1.0, h * episodes if h < 1 else h)


def controller(config, episodes: int) -> FixedKL:
    """The controller a PPO config asks for: adaptive when ``kl_target`` is set, else fixed. ``episodes``: the run's
    (what a relative ``kl_horizon`` is a fraction of)."""
    if config.kl_target is not None:
        return AdaptiveKL(config.kl_coef, config.kl_target, horizon_episodes(config.kl_horizon, episodes))
    return FixedKL(config.kl_coef)
