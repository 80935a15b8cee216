"""Public data sets exactly as published (tests/fixtures/public) train every stage kind that fits them on the tiny
model, and the held-out metric moves the right way (their schemas and conversions: tests/unit/test_public_data.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from alignctl import pipeline
from alignctl.config.compose import compose
from alignctl.config.resolve import resolve
from conftest import REPO, one_thread_collecting_log

sys.path.insert(0, str(REPO / "tests" / "fixtures" / "public"))
from published import PAIR_SETS, SFT_SETS, data_spec  # noqa: E402

pytestmark = pytest.mark.slow
LOG: list[str] = []

FAST = {"num_train_epochs": 2, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 32, "max_length": 96,
        "logging_steps": 8, "save_strategy": "no", "activation_checkpointing": False}
PAIR_KINDS = {"dpo": {"learning_rate": 5.0e-3, "beta": 0.1}, "orpo": {"learning_rate": 5.0e-3},
              "cpo": {"learning_rate": 5.0e-3}, "reward": {"learning_rate": 5.0e-3}, "kto": {"learning_rate": 1.0e-3}}
RUNS: dict[str, tuple[Path, dict]] = {}


@pytest.fixture(scope="module", autouse=True)
def single_thread_and_log():
    with one_thread_collecting_log(LOG):
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_root):
    """Run one recipe (written to a file as a user would) per group of stages, once per module."""

    def _run(name: str, recipe: dict) -> tuple[Path, dict]:
        if name not in RUNS:
            folder = tmp_path_factory.mktemp(name)
            path = folder / f"{name}.yaml"
            path.write_text(yaml.safe_dump({"description": f"public data: {name}", **recipe}, sort_keys=False))
            ov = [f"recipe={path}", f"output_root={cache_root}", f"store={folder / 'store'}"]
            RUNS[name] = (folder / "run", pipeline.run(resolve(compose(ov), folder / "run"), ov))
        return RUNS[name]

    return _run


def stage(manifest: dict, name: str) -> dict:
    s = next(s for s in manifest["stages"] if s["name"] == name)
    assert s["status"] == "completed"
    return s["metrics"]


def test_sft_on_every_conversation_and_prompt_completion_set_lowers_held_out_loss(run):
    recipe = {"data": {n: data_spec(n) for n in SFT_SETS},
              "stages": {n: {"trainer": "sft", "data": n, "learning_rate": 3.0e-3, **FAST} for n in SFT_SETS}}
    _, m = run("sft_sets", recipe)
    for n in SFT_SETS:
        before, after = stage(m, n)["before"], stage(m, n)["after"]
        assert after["eval_loss"] < before["eval_loss"] - 1.0, (n, before["eval_loss"], after["eval_loss"])


@pytest.mark.parametrize("name", PAIR_SETS)
def test_every_preference_kind_learns_warm_over_cold_on_each_pair_set(run, name):
    stages = {kind: {"trainer": kind, "data": "pairs", **FAST, **extra} for kind, extra in PAIR_KINDS.items()}
    recipe = {"data": {"pairs": data_spec(name)}, "stages": stages}
    _, m = run(name, recipe)
    for kind in PAIR_KINDS:
        metric = "eval_accuracy" if kind == "reward" else "eval_pref_accuracy"
        before, after = stage(m, kind)["before"][metric], stage(m, kind)["after"][metric]
        assert after >= 0.9 and after > before, (name, kind, before, after)


def test_kto_on_the_unpaired_kto_mix_separates_desirable_from_undesirable(run):
    recipe = {"data": {"mix": data_spec("kto_mix_14k")},
              "stages": {"kto": {"trainer": "kto", "data": "mix", **FAST, "learning_rate": 5.0e-3}}}
    _, m = run("kto_mix", recipe)
    before, after = stage(m, "kto")["before"], stage(m, "kto")["after"]
    assert before["eval_rewards/chosen"] == pytest.approx(0, abs=1e-4)  # policy = reference before training
    assert after["eval_rewards/chosen"] > after["eval_rewards/rejected"] + 0.5, after


ON_POLICY = {"learning_rate": 3.0e-3, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 16,
             "logging_steps": 5, "save_strategy": "no", "activation_checkpointing": False}


def test_on_policy_kinds_raise_the_reward_on_public_prompt_sets(run):
    """SFT on UltraChat (answers half warm, half cold) -> reward model on UltraFeedback pairs -> GRPO on
    trl-lib/ultrafeedback-prompt, RLOO on UltraFeedback-binarized's train_gen split (a pair set used as prompts)
    and PPO on HH transcripts (multi-turn prompts). Each raises the reward model's score of its answers to held-out
    prompts: GRPO/RLOO's eval_reward, PPO's eval_rm_score."""
    recipe = {
        "data": {"chat": data_spec("ultrachat_200k"), "prefs": data_spec("ultrafeedback_binarized"),
                 "prompts": data_spec("ultrafeedback_prompt"), "gen": data_spec("ultrafeedback_binarized:gen"),
                 "hh": data_spec("hh_rlhf")},
        "stages": {
            "sft": {"trainer": "sft", "data": "chat", **FAST, "num_train_epochs": 16, "learning_rate": 3.0e-3,
                    "lr_scheduler_type": "cosine"},
            "rm": {"trainer": "reward", "from": "sft", "data": "prefs", **FAST, "learning_rate": 1.0e-3},
            "grpo": {"trainer": "grpo", "from": "sft", "reward": "rm", "data": "prompts", **ON_POLICY,
                     "num_generations": 4, "max_completion_length": 16, "beta": 0.04, "max_steps": 40},
            "rloo": {"trainer": "rloo", "from": "sft", "reward": "rm", "data": "gen", **ON_POLICY,
                     "num_generations": 4, "max_completion_length": 16, "max_steps": 40},
            "ppo": {"trainer": "ppo", "from": "sft", "reward": "rm", "data": "hh", **ON_POLICY,
                    "per_device_eval_batch_size": 32, "total_episodes": 192, "num_mini_batches": 1,
                    "num_ppo_epochs": 4, "kl_coef": 0.05, "response_length": 16, "temperature": 1.0,
                    "stop_token": "eos", "missing_eos_penalty": 1.0},
        },
    }
    _, m = run("on_policy", recipe)
    assert stage(m, "rm")["after"]["eval_accuracy"] >= 0.9
    for kind, metric in (("grpo", "eval_reward"), ("rloo", "eval_reward"), ("ppo", "eval_rm_score")):
        before, after = stage(m, kind)["before"][metric], stage(m, kind)["after"][metric]
        assert after > before + 0.3, (kind, before, after)
    # The pair sets gave their prompts only, and the log says so once per data set (data is loaded twice: in the
    # pre-flight check and by the stage).
    for label, dropped in (("data.gen", "chosen, rejected, messages"), ("data.hh", "chosen, rejected")):
        notes = [line for line in LOG if line.startswith(f"{label}: ") and "used its prompts only" in line]
        assert len(notes) == 1 and dropped in notes[0], notes
