"""Bundled artefacts stay in sync with their sources: the TRL field snapshot and the synthetic data."""

from __future__ import annotations

import json

from alignctl import synthetic, trl_fields


def test_trl_field_snapshot_matches_installed_trl():
    saved = json.loads(trl_fields.SNAPSHOT.read_text())
    fresh = json.loads(json.dumps(trl_fields.generate()))
    assert saved["trl"] == fresh["trl"], "TRL version changed: run `python -m alignctl.trl_fields`"
    for cls, fields in fresh["configs"].items():
        assert cls in saved["configs"], f"{cls} missing from the snapshot: run `python -m alignctl.trl_fields`"
        assert set(saved["configs"][cls]) == set(fields), f"fields of {cls} changed: run `python -m alignctl.trl_fields`"
        for name, entry in fields.items():
            assert saved["configs"][cls][name]["type"] == entry["type"], f"{cls}.{name}"
            # choice fields (loss_type, lr_scheduler_type, optim, ...) are validated against these at plan time
            assert saved["configs"][cls][name].get("choices") == entry.get("choices"), \
                f"choices of {cls}.{name} changed: run `python -m alignctl.trl_fields`"
    dpo = saved["configs"]["trl.DPOConfig"]
    assert {"sigmoid", "ipo", "hinge"} <= set(dpo["loss_type"]["choices"]) and "cosine" in dpo["lr_scheduler_type"]["choices"]


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
