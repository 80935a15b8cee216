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


def test_trl_trainers_have_no_reward_length_correlation_and_read_no_ensemble(tmp_path):
    def grpo_problems(override: str) -> list[str]:
        with pytest.raises(ConfigError) as e:
            resolve(compose(["recipe=rlhf-grpo", override]), tmp_path / "run")
        return e.value.problems

    assert grpo_problems("+stages.grpo.monitors.length_corr=0.5") == [
        "stages.grpo.monitors.length_corr: a grpo stage does not log length_corr (TRL's trainer has no such metric); "
        "remove it"]
    assert grpo_problems("stages.grpo.reward=[rm,rm]") == [
        "stages.grpo.reward: names one model; a list (an ensemble) is read by ppo stages only, not by a grpo stage"]
    # the adaptive beta (alignctl.rl.beta): positive settings, a beta to start from (TRL's default: grpo 0)
    assert grpo_problems("+stages.grpo.kl_target=0") == ["stages.grpo.kl_target: must be a number > 0, got 0"]
    assert grpo_problems("+stages.grpo.kl_horizon=3") == [
        "stages.grpo.kl_horizon: is read with kl_target only; set stages.grpo.kl_target or drop kl_horizon"]
    with pytest.raises(ConfigError) as e:
        resolve(compose(["recipe=rlhf-grpo", "~stages.grpo.beta", "+stages.grpo.kl_target=0.1"]), tmp_path / "run")
    assert e.value.problems[0].startswith("stages.grpo.kl_target: adapts beta from its initial value, and beta 0.0")
    rloo = resolve(compose(["recipe=rlhf-grpo", "stages.grpo.trainer=rloo", "~stages.grpo.beta",
                            "+stages.grpo.kl_target=0.1"]), tmp_path / "run")  # RLOO's default beta is 0.05
    assert rloo.stage("grpo").options["kl_target"] == 0.1


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
    assert fp(["~stages.ppo.audit"]) != plain  # the audit link is a link like the others
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


# -- reward ensembles ---------------------------------------------------------------------------------------------
ENSEMBLE = "stages.ppo.reward=[rm,rm_b]"


@pytest.mark.parametrize("overrides,expected", [
    (["stages.ppo.reward=[rm,rm]"], "stages.ppo.reward: rm listed twice; an ensemble names each reward model once"),
    (["stages.ppo.reward=[]"], "stages.ppo.reward: an ensemble must list one or more reward stages or models"),
    (["stages.ppo.reward=[rm,sft]"], "stages.ppo.reward: 'sft' is a sft stage, not a reward stage"),
    (["stages.ppo.reward=[rm,rm_c]"], "stages.ppo.reward.2: 'rm_c' names no stage of this recipe (did you mean"),
    (["stages.ppo.reward=[rm,rm_audit]"], "stages.ppo.audit: 'rm_audit' is also the stage's reward; an audit must"),
    (["stages.ppo.reward=rm", "stages.ppo.reward_aggregate=min"], "stages.ppo.reward_aggregate: combines the scores "
                                                                  "of several reward models"),
    (["~stages.ppo.audit", "+stages.ppo.keep_best_audit=true"], "stages.ppo.keep_best_audit: picks the policy the "
                                                                "audit scored highest; set stages.ppo.audit"),
    ([ENSEMBLE, "stages.ppo.reward_std_coef=2"], "stages.ppo.reward_std_coef: is read by "
                                                  "reward_aggregate=mean_minus_std only (here: mean)"),
    ([ENSEMBLE, "stages.ppo.reward_aggregate=median"], "stages.ppo.reward_aggregate: unknown value 'median' (did "
                                                        "you mean 'mean' or 'min'?); choose from mean, min, "
                                                        "mean_minus_std"),
])
def test_a_bad_ensemble_is_one_line_naming_its_key(overrides, expected, tmp_path):
    found = problems(overrides, tmp_path)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_ensemble_members_are_linked_fingerprinted_and_digested_like_one_reward_link(tmp_path, capsys):
    from alignctl import store
    from alignctl.cli import main

    ppo = stages([ENSEMBLE, "stages.ppo.reward_aggregate=mean_minus_std"], tmp_path)["ppo"]
    assert [k for k in ppo.links if k.startswith("reward")] == ["reward", "reward.2"]
    assert ppo.link("reward").stage == "rm" and ppo.link("reward.2").stage == "rm_b"
    assert ppo.link("value").stage == "rm"  # the value model starts from the first member
    assert ppo.eval.reward == "rm_audit"

    def fp(overrides):
        return fingerprint.fingerprints(list(stages(overrides, tmp_path).values()), env={})["ppo"]

    one = fp(["stages.ppo.reward=rm"])
    two = fp([ENSEMBLE])
    assert two == fp([]) != one  # rlhf-ppo ships the ensemble
    assert fp(["stages.ppo.reward=[rm]"]) == one  # a list of one is that one link
    assert fp(["stages.ppo.reward=[rm_b,rm]"]) != two  # order matters: the first member is the value model's start
    assert fp([ENSEMBLE, "stages.ppo.reward_aggregate=min"]) != two
    # the members' completed files count in the upstream digest, each under its own key
    entries = {n: type("E", (), {"record": lambda self, n=n: {"files": {n: "sha"}}})() for n in ("sft", "rm", "rm_b")}
    single = stages(["stages.ppo.reward=rm"], tmp_path)["ppo"]
    assert store.upstream_digest(ppo, entries) != store.upstream_digest(single, entries)
    entries["rm_b"] = type("E", (), {"record": lambda self: {"files": {"rm_b": "other"}}})()
    assert store.upstream_digest(ppo, entries) != store.upstream_digest(
        ppo, {**entries, "rm_b": type("E", (), {"record": lambda self: {"files": {"rm_b": "sha"}}})()})
    assert main(["plan", "recipe=rlhf-ppo", ENSEMBLE, "stages.ppo.reward_aggregate=mean_minus_std",
                 "stages.ppo.reward_std_coef=0.5"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "reward ← rm, rm_b (mean - 0.5 x std)" in out


def test_an_external_ensemble_member_is_checked_like_a_reward_model(tmp_path):
    folder = tmp_path / "lm"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    found = problems([f"stages.ppo.reward=[rm,{folder}]"], tmp_path)
    assert found and all(p.startswith(f"stages.ppo.reward.2: {folder}") for p in found), found
    assert any("no *.safetensors weights" in p for p in found)
