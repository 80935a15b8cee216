"""The store cannot be poisoned (issue 17: N8, F25, N11, N10, F11): a recipe that chooses output_root cannot hand the
run "completed" entries, checkpoints or cached models prepared by someone else. Entries, their upstream markers and
cached builds are sealed with the user's key (alignctl.trust); the default store takes only what the user sealed,
a store named on the command line is trusted with a log line. A downstream entry trained from other upstream
weights is trained again; merged weights are checked for NaN/inf on disk; a "before" measured on resumed weights
says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignctl import digests, fingerprint, models, pipeline, store, trust
from alignctl.cli import store as store_cli
from alignctl.config import resolve as config
from alignctl.config.compose import compose
from alignctl.errors import ConfigError
from alignctl.train import health
from conftest import REPO, one_thread_collecting_log, read_manifest, run_spec, stage_spec

LOG: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def single_thread_and_log():
    with one_thread_collecting_log(LOG):
        yield


@pytest.fixture(autouse=True)
def clear_log():
    LOG.clear()


RECIPE = """\
name: chosen-root
output_root: {root}
stages:
  sft: {{trainer: sft, data: sft, max_steps: 1, per_device_train_batch_size: 8, save_strategy: "no"}}
"""


def recipe(tmp_path: Path, root: Path, extra: str = "") -> str:
    """A recipe file that chooses where the run's default store and cache are (allowed in recipes)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(root=root) + extra)
    return f"recipe={path}"


def resolve(overrides: list[str], run_dir: Path) -> dict:
    return config.resolve(compose(overrides), run_dir)


def run(overrides: list[str], run_dir: Path) -> dict:
    return pipeline.run(resolve(overrides, run_dir), overrides)


def entries_for(overrides: list[str], tmp_path: Path) -> dict[str, store.Entry]:
    """The store entries a run with these overrides would use (fingerprints computed as the pipeline does)."""
    resolved = resolve(overrides, tmp_path / "fp-run")
    stages = pipeline._prepare(pipeline.stage_specs(resolved))
    fps = fingerprint.fingerprints(stages, resolved.launcher)
    return {s.name: store.Entry(resolved.store_dir, s.kind, fps[s.name]) for s in stages}


def plant_complete(entry: store.Entry) -> bytes:
    """What a recipe's author can prepare without the user's key: final/ with fake weights, metrics.json and a
    COMPLETE whose fingerprint and file records all match."""
    weights = os.urandom(4096)
    entry.final.mkdir(parents=True)
    (entry.final / "config.json").write_text('{"model_type": "llama"}')
    (entry.final / "model.safetensors").write_bytes(weights)
    (entry.dir / "metrics.json").write_text('{"train": {"train_loss": 0.1}}')
    files = {str(f.relative_to(entry.dir)): digests.record(f) for f in entry._kept_files()}
    rec = {"fingerprint": entry.fingerprint, "format": fingerprint.FORMAT, "completed": "2025-01-01T00:00:00",
           "host": "elsewhere", "keep_checkpoints": False, "bytes": sum(r["size"] for r in files.values()),
           "files": files, "stage": "sft", "trainer": "sft", "upstream": None}
    (entry.dir / "COMPLETE").write_text(json.dumps(rec))
    assert entry.complete() and entry.verify() == []  # every hash check passes: only the seal tells
    return weights


def plant_checkpoint(entry: store.Entry, marker: bool) -> Path:
    """A resumable-looking checkpoint-999999/ in an incomplete entry (F25), optionally with an unsealed marker."""
    import torch
    from safetensors.torch import save_file

    ckpt = entry.dir / "checkpoints" / "checkpoint-999999"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"global_step": 999999}')
    save_file({"w": torch.zeros(4)}, str(ckpt / "model.safetensors"))
    (ckpt / "optimizer.pt").write_bytes(b"not a pickle you want to load")
    if marker:
        (entry.dir / "upstream.json").write_text('{"digest": "x"}')
    assert store.checkpoint_problem(ckpt) is None
    return ckpt


def fast(*more: str) -> list[str]:
    return ["eval.enabled=false", *more]


