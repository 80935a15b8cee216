"""`resolve` returns a typed run spec (alignctl.config.types) built by per-concern resolvers; every link kind that may
name a model outside the recipe (reward, value, judge) gets the same checks and needs the same consent; and a stage
kind's plan-time rules are the kind's own declaration (StageKind), not code in alignctl/config/. No training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignctl.config import links as link_table
from alignctl.config.checks import POS
from alignctl.config.compose import available_recipes, compose
from alignctl.config.resolve import resolve
from alignctl.config.types import EvalSettings, RunSpec, StageSpec
from alignctl.errors import ConfigError
from alignctl.stages import STAGES, StageKind


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _resolve(tmp_path: Path, *args: str, run: bool = False) -> RunSpec:
    return resolve(compose([f"output_root={tmp_path / 'out'}", *args]), tmp_path / "run", run=run)


def _problems(tmp_path: Path, *args: str, run: bool = False) -> str:
    with pytest.raises(ConfigError) as e:
        _resolve(tmp_path, *args, run=run)
    return "\n".join(e.value.problems)


@pytest.mark.parametrize("recipe", sorted(available_recipes()))
def test_every_recipe_resolves_to_a_typed_spec_that_round_trips(recipe, tmp_path):
    spec = _resolve(tmp_path, f"recipe={recipe}")
    assert isinstance(spec, RunSpec) and spec.stages and RunSpec.from_json(spec.to_json()) == spec
    for s in spec.stages:
        assert isinstance(s, StageSpec) and StageSpec.from_json(s.to_json()) == s
        assert s.stage_dir == str(tmp_path / "run" / s.name) and s.kind in STAGES
        rows = {link_table.row_of(k).name for k in s.links}  # an ensemble's members: reward, reward.2, ...
        assert "from" in s.links and rows <= set(link_table.NAMES)
        assert rows - {"from"} == set(STAGES[s.kind].links)
        source = s.links["from"]
        assert source.path == (str(tmp_path / "run" / source.stage / "final") if source.stage else
                               spec.model.name_or_path)
        assert s.data.source in ("local", "hub", "generated") and (s.data.source == "generated") == bool(s.data.stage)
        assert isinstance(s.eval, EvalSettings)  # computed at resolve time (outside the fingerprint)
        assert s.eval.enabled is (spec.eval.enabled and STAGES[s.kind].output == link_table.CAUSAL_LM)


def test_generated_data_is_the_producing_stages_final_folder(tmp_path):
    spec = _resolve(tmp_path, "recipe=iterative-dpo")
    dpo1 = spec.stage("dpo1")
    assert dpo1.data.source == "generated" and dpo1.data.stage == "gen1"
    assert dpo1.data.path == str(tmp_path / "run" / "gen1" / "final")
    assert dpo1.eval.reward == "rm" and dpo1.eval.reward_path == str(tmp_path / "run" / "rm" / "final")


# -- links outside the recipe: one set of checks for reward, value and judge ---------------------------------------
LINKS = [("rlhf-ppo", "ppo", "reward", "CanaryForSequenceClassification"),
         ("rlhf-ppo", "ppo", "value", "CanaryForSequenceClassification"),
         ("rlaif-dpo", "gen", "judge", "CanaryForCausalLM")]
REMOTE_CODE = {"model_type": "alignctl_canary", "auto_map": {"AutoModel": "modeling_canary.Canary"}}


def _folder(root: Path, architecture: str) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({**REMOTE_CODE, "architectures": [architecture]}))
    for f in ("tokenizer.json", "model.safetensors"):
        (root / f).write_text("{}")
    return root


@pytest.mark.parametrize("recipe,stage,link,architecture", LINKS)
def test_a_hub_id_link_is_checked_at_its_own_revision(recipe, stage, link, architecture, tmp_path):
    """Offline and not cached, a Hub model is a note for plan and an error for run, whichever link names it."""
    where = f"stages.{stage}.{link}"
    spec = _resolve(tmp_path, f"recipe={recipe}", f"++{where}=someorg/model-x@r1")
    got = spec.stage(stage).links[link]
    assert (got.path, got.revision, got.external, got.trust_remote_code) == ("someorg/model-x", "r1", True, False)
    assert any(n.startswith(f"{where}: 'someorg/model-x' is not in the Hugging Face cache") for n in spec.notes)
    assert f"{where}: 'someorg/model-x' is not in the Hugging Face cache" in _problems(
        tmp_path, f"recipe={recipe}", f"++{where}=someorg/model-x@r1", run=True)


@pytest.mark.parametrize("recipe,stage,link,architecture", LINKS)
@pytest.mark.parametrize("given", ["hub", "folder"])
def test_remote_code_of_a_linked_model_needs_the_stages_consent(recipe, stage, link, architecture, given, tmp_path):
    """A judge given as a Hub id, or a model folder shipping its own code, is checked and needs consent exactly as a
    reward or value model does: model.trust_remote_code alone is refused, trust_remote_code_links allows it."""
    where = f"stages.{stage}"
    target = "someorg/model-with-code" if given == "hub" else str(_folder(tmp_path / "m", architecture))
    base = [f"recipe={recipe}", f"++{where}.{link}={target}"]
    if given == "folder":  # without remote code it cannot load: plan says how to allow it
        assert f"{where}.{link}: {target} needs Python code shipped with it" in _problems(tmp_path, *base)
    text = _problems(tmp_path, *base, "model.trust_remote_code=true")
    assert f"{where}.{link}: model.trust_remote_code is on and would also run code shipped with '{target}'" in text
    assert f"{where}.trust_remote_code_links=[{link}]" in text
    spec = _resolve(tmp_path, *base, "model.trust_remote_code=true", f"+{where}.trust_remote_code_links=[{link}]")
    assert spec.stage(stage).links[link].trust_remote_code is True
    assert link_table.load_settings(spec.stage(stage), link)["trust_remote_code"] is True  # its load settings


def test_an_unset_value_link_takes_the_reward_models_settings(tmp_path):
    spec = _resolve(tmp_path, "recipe=rlhf-ppo", "stages.ppo.reward=someorg/rm@abc")
    reward, value = spec.stage("ppo").links["reward"], spec.stage("ppo").links["value"]
    assert value == reward.replace(kind="value") and value.revision == "abc"


# -- a kind declares its plan-time rules -------------------------------------------------------------------------------
def test_a_kinds_ranges_check_and_sharding_rule_are_its_own(tmp_path, monkeypatch):
    """A throwaway kind registered like any other: its range of a TRL field replaces the shared one, its check runs
    on the resolved stage, and its reason not to run sharded is what plan says. None of it is in alignctl/config/."""
    seen = []

    def check(stage: StageSpec, where: str) -> list[str]:
        seen.append(stage)
        return [f"{where}: toy refuses max_steps 7"] if stage.args.get("max_steps") == 7 else []

    toy = StageKind(name="toy", config_class="trl.SFTConfig", data_kind="sft", summary="a test kind",
                    ranges={"weight_decay": POS}, check=check, sharded_unsupported="toys do not shard")
    monkeypatch.setitem(STAGES, "toy", toy)
    args = ["stages.sft.trainer=toy", "~stages.dpo"]
    spec = _resolve(tmp_path, *args)
    assert spec.stage("sft").kind == "toy" and seen[-1].name == "sft" and seen[-1].data.label == "data.sft"
    text = _problems(tmp_path, *args, "+stages.sft.weight_decay=0", "stages.sft.max_steps=7", "launcher=accelerate",
                     "launcher.config_file=zero3", "launcher.num_processes=2")
    assert "stages.sft.weight_decay: must be a number > 0, got 0" in text  # the shared rule allows 0
    assert "stages.sft: toy refuses max_steps 7" in text
    assert "stages.sft: a toy stage cannot run under DeepSpeed ZeRO-3: toys do not shard" in text
    assert "weight_decay" not in _problems(tmp_path, "+stages.sft.weight_decay=0", "stages.sft.max_steps=0")
