"""RLHF-stage configuration errors are caught at plan time (no model loaded), each naming the stage and the field."""

from __future__ import annotations

import json

import pytest

from alignctl.cli import main
from alignctl.config.compose import compose
from alignctl.config.resolve import resolve
from alignctl.errors import ConfigError


def problems(overrides: list[str], tmp_path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        resolve(compose(overrides), tmp_path / "run")
    return e.value.problems


def one(overrides: list[str], tmp_path) -> str:
    found = problems(overrides, tmp_path)
    assert len(found) == 1, found
    return found[0]


def write_recipe(tmp_path, text: str) -> str:
    path = tmp_path / "my-recipe.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("recipe,stage", [("rlhf-ppo", "ppo"), ("rlhf-grpo", "grpo")])
def test_prompt_dataset_whose_prompts_hold_answers(recipe, stage, tmp_path):
    """A pair set serves as a prompt set (its answers ignored), but a `prompt` that already ends with the
    assistant's answer is a mistake: the on-policy stage would generate after the answer."""
    rows = [{"prompt": [{"role": "user", "content": "describe the lake ."},
                        {"role": "assistant", "content": "the lake is calm ."}]}] * 4
    bad = tmp_path / "prompts.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    msg = one([f"recipe={recipe}", f"data.prompts.path={bad}"], tmp_path)
    assert msg.startswith("data.prompts") and f"stages.{stage}" in msg and "assistant turn" in msg


def test_grpo_reward_funcs_are_checked(tmp_path):
    found = problems(["recipe=rlhf-grpo", "+stages.grpo.reward_funcs=[think_format_rewrd]",
                      "stages.grpo.reward_weights=[1.0]"], tmp_path)
    assert any(p.startswith("stages.grpo.reward_funcs: unknown reward function 'think_format_rewrd' "
                            "(did you mean 'think_format_reward'?)") for p in found), found
    assert "stages.grpo.reward_weights: 1 weights for 2 rewards (the reward model first, then reward_funcs in order)" \
        in found


def test_builtin_reward_function_names_exist_in_trl():
    import trl.rewards

    from alignctl.stages.grpo import BUILTIN_REWARDS

    for name, factory in BUILTIN_REWARDS.items():
        assert callable(getattr(trl.rewards, name)), name
        assert factory == name.startswith("get_"), name


def test_ppo_config_paths_that_trl_ignores_are_refused(tmp_path):
    msg = one(["recipe=rlhf-ppo", "stages.ppo.reward_model_path=/some/rm"], tmp_path)
    assert msg.startswith("stages.ppo.reward_model_path: set the stage's `reward` link instead")


def test_plan_reports_the_error_without_loading_torch(tmp_path, capsys):
    assert main(["plan", "recipe=rlhf-ppo", "stages.ppo.reward=sft"]) == 2
    err = capsys.readouterr().err
    assert "stages.ppo.reward: 'sft' is a sft stage, not a reward stage" in err and "Traceback" not in err


def test_plan_shows_the_rlhf_links(capsys):
    assert main(["plan", "recipe=rlhf-ppo"]) == 0
    out = capsys.readouterr().out
    ppo = out[out.index("] ppo"):]
    for row in ("policy     ← sft", "reference  ← sft", "reward     ← rm", "value      ← rm"):
        assert row in ppo, ppo
    rm = out[out.index("] rm"):out.index("] ppo")]
    assert "init       ← sft" in rm and "trainer: reward" in rm


def test_reward_and_value_links_resolve_to_stage_outputs_or_paths(tmp_path):
    s = resolve(compose(["recipe=rlhf-ppo"]), tmp_path / "run")
    ppo = s.stages[-1]
    rm_final = str((tmp_path / "run" / "rm" / "final").absolute())
    reward, value = ppo.links["reward"], ppo.links["value"]
    assert (reward.stage, reward.path, value.stage, value.path) == ("rm", rm_final, "rm", rm_final)
    assert ppo.links["ref"].stage == "sft" and ppo.links["ref"].path == ppo.source.path
    # A reward model kept anywhere; the value model then starts from it too, unless `value` says otherwise.
    elsewhere = tmp_path / "my-rm"
    elsewhere.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):  # what a model folder must hold to pass plan
        (elsewhere / name).write_text("{}")
    ppo = resolve(compose(["recipe=rlhf-ppo", f"stages.ppo.reward={elsewhere}"]), tmp_path / "run").stages[-1]
    assert ppo.links["reward"].stage is None and ppo.links["reward"].path == ppo.links["value"].path == str(elsewhere)
    ppo = resolve(compose(["recipe=rlhf-ppo", "stages.ppo.value=sft"]), tmp_path / "run").stages[-1]
    value = ppo.links["value"]
    assert value.stage == "sft" and value.path == str((tmp_path / "run" / "sft" / "final").absolute())