# -- N8: a prepared "complete" entry -------------------------------------------------------------------------------
def test_a_prepared_entry_in_the_default_store_is_refused_before_anything_trains(tmp_path):
    root = tmp_path / "prepared"
    ov = [recipe(tmp_path, root), *fast()]
    sft = entries_for(ov, tmp_path)["sft"]
    assert sft.dir.parent == root / ".store"
    plant_complete(sft)
    with pytest.raises(ConfigError) as e:
        run(ov, tmp_path / "run")
    (line,) = e.value.problems
    assert f"store entry {sft.dir} was not written by you (COMPLETE not sealed)" in line
    assert "name the store on the command line (store=DIR)" in line and "ALIGNCTL_KEY_FILE" in line
    assert not (tmp_path / "run" / "sft" / "final").exists(), "the author's weights were placed"
    m = read_manifest(tmp_path / "run")
    assert m["status"] == "failed" and [s["status"] for s in m["stages"]] == ["pending"]
    assert not any("starting from" in line or "reusing" in line for line in LOG)


def test_the_same_entry_in_a_store_named_on_the_command_line_is_trusted_and_said_so(tmp_path):
    root = tmp_path / "prepared"
    ov = [recipe(tmp_path, root), f"store={root / '.store'}", *fast()]
    sft = entries_for(ov, tmp_path)["sft"]
    weights = plant_complete(sft)
    m = run(ov, tmp_path / "run")
    assert m["status"] == "completed" and m["stages"][0]["reused_from"] == str(sft.dir)
    assert (tmp_path / "run" / "sft" / "final" / "model.safetensors").read_bytes() == weights
    said = [line for line in LOG if "trusted because the store was named" in line]
    assert len(said) == 1 and f"store entry {sft.dir} was not written by you (COMPLETE not sealed)" in said[0]


def test_an_entry_sealed_with_another_key_is_refused_in_the_default_store(tmp_path, monkeypatch, user_key):
    root = tmp_path / "shared"
    ov = [recipe(tmp_path, root), *fast()]
    sft = entries_for(ov, tmp_path)["sft"]
    monkeypatch.setenv(trust.KEY_ENV, str(tmp_path / "colleague" / "key"))
    other = trust.key_id()
    sft.final.mkdir(parents=True)
    (sft.final / "model.safetensors").write_bytes(b"w" * 100)
    sft.mark_complete({}, extra={"stage": "sft", "trainer": "sft", "upstream": None})
    monkeypatch.setenv(trust.KEY_ENV, str(user_key))
    assert trust.key_id() != other and sft.complete() and sft.verify() == []
    with pytest.raises(ConfigError, match=rf"was not written by you \(COMPLETE sealed by .*@.* key {other}\)"):
        run(ov, tmp_path / "run")
    # a seal of this user's key over a record changed afterwards (e.g. its hashes swapped) does not verify either
    rec = sft.record()
    mine = trust.sealed(rec)
    mine["files"]["final/model.safetensors"]["sha256"] = "0" * 64
    os.chmod(sft.dir / "COMPLETE", 0o644)
    (sft.dir / "COMPLETE").write_text(json.dumps(mine))
    with pytest.raises(ConfigError, match="changed since: its seal does not verify"):
        run(ov, tmp_path / "run2")


def test_an_entry_the_user_trained_is_reused_from_the_default_store(tmp_path):
    ov = [recipe(tmp_path, tmp_path / "mine"), *fast()]
    first = run(ov, tmp_path / "run1")
    sft = entries_for(ov, tmp_path)["sft"]
    assert first["status"] == "completed" and not first["stages"][0]["reused_from"]
    rec = sft.record()
    assert trust.check(rec)[0] and rec["sealed_by"]["key"] == trust.key_id() and "uid" in rec["sealed_by"]
    assert trust.check(sft.marker())[0] and sft.marker()["fingerprint"] == sft.fingerprint
    second = run(ov, tmp_path / "run2")
    assert second["stages"][0]["reused_from"] == str(sft.dir)
    assert not any("was not written by you" in line or "building it again" in line for line in LOG)


