"""The shipped recipes run end to end: on the tiny model and synthetic data, on files laid out like their real data
sets, and from a user's own recipe file (a Hydra multirun sweep: tests/e2e/test_store.py)."""

from __future__ import annotations

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

# The command documented in the README for trying the Zephyr recipe on a CPU (plus small-batch settings for speed).
TINY = ["model=tiny", "data=synthetic", "precision=auto"]


def test_zephyr_dpo_runs_end_to_end_on_tiny_model(run_recipe, tmp_path):
    m = run_recipe(["recipe=zephyr-dpo", *TINY, "stages.sft.activation_checkpointing=false",
                    "stages.dpo.activation_checkpointing=false"], tmp_path / "run")
    assert m["status"] == "completed" and [s["status"] for s in m["stages"]] == ["completed", "completed"]
    assert (tmp_path / "run" / "dpo" / "final" / "model.safetensors").is_file()


# Files laid out exactly like the recipes' real data sets (tests/fixtures/public); the command in the README. Only the
# model, `precision=auto` (the recipes say bf16, which a CPU cannot run) and each data set's path are overridden.
PUBLIC = REPO / "tests" / "fixtures" / "public"
ON_FIXTURES = ["model=tiny", "precision=auto", f"data.sft.path={PUBLIC / 'ultrachat_200k'}",
               f"data.prefs.path={PUBLIC / 'ultrafeedback_binarized'}"]


@pytest.mark.parametrize("recipe", ["zephyr-dpo", "orpo"])
def test_real_recipes_run_on_files_shaped_like_their_datasets(recipe, run_recipe, tmp_path):
    """UltraChat-200k (string prompt + messages) for SFT, UltraFeedback-binarized (string prompt + full
    conversations, scores) for DPO/ORPO, with the recipes' own splits, hyperparameters and global batch."""
    m = run_recipe([f"recipe={recipe}", *ON_FIXTURES], tmp_path / "run")
    assert m["status"] == "completed" and all(s["status"] == "completed" for s in m["stages"])
    last = m["stages"][-1]
    # The held-out preference accuracy was computed on the 32 converted test_prefs pairs (a multiple of 1/32).
    for phase in ("before", "after"):
        assert (last["metrics"][phase]["eval_pref_accuracy"] * 64) % 1 == 0
    if recipe == "zephyr-dpo":
        assert m["stages"][0]["metrics"]["train"]["train_loss"] > 0


def test_user_recipe_file_outside_the_repo_runs(run_recipe, tmp_path):
    recipe = tmp_path / "elsewhere" / "my-recipe.yaml"
    recipe.parent.mkdir()
    recipe.write_text(
        "description: my own recipe\n"
        "data:\n  chat: {path: builtin:sft.jsonl, eval_size: 32}\n"
        "stages:\n  warmup:\n    trainer: sft\n    data: chat\n    num_train_epochs: 1\n"
        "    learning_rate: 3.0e-3\n    activation_checkpointing: false\n")
    m = run_recipe([f"recipe={recipe}"], tmp_path / "run")
    assert m["recipe"] == "my-recipe" and m["stages"][0]["name"] == "warmup" and m["status"] == "completed"
    after, before = m["stages"][0]["metrics"]["after"], m["stages"][0]["metrics"]["before"]
    assert after["eval_loss"] < before["eval_loss"]
