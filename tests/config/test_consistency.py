"""Bundled artefacts stay in sync with their sources: the TRL field snapshot and the synthetic data."""

from __future__ import annotations

import json

from alignctl import synthetic
from alignctl.config import trl_fields


def test_trl_field_snapshot_matches_installed_trl():
    saved = json.loads(trl_fields.SNAPSHOT.read_text())
    fresh = json.loads(json.dumps(trl_fields.generate()))
    assert saved["trl"] == fresh["trl"], "TRL version changed: run `python -m alignctl.config.trl_fields`"
    for cls, fields in fresh["configs"].items():
        assert cls in saved["configs"], f"{cls} missing from the snapshot: run `python -m alignctl.config.trl_fields`"
        assert set(saved["configs"][cls]) == set(fields), (
            f"fields of {cls} changed: run `python -m alignctl.config.trl_fields`")
        for name, entry in fields.items():
            assert saved["configs"][cls][name]["type"] == entry["type"], f"{cls}.{name}"
            # choice fields (loss_type, lr_scheduler_type, optim, ...) are validated against these at plan time
            assert saved["configs"][cls][name].get("choices") == entry.get("choices"), \
                f"choices of {cls}.{name} changed: run `python -m alignctl.config.trl_fields`"
    dpo = saved["configs"]["trl.DPOConfig"]
    assert {"sigmoid", "ipo", "hinge"} <= set(dpo["loss_type"]["choices"])
    assert "cosine" in dpo["lr_scheduler_type"]["choices"]


def test_stage_configs_resolve_on_the_installed_trl_and_ppo_keeps_its_field_names():
    """Each stage kind's config class imports from where the installed TRL (or alignctl, for PPO) keeps it, and PPO's
    own config accepts the field names recipes written for TRL 1.12's PPOConfig use, plus the adaptive KL fields."""
    import importlib

    from alignctl.stages import STAGES

    for kind in STAGES.values():
        module, _, name = kind.config_class.rpartition(".")
        assert hasattr(importlib.import_module(module), name), kind.config_class
    assert STAGES["ppo"].config_class == "alignctl.rl.ppo_config.PPOConfig"
    ppo = trl_fields.fields("alignctl.rl.ppo_config.PPOConfig")
    for field in ("kl_coef", "kl_estimator", "cliprange", "cliprange_value", "vf_coef", "gamma", "lam",
                  "num_ppo_epochs", "num_mini_batches", "whiten_rewards", "missing_eos_penalty", "stop_token",
                  "stop_token_id", "response_length", "temperature", "total_episodes",
                  "local_rollout_forward_batch_size", "per_device_train_batch_size", "gradient_accumulation_steps",
                  "learning_rate", "lr_scheduler_type", "seed", "logging_steps", "save_steps", "kl_target",
                  "kl_horizon"):
        assert field in ppo, field
    assert ppo["kl_estimator"]["choices"] == ["k1", "k3"] and ppo["stop_token"]["choices"] == ["eos", None]


def test_bundled_synthetic_data_matches_generator():
    for name in synthetic.SETS:
        rows = [json.loads(line) for line in (synthetic.DATA_DIR / f"{name}.jsonl").read_text().splitlines()]
        assert rows == synthetic.build(name), f"{name}.jsonl is stale: run `python -m alignctl.synthetic`"


def test_synthetic_pairs_are_clear_and_length_matched():
    for row in synthetic.build("prefs"):
        chosen, rejected = row["chosen"][0]["content"].split(), row["rejected"][0]["content"].split()
        assert len(chosen) == len(rejected)
        assert set(chosen) & set(synthetic.WARM) and not set(chosen) & set(synthetic.COLD)
        assert set(rejected) & set(synthetic.COLD)
