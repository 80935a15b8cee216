"""Adding a TRL-backed stage kind is one module and one registry line: a module written here, outside the package,
registered with one line, plans, trains one step on the built-in tiny model through the one lifecycle
(alignctl.train.lifecycle) and yields a loadable final/ with its headline metric before and after."""

from __future__ import annotations

import importlib.util

import pytest

from alignctl import stages

KIND_MODULE = '''
"""A throwaway stage kind: TRL's SFTTrainer under a name of its own."""

from alignctl.stages import StageKind


def build(ctx):
    from trl import SFTConfig, SFTTrainer

    return SFTTrainer(model=ctx.load_policy(), args=ctx.trl_config(SFTConfig), processing_class=ctx.tokenizer,
                      train_dataset=ctx.train, eval_dataset=ctx.eval, peft_config=ctx.peft_config())


KIND = StageKind(name="throwaway", config_class="trl.SFTConfig", data_kind="sft", summary="SFT by another name",
                 build=build)
'''


@pytest.fixture
def throwaway(tmp_path):
    path = tmp_path / "throwaway_kind.py"
    path.write_text(KIND_MODULE)
    spec = importlib.util.spec_from_file_location("throwaway_kind", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    stages.register(mod)  # the one registry line (a kind of the package: its name in stages._MODULES)
    yield mod
    stages.unregister("throwaway")


def test_a_registered_kind_plans_trains_and_yields_a_loadable_final_model(throwaway, run_recipe, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from alignctl.cli import main

    recipe = tmp_path / "throwaway.yaml"
    recipe.write_text("name: throwaway\nstages:\n  t:\n    trainer: throwaway\n    data: sft\n    max_steps: 1\n"
                      "    save_strategy: 'no'\n")
    assert main(["plan", f"recipe={recipe}", f"output_root={tmp_path}/out"]) == 0
    assert "throwaway" in capsys.readouterr().out
    m = run_recipe([f"recipe={recipe}", "eval.enabled=false"], tmp_path / "run")
    (t,) = m["stages"]
    assert (t["trainer"], t["status"]) == ("throwaway", "completed")
    head = throwaway.KIND.headline  # eval_loss, the default
    assert head in t["metrics"]["before"] and head in t["metrics"]["after"], t["metrics"]
    assert "train_loss" in t["metrics"]["train"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "t" / "final")
    assert model.num_parameters() > 0
    assert (tmp_path / "run" / "t" / "log_history.json").is_file()


def test_a_kind_without_build_is_refused(tmp_path):
    path = tmp_path / "no_build.py"
    path.write_text(KIND_MODULE.replace("\n                 build=build)", ")"))
    spec = importlib.util.spec_from_file_location("no_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(TypeError, match="declares no build"):
        stages.register(mod)
    assert "throwaway" not in stages.STAGES
