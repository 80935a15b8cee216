"""Bad input: one-screen message naming the problem, non-zero exit, no traceback, nothing trained or completed."""

from __future__ import annotations

import json

import pytest

from alignctl.cli import main
from conftest import read_manifest, run_cli


def plan_error(capsys, *args) -> str:
    rc = main(["plan", *args])
    out = capsys.readouterr()
    assert rc == 2, out.out + out.err
    assert "Traceback" not in out.err + out.out
    assert len(out.err.splitlines()) < 25
    return out.err


def test_mistyped_trl_field_is_rejected_with_suggestion(capsys):
    err = plan_error(capsys, "stages.dpo.betta=0.1")
    assert "stages.dpo: unknown key 'betta'" in err and "did you mean 'beta'" in err


def test_wrong_type_of_trl_field(capsys):
    err = plan_error(capsys, "stages.dpo.beta=abc")
    assert "stages.dpo.beta: must be a float" in err


def test_unknown_recipe(capsys):
    err = plan_error(capsys, "recipe=zephyr-dop")
    assert "unknown recipe 'zephyr-dop'" in err and "did you mean 'zephyr-dpo'" in err


def test_missing_data_file(capsys, tmp_path):
    err = plan_error(capsys, f"data.prefs.path={tmp_path}/nope.jsonl")
    assert "data.prefs.path: data file not found" in err and "nope.jsonl" in err


def test_dataset_missing_required_column(capsys, tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "chosen": "a", "answer_b": "b"}) + "\n")
    err = plan_error(capsys, f"data.prefs.path={f}")
    assert "missing column 'rejected'" in err and "stages.dpo" in err and "pairs.jsonl" in err


def test_from_naming_no_earlier_stage(capsys):
    err = plan_error(capsys, "stages.dpo.from=sfft")
    assert "stages.dpo.from: 'sfft' names no earlier stage" in err and "sft" in err


def test_unknown_trainer_and_secret_field(capsys):
    err = plan_error(capsys, "stages.dpo.trainer=dop", "stages.sft.hub_token=hf_secret")
    assert "unknown trainer 'dop'" in err and "did you mean 'dpo'" in err
    assert "HF_TOKEN" in err and "hf_secret" not in err


def test_unknown_top_level_and_model_keys(capsys):
    err = plan_error(capsys, "model.nam_or_path=x")
    assert "model: unknown key 'nam_or_path'" in err and "name_or_path" in err
    err = plan_error(capsys, "precison=bf16")
    assert "precison: unknown key (did you mean 'precision'?)" in err


def test_run_rejects_typo_before_training(tmp_path):
    """Through the real CLI (Hydra app): exit 2, no traceback, no run directory content marked complete."""
    run_dir = tmp_path / "run"
    proc = run_cli(["run", "stages.dpo.betta=0.1", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown key 'betta'" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert not (run_dir / "manifest.json").exists()
    assert not list(run_dir.glob("*/final"))


def test_value_rejected_by_trl_fails_before_any_model_loads(run_recipe, tmp_path):
    """A combination only TRL judges (DPOConfig: one weight per loss type) fails when `run` builds every stage's TRL
    config up front: before the manifest says anything ran, before any model loads, nothing trained."""
    from alignctl.errors import ConfigError

    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        run_recipe(["stages.dpo.loss_weights=[1.0,2.0,3.0]"], run_dir)
    msg = str(e.value)
    assert msg.startswith("stages.dpo: trl.DPOConfig rejects the settings") and "loss_weights" in msg, msg
    m = read_manifest(run_dir)
    assert m["status"] == "failed" and [s["status"] for s in m["stages"]] == ["pending", "pending"]
    assert not (run_dir / "sft").exists()
