"""The reward-hacking guards at plan time: `monitors:` thresholds and stop rules, PPO's KL guards (target_kl,
kl_stop, a kl_horizon relative to the run) and the `audit` link, each mistake one line naming the key; the stop
rules and the audit link are part of the fingerprint, warning thresholds are not."""

from __future__ import annotations

import pytest

from alignctl import fingerprint
from alignctl.config.compose import compose
from alignctl.config.resolve import resolve
from alignctl.errors import ConfigError


def problems(overrides: list[str], tmp_path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        resolve(compose(["recipe=rlhf-ppo", *overrides]), tmp_path / "run")
    return e.value.problems


def stages(overrides: list[str], tmp_path, recipe: str = "rlhf-ppo") -> dict:
    resolved = resolve(compose([f"recipe={recipe}", *overrides]), tmp_path / "run")
    return {s.name: s for s in resolved.stages}


@pytest.mark.parametrize("override,expected", [
    ("+stages.ppo.monitors.length_cor=0.5", "stages.ppo.monitors: unknown monitor 'length_cor' (did you mean "
                                            "'length_corr'"),
    ("+stages.ppo.monitors.truncated=-1", "stages.ppo.monitors.truncated: must be a number >= 0 or null (off), "
                                          "got -1"),
    ("+stages.ppo.monitors.stop_when=[kl]", "stages.ppo.monitors.stop_when: kl has no threshold here; set "
                                            "monitors.kl"),
    ("+stages.ppo.monitors.stop_when=[lenght_growth]", "stages.ppo.monitors.stop_when: unknown monitor "
                                                       "'lenght_growth' (did you mean 'length_growth'?)"),
    ("+stages.sft.monitors.kl=1", "stages.sft.monitors: only stages that sample answers while training"),
    ("stages.ppo.target_kl=0", "stages.ppo.target_kl: must be a number > 0 or null"),
    ("stages.ppo.kl_stop=-2", "stages.ppo.kl_stop: must be a number > 0 or null"),
    ("stages.ppo.kl_horizon=0", "stages.ppo.kl_horizon: must be a number > 0 or null"),
    ("stages.ppo.audit=nowhere", "stages.ppo.audit"),
])
def test_a_bad_guard_setting_is_one_line_naming_its_key(override, expected, tmp_path):
    found = problems([override], tmp_path)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_trl_trainers_have_no_reward_length_correlation(tmp_path):
    with pytest.raises(ConfigError) as e:
        resolve(compose(["recipe=rlhf-grpo", "+stages.grpo.monitors.length_corr=0.5"]), tmp_path / "run")
    assert e.value.problems == ["stages.grpo.monitors.length_corr: a grpo stage does not log length_corr (TRL's "
                                "trainer has no such metric); remove it"]


def test_monitors_default_on_for_on_policy_stages_and_only_stop_rules_are_fingerprinted(tmp_path):
    base = stages([], tmp_path)
    assert base["sft"].monitors is None and base["rm"].monitors is None
    ppo = base["ppo"]
    assert ppo.monitors["length_corr"] == 0.7 and ppo.monitors["stop_when"] == [] and ppo.monitors["kl"] is None
    assert "monitor_stops" not in ppo.options
    grpo = stages([], tmp_path, "rlhf-grpo")["grpo"]
    assert "length_corr" not in grpo.monitors and grpo.monitors["truncated"] == 0.5

    def fp(overrides):
        s = stages(overrides, tmp_path)
        return fingerprint.fingerprints(list(s.values()), env={})["ppo"]

    plain = fp([])
    assert fp(["+stages.ppo.monitors.length_corr=0.9"]) == plain  # a warning threshold trains nothing differently
    stopping = stages(["+stages.ppo.monitors.length_corr=0.9", "+stages.ppo.monitors.stop_when=[length_corr]"],
                      tmp_path)["ppo"]
    assert stopping.options["monitor_stops"] == {"length_corr": 0.9}
    assert fp(["+stages.ppo.monitors.length_corr=0.9", "+stages.ppo.monitors.stop_when=[length_corr]"]) != plain
    assert fp(["stages.ppo.audit=rm"]) != plain  # the audit link is a link like the others
    assert fp(["stages.ppo.kl_stop=10"]) != plain and fp(["stages.ppo.target_kl=0.05"]) != plain


def test_the_audit_judges_the_held_out_answers_and_plan_shows_it(tmp_path, capsys):
    from alignctl.cli import main

    ppo = stages([], tmp_path)["ppo"]
    assert ppo.link("audit").stage == "rm_audit" and ppo.link("reward").stage == "rm"
    assert ppo.eval.reward == "rm_audit"  # win rates are judged by the audit, not by the optimised RM
    assert stages(["~stages.ppo.audit"], tmp_path)["ppo"].eval.reward == "rm"
    assert main(["plan", "recipe=rlhf-ppo"]) == 0
    out = capsys.readouterr().out
    assert "audit reward" in out and "rm_audit" in out
