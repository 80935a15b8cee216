"""The pieces of the reward-hacking guards on hand-made numbers: the length-controlled win rate, the monitors'
rules (onset warnings, stop rules), and the adaptive KL controller's horizon relative to the run."""

from __future__ import annotations

import logging
import random

import pytest

from alignctl.evaluate import win_rate
from alignctl.length_control import lc_win_rate
from alignctl.rl import kl as klmod
from alignctl.train import monitors


def test_length_controlled_win_rate_discounts_a_judge_that_pays_for_length():
    r = random.Random(1)
    la, lb = [r.randint(10, 40) for _ in range(64)], [r.randint(5, 30) for _ in range(64)]
    # the judge's score is the length plus noise: A wins by being longer
    sa, sb = [n + r.gauss(0, 3) for n in la], [n + r.gauss(0, 3) for n in lb]
    raw, lc = win_rate(sa, sb), lc_win_rate(sa, sb, la, lb)
    assert raw["rate"] > 0.65 and abs(lc["rate"] - 0.5) < 0.1 and lc["low"] < 0.5 < lc["high"]
    assert lc["length_coef"] > 2  # the preference follows the length difference
    # a judge that pays for quality alone, at the same length distribution: LC and raw agree
    la, lb = [r.randint(10, 40) for _ in range(64)], [r.randint(10, 40) for _ in range(64)]
    sa, sb = [1 + r.gauss(0, 1) for _ in la], [r.gauss(0, 1) for _ in lb]
    raw, lc = win_rate(sa, sb), lc_win_rate(sa, sb, la, lb)
    assert abs(lc["rate"] - raw["rate"]) < 0.05 and lc["low"] > 0.5 and abs(lc["length_coef"]) < 1
    assert lc_win_rate(sa, sb, la, lb) == lc  # the bootstrap is seeded
    assert all(v != v for v in lc_win_rate([1.0], [0.0], [3], [4]).values())  # one prompt: NaN, not a number


def test_equal_lengths_give_the_plain_win_rate_shrunk_slightly_towards_a_half():
    a, b = [1, 1, 1, 0, 1, 1, 0, 1], [0] * 8  # 6 wins, 2 ties: 0.875
    lc = lc_win_rate(a, b, [5] * 8, [5] * 8)
    assert win_rate(a, b)["rate"] == 0.875 and 0.8 < lc["rate"] < 0.875 and lc["length_coef"] == 0.0


def test_monitor_warns_at_onset_once_and_stops_on_a_stop_rule(caplog):
    settings = {**monitors.defaults(), "length_growth": 1.5, "stop_when": ["length_growth"]}
    m = monitors.Monitor(settings, "ppo")
    logs = lambda n, sd: {"monitor/length": n, "monitor/reward_std": sd, "objective/scores": 1.0}  # noqa: E731
    with caplog.at_level(logging.INFO, logger="alignctl"):
        assert not m.observe(1, logs(10, 1.0))
        assert not m.observe(2, logs(14, 0.2))  # reward std fell below 0.25 x its first value
        assert not m.observe(3, logs(14, 0.1))  # still firing: no new event
        assert not m.observe(4, logs(14, 0.9))  # recovered
        assert not m.observe(5, logs(14, 0.1))  # fires again: an event, logged but not warned twice
        assert m.observe(6, logs(16, 0.9))  # length 16 > 1.5 x 10: the stop rule
    events = [(e["monitor"], e["step"]) for e in m.events]
    assert events == [("reward_std_drop", 2), ("reward_std_drop", 5), ("length_growth", 6)]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and "reward_std_drop at update 2" in warned[0] and "length_growth at update 6" in warned[1]
    s = m.summary()
    assert s["stopped"] == {"monitor": "length_growth", "step": 6} and s["series"]["length"][0] == [1, 10.0]


def test_audit_drop_fires_below_the_best_audit_so_far():
    m = monitors.Monitor(monitors.defaults(), "ppo")
    for step, audit in enumerate([0.0, 0.8, 1.0, 0.6, 0.4], 1):
        m.observe(step, {"audit/scores": audit})
    assert [(e["monitor"], e["step"]) for e in m.events] == [("audit_drop", 5)]  # 0.4 < 1.0 - 0.5


@pytest.mark.parametrize("kl_horizon,episodes,expected", [(None, 320, 16.0), (0.25, 320, 80.0), (10000, 320, 10000.0),
                                                         (None, 8, 1.0)])
def test_kl_horizon_is_relative_to_the_run_unless_given_in_episodes(kl_horizon, episodes, expected):
    assert klmod.horizon_episodes(kl_horizon, episodes) == expected
