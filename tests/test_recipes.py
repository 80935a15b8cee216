"""Every recipe composes and validates; the real recipes run end to end on the tiny model and synthetic data."""

from __future__ import annotations

import subprocess
import sys

import pytest

from alignctl.cli import main
from alignctl.config.compose import available_recipes, compose
from alignctl.config.resolve import resolve
from conftest import REPO, read_manifest, run_cli

# The command documented in the README for trying the Zephyr recipe on a CPU (plus small-batch settings for speed).
TINY = ["model=tiny", "data=synthetic", "precision=auto"]


@pytest.mark.parametrize("recipe", sorted(available_recipes()))
def test_every_recipe_composes_and_validates(recipe, tmp_path):
    cfg = compose([f"recipe={recipe}"])
    resolved = resolve(cfg, tmp_path)
    assert resolved.recipe == recipe and resolved.stages
    assert cfg.description, f"recipe {recipe} needs a description for `alignctl recipes`"


def test_recipes_command_lists_every_recipe_with_description(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in available_recipes():
        assert name in out


def test_plan_does_not_import_torch():
    code = ("import sys; from alignctl.cli import main; rc = main(['plan', 'recipe=zephyr-dpo']); "
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'datasets', 'peft') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    assert "mistralai/Mistral-7B-v0.1" in proc.stdout and "reference  ← sft" in proc.stdout


def test_zephyr_recipe_keeps_published_hyperparameters(tmp_path):
    s = resolve(compose(["recipe=zephyr-dpo"]), tmp_path)
    sft, dpo = s.stages
    assert s.model.name_or_path == "mistralai/Mistral-7B-v0.1" and s.precision == "bf16"
    assert sft.data.path == "HuggingFaceH4/ultrachat_200k" and sft.data.eval_split == "test_sft"
    assert dpo.data.path == "HuggingFaceH4/ultrafeedback_binarized" and dpo.data.split == "train_prefs"
    a = sft.args
    assert (a["learning_rate"], a["num_train_epochs"], a["lr_scheduler_type"], a["warmup_steps"], a["max_length"]) == (
        2e-5, 1, "cosine", 0.1, 2048)
    assert a["seed"] == 42
    b = dpo.args
    assert (b["beta"], b["learning_rate"], b["num_train_epochs"], b["max_length"]) == (0.01, 5e-7, 1, 1024)
    assert dpo.links["ref"].path == dpo.links["from"].path == str(tmp_path.absolute() / "sft" / "final")
    # Zephyr's global batch of 128 on any world size: accumulation is derived from it (the per-device batches are
    # the published ones, 16 for SFT and 8 for DPO).
    for world, ov in ((1, []), (8, ["launcher=torchrun", "launcher.nproc_per_node=8"]), (4, ["launcher=torchrun",
                                                                                           "launcher.nproc_per_node=4"])):
        stages = resolve(compose(["recipe=zephyr-dpo", *ov]), tmp_path / str(world)).stages
        for st, per_device in zip(stages, (16, 8)):
            args = st.args
            assert args["per_device_train_batch_size"] == per_device
            assert per_device * args["gradient_accumulation_steps"] * world == 128, (st.name, world)


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


def test_orpo_runs_end_to_end_on_tiny_model_and_learns(run_recipe, tmp_path):
    m = run_recipe(["recipe=orpo", *TINY, "stages.orpo.learning_rate=3e-3", "stages.orpo.warmup_steps=0",
                    "stages.orpo.per_device_train_batch_size=16", "stages.orpo.num_train_epochs=3",
                    "stages.orpo.activation_checkpointing=false"], tmp_path / "run")
    (orpo,) = m["stages"]
    assert orpo["status"] == "completed"
    assert orpo["metrics"]["after"]["eval_pref_accuracy"] > orpo["metrics"]["before"]["eval_pref_accuracy"]
    assert orpo["metrics"]["after"]["eval_pref_accuracy"] >= 0.8


def test_multirun_beta_sweep_writes_one_manifest_per_point(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["run", "-m", "stages.dpo.beta=0.05,0.5", f"hydra.sweep.dir={sweep}",
                    f"output_root={tmp_path}/outputs", "stages.sft.num_train_epochs=2",
                    "stages.dpo.num_train_epochs=1"], cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifests = [read_manifest(sweep / str(i)) for i in range(2)]
    assert all(m["status"] == "completed" for m in manifests)
    betas = [m["overrides"] for m in manifests]
    assert any("beta=0.05" in o for o in betas[0]) and any("beta=0.5" in o for o in betas[1])
    specs = [(sweep / str(i) / "dpo" / "spec.json").read_text() for i in range(2)]
    assert '"beta": 0.05' in specs[0] and '"beta": 0.5' in specs[1]


def test_hydra_cfg_flag_prints_config_without_training(tmp_path):
    proc = run_cli(["run", "--cfg", "job", "stages.dpo.beta=0.3", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "stages:" in proc.stdout and "beta: 0.3" in proc.stdout
    assert not (tmp_path / "run" / "manifest.json").exists()


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