# -- F25: a planted checkpoint --------------------------------------------------------------------------------------
@pytest.mark.parametrize("marker", [False, True], ids=["no-marker", "unsealed-marker"])
def test_a_planted_checkpoint_in_an_unsealed_entry_is_not_resumed_from(tmp_path, marker):
    ov = [recipe(tmp_path, tmp_path / "prepared"), *fast()]
    sft = entries_for(ov, tmp_path)["sft"]
    ckpt = plant_checkpoint(sft, marker)
    with pytest.raises(ConfigError, match=rf"store entry {sft.dir} was not written by you \(upstream.json not "
                                          "sealed\\)"):
        run(ov, tmp_path / "run")
    assert not any("resuming" in line for line in LOG) and ckpt.is_dir()


def test_the_seal_is_checked_again_under_the_lock_just_before_use(tmp_path):
    """An entry planted after the run's up-front check (while an earlier stage trains) is refused when it is
    reached; in a named store it is used with the log line."""
    e = store.Entry(tmp_path / "store", "sft", "c" * 64)
    plant_checkpoint(e, marker=False)
    spec_ = run_spec(tmp_path / "run", tmp_path / "store", stage_spec("sft", run_dir=tmp_path / "run"))
    (tmp_path / "run").mkdir()
    manifest = pipeline.Manifest(spec_, [])
    with pytest.raises(ConfigError, match="upstream.json not sealed"):  # nothing trains: refused under the lock
        pipeline._run_one(spec_.stages[0], e, manifest, trusted_store=False)
    assert manifest.stage("sft")["status"] == "failed"
    e.check_seal(spec_.stages[0], trusted_store=True)
    assert any("trusted because the store was named" in line for line in LOG)
    assert store.Entry(tmp_path / "store", "sft", "d" * 64).trust_state() is None  # nothing there: nothing to trust


# -- N8: the model cache under output_root ---------------------------------------------------------------------------
def test_a_tampered_or_unsealed_tiny_model_cache_is_rebuilt(tmp_path, monkeypatch, user_key):
    cache = tmp_path / ".cache"
    out = Path(models.materialize("tiny:llama", cache))
    assert models._build_problem(out) is None
    weights = out / "model.safetensors"

    def tampered(how) -> None:
        how()
        LOG.clear()
        assert models.materialize("tiny:llama", cache) == str(out)
        assert models._build_problem(out) is None, "not rebuilt"
        assert any("building it again" in line for line in LOG)

    def prepared():  # an author's folder: config.json and weights, no marker
        (out / models.BUILT).unlink()
        weights.write_bytes(b"author's weights")

    tampered(prepared)
    assert weights.read_bytes() != b"author's weights"
    tampered(lambda: (out / "config.json").write_text('{"model_type": "llama", "auto_map": {}}'))
    tampered(lambda: (out / "model.safetensors.index.json").write_text("{}"))  # a file the marker does not list

    def resealed_by_someone_else():
        marker = json.loads((out / models.BUILT).read_text())
        monkeypatch.setenv(trust.KEY_ENV, str(tmp_path / "other-key"))
        (out / models.BUILT).write_text(json.dumps(trust.sealed(marker)))
        monkeypatch.setenv(trust.KEY_ENV, str(user_key))

    tampered(resealed_by_someone_else)
    assert not list(cache.glob("*.tmp*")) and not list(cache.glob("*.old*")), "temporary folders left behind"


# -- N11: a downstream entry trained from other upstream weights ------------------------------------------------------
def test_removing_the_upstream_entry_retrains_the_downstream_stage(tmp_path, capsys):
    ov = [recipe(tmp_path, tmp_path / "out", "  dpo: {trainer: dpo, from: sft, data: prefs, max_steps: 1, "
                 "per_device_train_batch_size: 8, save_strategy: \"no\"}\n"), *fast()]
    first = run(ov, tmp_path / "run1")
    assert [s["reused_from"] for s in first["stages"]] == [None, None]
    sft = next(s for s in first["stages"] if s["name"] == "sft")
    assert store_cli.run(["rm", "--store", first["store_dir"], sft["fingerprint"][:12]]) == 0
    second = run(ov, tmp_path / "run2")
    dpo = next(s for s in second["stages"] if s["name"] == "dpo")
    assert [s["reused_from"] for s in second["stages"]] == [None, None], "DPO reused on top of the old SFT"
    assert "trained again" in dpo["retrained"]
    assert any("stage dpo: store entry" in line and "training it again" in line for line in LOG)
    assert "dpo: trained again" in (tmp_path / "run2" / "report.md").read_text()
    third = run(ov, tmp_path / "run3")  # nothing changed since: both reused
    assert all(s["reused_from"] for s in third["stages"])


