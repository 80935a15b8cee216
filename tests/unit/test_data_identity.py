"""What a stage trained on is the bytes that were read (issue 17: N6, F3, F2): local data is loaded through a cache
keyed by its content and its files' full stat signatures, unchanged files are not hashed again, local model folders
are identified by content and re-checked when a stage starts, Hub models and data without a revision are noted, and
the environment that changes numerics is neutralised or fingerprinted."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from alignctl import data, digests, errors, fingerprint, models, pipeline
from alignctl.config.compose import compose
from alignctl.config.resolve import resolve
from alignctl.config.types import DataSpec

MTIME = (1700000000, 1700000000)  # what tar/zip extraction, cp -p, rsync -a, touch -r restore


def prepared(tmp_path, *overrides) -> list:
    resolved = resolve(compose(["~stages.dpo", f"output_root={tmp_path / 'out'}", *overrides]), tmp_path / "run")
    return pipeline._prepare(pipeline.stage_specs(resolved))


def fps(tmp_path, *overrides) -> dict[str, str]:
    resolved = resolve(compose([f"output_root={tmp_path / 'out'}", *overrides]), tmp_path / "run")
    return fingerprint.fingerprints(pipeline._prepare(pipeline.stage_specs(resolved)), resolved.launcher)


def write_rows(path: Path, word: str, n: int = 8) -> None:
    """SFT rows whose answers all say ``word``; the file keeps the same size and mtime whatever the word (4 chars)."""
    assert len(word) == 4
    path.write_text("".join(json.dumps({"prompt": f"Say a word ({i}).", "completion": f"The word is {word}."}) + "\n"
                            for i in range(n)))
    os.utime(path, MTIME)


# -- N6: the datasets cache never serves the rows of a replaced file -------------------------------------------------
def test_a_file_replaced_with_the_same_mtime_loads_its_new_rows(tmp_path):
    f = tmp_path / "d.jsonl"
    write_rows(f, "AAAA")
    first = prepared(tmp_path, f"data.sft.path={f}", "data.sft.eval_size=2")[0]
    train, held = data.load(first.data, "sft", "stages.sft")
    assert set(train["completion"]) | set(held["completion"]) == {"The word is AAAA."} and len(held) == 2
    write_rows(f, "BBBB")  # same path, size and mtime: the datasets library's own key is unchanged
    second = prepared(tmp_path, f"data.sft.path={f}", "data.sft.eval_size=2")[0]
    assert second.data.check.content != first.data.check.content
    train, held = data.load(second.data, "sft", "stages.sft")
    assert set(train["completion"]) | set(held["completion"]) == {"The word is BBBB."} and len(held) == 2
    with pytest.raises(errors.DataChanged, match="changed on disk since this run started"):
        data.load(first.data, "sft", "stages.sft")  # the spec fingerprinted A: B is refused, not trained on


def test_a_stage_trains_on_the_rows_of_the_replaced_file(tmp_path, run_recipe):
    """1-step SFT on rows A, then on rows B written over the same file with the same mtime: the second stage's
    training loss is that of a fresh file holding B (same fingerprint: identity is content), not that of A."""
    fast = ["~stages.dpo", "stages.sft.max_steps=1", "eval.enabled=false", "data.sft.eval_size=0",
            "stages.sft.per_device_train_batch_size=8"]

    def loss(path: Path, where: str) -> tuple[float, str]:
        m = run_recipe([*fast, f"data.sft.path={path}"], tmp_path / where / "run")
        return m["stages"][0]["metrics"]["train"]["train_loss"], m["stages"][0]["fingerprint"]

    f = tmp_path / "d.jsonl"
    write_rows(f, "AAAA")
    loss_a, fp_a = loss(f, "a")
    write_rows(f, "BBBB")
    loss_b, fp_b = loss(f, "b")
    fresh = tmp_path / "fresh" / "d.jsonl"
    fresh.parent.mkdir()
    write_rows(fresh, "BBBB")
    os.utime(fresh, None)  # another mtime: nothing cached anywhere
    loss_fresh, fp_fresh = loss(fresh, "c")
    assert fp_b == fp_fresh != fp_a
    assert loss_b == loss_fresh != loss_a


# -- F3: digests cached by full stat signature; model folders by content ---------------------------------------------
def test_unchanged_files_are_not_hashed_again_and_replaced_ones_are(tmp_path, monkeypatch):
    f = tmp_path / "d.jsonl"
    write_rows(f, "AAAA")
    d = DataSpec("local", str(f), "d")
    cache = tmp_path / "cache"
    reads = []
    real = digests.full_hash
    monkeypatch.setattr(digests, "full_hash", lambda p: reads.append(p) or real(p))
    first = fingerprint.data_check(d, cache)
    assert fingerprint.data_check(d, cache) == first and len(reads) == 1  # the second run reads nothing
    assert list((cache / digests.DIGESTS).glob("*.json"))
    write_rows(f, "BBBB")  # same size and mtime, other bytes: inode or ctime moved
    assert fingerprint.data_check(d, cache).content != first.content and len(reads) == 2
    os.utime(f, None)  # touched: hashed again, same content
    assert fingerprint.data_check(d, cache).content != first.content
    assert len(reads) == 3


def local_model(tmp_path, cache_root) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(models.materialize("tiny:llama", cache_root / ".cache"), folder)
    return folder


def rewrite_in_place(f: Path) -> None:
    """Other bytes, same size, mtime restored (touch -r)."""
    st = f.stat()
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0x01
    f.write_bytes(bytes(raw))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_local_model_folder_is_identified_by_content(tmp_path, cache_root):
    folder = local_model(tmp_path, cache_root)
    base = fps(tmp_path, f"model.name_or_path={folder}")
    assert fps(tmp_path, f"model.name_or_path={folder}") == base
    rewrite_in_place(folder / "model.safetensors")
    changed = fps(tmp_path, f"model.name_or_path={folder}")
    assert changed["sft"] != base["sft"] and changed["dpo"] != base["dpo"]


def test_a_model_folder_changed_during_the_run_stops_the_stage(tmp_path, cache_root):
    from alignctl.errors import StageFailed
    from alignctl.train.context import checked_context

    folder = local_model(tmp_path, cache_root)
    s = prepared(tmp_path, f"model.name_or_path={folder}")[0]
    assert s.model_check["init_path"]["folder"] == str(folder)
    fingerprint.check_models_unchanged(s)
    os.utime(folder / "config.json", None)  # touched, same bytes: fine
    fingerprint.check_models_unchanged(s)
    rewrite_in_place(folder / "model.safetensors")
    with pytest.raises(StageFailed, match="model folder .* changed on disk"):
        checked_context(s)  # before any model or data is loaded


def test_plan_notes_unpinned_hub_models_and_data_sets(tmp_path):
    notes = resolve(compose(["recipe=zephyr-dpo"]), tmp_path / "run").notes
    unpinned = [n for n in notes if "unpinned" in n]
    assert any(n.startswith("model.name_or_path: mistralai/") and "pin model.revision=<commit>" in n
               for n in unpinned), notes
    assert sum(n.startswith("data.") for n in unpinned) == 2, unpinned
    pinned = resolve(compose(["recipe=zephyr-dpo", "model.revision=abc", "++data.sft.revision=abc",
                                   "++data.prefs.revision=abc"]), tmp_path / "run").notes
    assert not [n for n in pinned if "unpinned" in n], pinned
    assert not [n for n in resolve(compose([]), tmp_path / "run").notes if "unpinned" in n]


# -- F2: the environment that changes numerics ------------------------------------------------------------------------
INHERITED = {"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_USE_FSDP": "true",
             "FSDP_SHARDING_STRATEGY": "FULL_SHARD", "ACCELERATE_DYNAMO_BACKEND": "inductor"}


def test_an_inherited_mixed_precision_does_not_change_an_fp32_stage(tmp_path, monkeypatch, caplog):
    """ACCELERATE_MIXED_PRECISION=bf16 made transformers train a precision=fp32 stage under bf16 autocast."""
    import trl

    from alignctl import launch
    from alignctl.train.context import StageContext

    for k, v in INHERITED.items():
        monkeypatch.setenv(k, v)
    work = prepared(tmp_path, "precision=fp32")[0]
    assert trl.SFTConfig(**StageContext.args_for(work)).mixed_precision == "bf16"  # what the variable does
    seen = {}

    def stage_here(spec):  # the stage as launcher=local runs it, in this process
        seen["mixed"] = trl.SFTConfig(**StageContext.args_for(spec)).mixed_precision
        seen["env"] = {k: os.environ.get(k) for k in INHERITED}
        return {}

    monkeypatch.setattr("alignctl.train.lifecycle.run_stage", stage_here)
    caplog.set_level("INFO", logger="alignctl")
    launch.run_stage(work, tmp_path / "spec.json", {"kind": "local"})
    assert seen["mixed"] == "no"
    assert seen["env"] == {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_FSDP": None,
                           "FSDP_SHARDING_STRATEGY": None, "ACCELERATE_DYNAMO_BACKEND": None}
    assert {k: os.environ.get(k) for k in INHERITED} == INHERITED  # restored after the stage
    assert "ACCELERATE_USE_FSDP" in caplog.text


def test_torchrun_ranks_get_the_stage_precision_and_no_inherited_engine(tmp_path, monkeypatch, cache_root):
    from alignctl import launch

    for k, v in INHERITED.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # where it runs: kept
    work = prepared(tmp_path, f"output_root={cache_root}", "precision=fp32")[0].replace(attempt="x")
    sent = {}

    def stream(cmd, env, output):
        sent.update(env)
        raise RuntimeError("not launched")

    monkeypatch.setattr(launch, "_stream", stream)
    launcher = {"kind": "torchrun", "nproc_per_node": 2, "nnodes": 1, "world_size": 2, "env": {"FSDP_X": "1"}}
    with pytest.raises(RuntimeError, match="not launched"):
        launch.run_stage(work, tmp_path / "sft" / "spec.json", launcher)
    assert sent["ACCELERATE_MIXED_PRECISION"] == "no" and sent["ACCELERATE_USE_CPU"] == "true"
    assert "ACCELERATE_USE_FSDP" not in sent and "ACCELERATE_DYNAMO_BACKEND" not in sent
    assert sent["FSDP_X"] == "1"  # set in launcher.env on purpose (and fingerprinted)
    bf16 = models.training_env(work.replace(precision="bf16"), {}, {})[0]
    assert bf16["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_tokenizers_and_8bit_optimizers_are_fingerprinted(tmp_path):
    stage = prepared(tmp_path)[0]
    env = fingerprint.environment(stage)
    assert env["tokenizers"]
    assert "bitsandbytes" not in env
    eight = stage.replace(args={**stage.args, "optim": "paged_adamw_8bit"})
    assert "bitsandbytes" in fingerprint.environment(eight)
    base = fingerprint.fingerprints([stage], env=env)
    assert fingerprint.fingerprints([stage], env={**env, "tokenizers": "0.0.0-other"}) != base


def test_eval_cadence_counts_for_trainers_that_sample_when_they_evaluate(tmp_path):
    grpo = ["recipe=rlhf-grpo", "stages.grpo.eval_strategy=steps"]
    a = fps(tmp_path, *grpo, "stages.grpo.eval_steps=5")
    b = fps(tmp_path, *grpo, "stages.grpo.eval_steps=10")
    assert a["grpo"] != b["grpo"]
    assert a["sft"] == b["sft"] and a["rm"] == b["rm"]
    sft = fps(tmp_path, *grpo, "stages.grpo.eval_steps=5", "stages.sft.eval_strategy=steps", "stages.sft.eval_steps=3")
    assert sft["sft"] == fps(tmp_path, *grpo, "stages.grpo.eval_steps=5", "stages.sft.eval_strategy=steps",
                             "stages.sft.eval_steps=9")["sft"]
    from alignctl.stages import STAGES

    assert {k for k, kind in STAGES.items() if kind.samples_during_eval} == {"grpo", "rloo"}


# -- issue 19: rows converted once are served from the cache their content keys, notes and all ----------------------
def test_the_same_rows_are_converted_once_and_a_changed_conversion_code_converts_them_again(tmp_path, monkeypatch,
                                                                                           caplog):
    """HH transcripts as a prompt set (a conversion that logs a note): the second load of the same bytes converts
    no row (only the first-row check of each split runs) and the log says the same note; alignctl's code or TRL
    changed (another code key) converts every row again."""
    from alignctl import formats

    caplog.set_level("INFO", logger="alignctl")
    folder = tmp_path / "hh"
    shutil.copytree(Path(__file__).resolve().parents[1] / "fixtures" / "public" / "hh_rlhf", folder)
    spec = prepared(tmp_path, f"data.sft.path={folder}", "data.sft.eval_split=test")[0].data
    calls = []
    real = formats.convert
    monkeypatch.setattr(formats, "convert", lambda *a, **k: calls.append(1) or real(*a, **k))

    def load() -> tuple[int, list[str], str]:
        calls.clear()
        caplog.clear()
        data._NOTED.clear()  # what the log has said so far in this process
        train, held = data.load(spec, "prompt", "stages.gen")
        notes = [r.getMessage() for r in caplog.records if "used its prompts only" in r.getMessage()]
        return len(calls), notes, train._fingerprint

    first, first_notes, fp = load()
    rows = len(data.load(spec, "prompt", "stages.gen")[0])
    assert first >= rows and len(first_notes) == 1
    again, notes, fp_again = load()
    assert again == 2 and notes == first_notes and fp_again == fp  # the first row of train and of test
    monkeypatch.setattr(data, "_code_key", lambda: ["another alignctl"])
    changed, _, fp_changed = load()
    assert changed >= rows and fp_changed != fp


def test_a_large_data_set_is_converted_in_several_processes_with_the_same_rows_and_errors(tmp_path, monkeypatch):
    """Past data.ROWS_PER_PROC rows per process (lowered here) the conversion uses this machine's cores: the rows are
    those of one process, and a bad row deep in the file still stops the load naming it."""
    import random

    if data.tokenize_procs(10**9) < 2:
        pytest.skip("one core here")
    rng = random.Random(0)
    rows = [{"conversations": [{"from": "human", "value": f"question {i} " + rng.choice("abc")},
                               {"from": "gpt", "value": f"answer {i}"}]} for i in range(300)]  # ShareGPT

    def load(name: str, lines: list[dict]):
        path = tmp_path / name / "train.jsonl"
        path.parent.mkdir()
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))
        spec = prepared(tmp_path / name, f"data.sft.path={path}", "data.sft.eval_size=0")[0].data
        return data.load(spec, "sft", "stages.sft")[0]

    one = load("one", rows)
    monkeypatch.setattr(data, "ROWS_PER_PROC", 100)
    assert data.tokenize_procs(300) == 2
    two = load("two", rows)
    assert two.to_list() == one.to_list() and two.column_names == one.column_names == ["messages"]
    bad = rows[:250] + [{"conversations": [{"from": "human", "value": "q"}, {"from": "wizard", "value": "a"}]}] + \
        rows[251:]
    with pytest.raises(errors.ConfigError) as e:
        load("bad", bad)
    assert "row 250" in str(e.value) and "wizard" in str(e.value), e.value.problems
