"""The KL penalty: per-token estimators of KL(policy || reference) and the controllers of its coefficient.

Estimators (Schulman, "Approximating KL divergence", 2020), with r = ref(y_t) / pi(y_t) for a sampled token:
``k1`` = -log r (unbiased, can be negative per token), ``k3`` = (r - 1) - log r (unbiased, never negative).

Controllers: :class:`FixedKL` keeps ``kl_coef``; :class:`AdaptiveKL` (Ziegler et al. 2019, "Fine-tuning language
models from human preferences") moves it towards a target KL after every rollout batch:
``kl_coef <- kl_coef * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)``, where KL is the batch's mean
KL per answer and n_steps the episodes of the batch.
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
        self.target, self.horizon = float(target), int(horizon)

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def controller(config) -> FixedKL:
    """The controller a PPO config asks for: adaptive when ``kl_target`` is set, else fixed."""
    if config.kl_target is not None:
        return AdaptiveKL(config.kl_coef, config.kl_target, config.kl_horizon)
    return FixedKL(config.kl_coef)