# -- N10: merged weights are checked (in memory for LoRA, on disk after a 4-bit or gathered merge) -----------------
def test_a_merged_final_with_a_nan_tensor_fails_the_stage(tmp_path, monkeypatch):
    from alignctl.errors import StageFailed

    merge = models.merge_loaded

    def merge_overflowing(model, tokenizer):  # as a merge into fp16 base weights that overflows
        merged = merge(model, tokenizer)
        next(p for p in merged.parameters() if p.is_floating_point()).data.view(-1)[0] = float("nan")
        return merged

    monkeypatch.setattr(models, "merge_loaded", merge_overflowing)
    ov = [recipe(tmp_path, tmp_path / "out"), "peft=lora", *fast()]
    with pytest.raises(StageFailed, match=r"non-finite merged weights \("):
        run(ov, tmp_path / "run")
    assert not list((tmp_path / "out" / ".store").glob("*/COMPLETE"))


def test_saved_weights_check_streams_every_tensor(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.ones(3, dtype=torch.bfloat16), "ids": torch.arange(3)}, str(tmp_path / "one.safetensors"))
    health.check_saved_finite(tmp_path, "s")
    save_file({"b": torch.tensor([1.0, float("inf")], dtype=torch.float16)}, str(tmp_path / "two.safetensors"))
    from alignctl.errors import StageFailed

    with pytest.raises(StageFailed, match=r"saved weights \(b\)"):
        health.check_saved_finite(tmp_path, "s")


# -- F11: "before" measured on resumed weights -------------------------------------------------------------------------
def test_a_sharded_before_measured_after_a_resume_is_marked_and_reported(tmp_path):
    from alignctl import report
    from alignctl.train import lifecycle

    assert lifecycle.before_resumed(True, "/store/sft-x/checkpoints/checkpoint-20") == {"before_resumed": True}
    assert lifecycle.before_resumed(True, None) == {} and lifecycle.before_resumed(False, "/c") == {}
    m = {"recipe": "r", "status": "completed", "run_dir": str(tmp_path), "final_model": "x", "stages": [
        {"name": "sft", "trainer": "sft", "status": "completed",
         "metrics": {"before": {"eval_loss": 2.0}, "after": {"eval_loss": 1.0}, "before_resumed": True}}]}
    text = report.write_run_report(m).read_text()
    assert "(resumed)" in text
    assert "measured on the weights resumed from a checkpoint" in text


# -- the key ---------------------------------------------------------------------------------------------------------
def test_two_first_runs_racing_to_create_the_key_use_the_same_one(tmp_path):
    env = {**os.environ, trust.KEY_ENV: str(tmp_path / "cfg" / "key"), "PYTHONPATH": str(REPO)}
    code = "from alignctl import trust; print(trust.key_id())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    ids = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(ids) == 1 and all(len(i) == 8 for i in ids)
    assert (tmp_path / "cfg" / "key").stat().st_mode & 0o777 == 0o600


def test_a_key_that_cannot_be_made_or_read_is_one_clean_line(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(trust.KEY_ENV, str(tmp_path / "a-file" / "key"))
    with pytest.raises(ConfigError) as e:
        trust.key()
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith("ALIGNCTL_KEY_FILE: cannot create")
    (tmp_path / "garbage").write_text("not hex\n")
    monkeypatch.setenv(trust.KEY_ENV, str(tmp_path / "garbage"))
    with pytest.raises(ConfigError, match="does not hold a key"):
        trust.key()


def test_the_test_session_never_uses_the_users_own_key(user_key):
    assert trust.key_path() == Path(user_key) and Path(user_key).parent != Path("~/.config/alignctl").expanduser()
