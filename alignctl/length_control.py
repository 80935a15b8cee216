"""Length-controlled win rate (the idea of AlpacaEval 2's LC win rate, Dubois et al. 2024): how often answer A beats
answer B *at equal length*, so that a judge that pays for length cannot make a longer policy look better.

For each prompt, the outcome y = 1 (A wins), 0.5 (tie), 0 (B wins) is regressed on the length difference,
``P(A wins) = sigmoid(a + b * tanh((len_A - len_B) / s))`` with ``s`` the standard deviation of the differences
(a logistic regression fitted by Newton's method, with a small ridge penalty so that an all-wins sample stays
finite); the length-controlled win rate is the prediction at equal length, ``sigmoid(a)``. ``b`` is reported too:
how strongly the judge's preference follows length. The 95% interval is a percentile bootstrap over prompts
(seeded: the same scores give the same interval). AlpacaEval's own model also has an instruction-difficulty term,
which needs many models answering the same prompts; with two policies it drops out.

numpy only; nothing here imports torch.
"""

from __future__ import annotations

import math

RIDGE = 0.1  # penalty on a^2 + b^2 (a prior pulling both towards 0: half the weight of one observation)
BOOTSTRAP = 1000
SEED = 0


def _fit(y, x, iters: int = 30):
    """(a, b) per row of y, x (shape (B, n)): penalised logistic regression by Newton's method, all rows at once."""
    import numpy as np

    a, b = np.zeros(y.shape[0]), np.zeros(y.shape[0])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(a[:, None] + b[:, None] * x)))
        w = p * (1 - p)
        r = y - p
        ga, gb = r.sum(1) - RIDGE * a, (r * x).sum(1) - RIDGE * b
        haa, hab, hbb = w.sum(1) + RIDGE, (w * x).sum(1), (w * x * x).sum(1) + RIDGE
        det = haa * hbb - hab * hab
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        a, b = a + da, b + db
        if max(np.abs(da).max(), np.abs(db).max()) < 1e-8:
            break
    return a, b


def lc_win_rate(a_scores: list[float], b_scores: list[float], a_lengths: list[float], b_lengths: list[float]
                ) -> dict[str, float]:
    """{rate, low, high, length_coef} of A over B at equal length; NaNs with fewer than two prompts."""
    import numpy as np

    n = len(a_scores)
    if n < 2:
        return {"rate": float("nan"), "low": float("nan"), "high": float("nan"), "length_coef": float("nan")}
    sa, sb = np.asarray(a_scores, float), np.asarray(b_scores, float)
    y = np.where(sa > sb, 1.0, np.where(sa == sb, 0.5, 0.0))
    d = np.asarray(a_lengths, float) - np.asarray(b_lengths, float)
    s = d.std()
    x = np.tanh(d / s) if s > 0 else np.zeros(n)
    a, b = _fit(y[None], x[None])
    idx = np.random.default_rng(SEED).integers(0, n, size=(BOOTSTRAP, n))
    boot_a, _ = _fit(y[idx], x[idx])
    rates = 1.0 / (1.0 + np.exp(-boot_a))
    lo, hi = np.percentile(rates, [2.5, 97.5])
    rate = 1.0 / (1.0 + math.exp(-float(a[0])))
    return {"rate": rate, "low": float(lo), "high": float(hi), "length_coef": float(b[0])}
