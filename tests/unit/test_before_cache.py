"""The "before" evaluation kept across sweep points (alignctl.train.before_cache): what its key covers, and a kept
file that is not the user's is ignored (the sweep that reads it back: tests/e2e/test_store.py)."""

from __future__ import annotations

import json

from alignctl import fingerprint
from alignctl.config.types import EvalSettings
from alignctl.train import before_cache
from conftest import stage_spec


def _spec(tmp_path, run_dir="run", **fields):
    base = dict(args={"beta": 0.1, "learning_rate": 1e-3, "per_device_eval_batch_size": 8, "max_length": 512},
                eval=EvalSettings(seed=42), cache_dir=str(tmp_path / "cache"))
    return stage_spec("dpo", "dpo", source="sft", run_dir=run_dir).replace(**{**base, **fields})


def test_the_key_follows_what_the_evaluation_reads_and_not_what_only_training_reads(tmp_path):
    key = lambda spec, upstream="u1": fingerprint.before_key(spec, upstream, None)  # noqa: E731
    base = key(_spec(tmp_path))
    # a sweep over training settings, another run folder: the same "before" evaluation
    assert key(_spec(tmp_path, args={"beta": 2.0, "learning_rate": 5e-7, "per_device_eval_batch_size": 8,
                                     "max_length": 512, "max_steps": 3})) == base
    assert key(_spec(tmp_path, run_dir=str(tmp_path / "elsewhere"))) == base
    # what it reads: the initial weights' content, its batches and cut, answer length, seed, and the weights' dtype
    assert key(_spec(tmp_path), "u2") != base
    assert key(_spec(tmp_path, args={"beta": 0.1, "per_device_eval_batch_size": 4, "max_length": 512})) != base
    assert key(_spec(tmp_path, args={"beta": 0.1, "per_device_eval_batch_size": 8, "max_length": 256})) != base
    assert key(_spec(tmp_path, eval=EvalSettings(seed=42, max_new_tokens=16))) != base
    assert key(_spec(tmp_path, eval=EvalSettings(seed=7))) != base
    assert key(_spec(tmp_path, precision="bf16")) != key(_spec(tmp_path, precision="fp32"))
    assert key(_spec(tmp_path, peft={"method": "lora", "r": 8})) != base


def test_a_kept_evaluation_is_read_back_only_when_sealed_by_this_user_for_this_key(tmp_path):
    spec = _spec(tmp_path).replace(before_key="k" * 64)
    assert before_cache.load(spec) == {}
    policy = {"prompts": 2, "samples": [[5, 6, 2], [7, 2]], "logps": [[-3.5, 3], [-1.25, 2]]}
    before_cache.save(spec, policy=policy, pref={"eval_pref_accuracy": 0.75})
    assert before_cache.load(spec) == {"policy": policy, "pref": {"eval_pref_accuracy": 0.75}}
    assert before_cache.load(spec.replace(before_key="j" * 64)) == {}  # another evaluation's key: not this file
    path = next((tmp_path / "cache" / "before-eval").iterdir())
    record = json.loads(path.read_text())
    record["pref"]["eval_pref_accuracy"] = 1.0  # edited by hand: the seal no longer verifies
    path.chmod(0o644)
    path.write_text(json.dumps(record))
    assert before_cache.load(spec) == {}


def test_the_trainers_own_evaluation_is_kept_only_where_the_kind_says_what_it_ignores(tmp_path):
    key = lambda spec: fingerprint.trainer_before_key(spec, "u1", None)  # noqa: E731
    sigmoid = key(_spec(tmp_path))
    # sigmoid DPO from its own reference: log-ratios 0 before training, so beta cannot change the metrics
    assert key(_spec(tmp_path, args={"beta": 2.0, "learning_rate": 5e-7, "per_device_eval_batch_size": 8,
                                     "max_length": 512})) == sigmoid
    assert key(_spec(tmp_path, args={"beta": 0.1, "learning_rate": 1e-3, "per_device_eval_batch_size": 4,
                                     "max_length": 512})) != sigmoid
    # IPO's loss at log-ratio 0 is 1/(4 beta^2): beta counts there
    ipo = lambda beta: key(_spec(tmp_path, args={"beta": beta, "loss_type": "ipo"}))  # noqa: E731
    assert ipo(0.1) != ipo(2.0)
    # SFT reads no training-only field when it evaluates; a kind that declares nothing evaluates every time
    sft = lambda **args: fingerprint.trainer_before_key(stage_spec("sft", "sft").replace(args=args), "u", None)  # noqa
    assert sft(learning_rate=1e-3) == sft(learning_rate=3e-4) != sft(learning_rate=1e-3, max_length=64)
    assert fingerprint.trainer_before_key(stage_spec("r", "reward"), "u1", None) is None
