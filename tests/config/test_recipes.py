"""Every recipe composes and validates at plan time; the Zephyr recipe keeps its published hyperparameters; `plan`
imports no torch (the runs: tests/e2e/test_recipes_run.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from alignctl.cli import main
from alignctl.config.compose import available_recipes, compose
from alignctl.config.resolve import resolve
from conftest import REPO, run_cli


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


def test_hydra_cfg_flag_prints_config_without_training(tmp_path):
    proc = run_cli(["run", "--cfg", "job", "stages.dpo.beta=0.3", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "stages:" in proc.stdout and "beta: 0.3" in proc.stdout
    assert not (tmp_path / "run" / "manifest.json").exists()


