"""The fingerprint is an allowlist (issue 18): the fields of the typed stage spec that determine weights are named
in one place (``WEIGHT_FIELDS``, ``DATA_FIELDS``: alignctl.config.types) and nothing else reaches the hash; the store
format was bumped once and older entries are stale; the reuse/train sequence lives in the store. Plan-time (no
torch) except where a test says otherwise."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from alignctl import fingerprint, pipeline, store
from alignctl.cli import store as store_cli
from alignctl.config.compose import compose
from alignctl.config.resolve import resolve
from alignctl.config.types import DATA_FIELDS, WEIGHT_FIELDS, DataCheck, EvalSettings, LinkSpec, StageSpec
from conftest import REPO, read_spec, stage_spec

RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


def stages(tmp_path: Path, *overrides: str, run_dir: str = "run") -> list[StageSpec]:
    resolved = resolve(compose([f"output_root={tmp_path / 'out'}", *overrides]), tmp_path / run_dir)
    return pipeline.stage_specs(resolved)


def fp(*specs: StageSpec) -> str:
    """The fingerprint of the last of ``specs`` (the earlier ones are its upstream), library versions fixed."""
    return fingerprint.fingerprints(list(specs), env={})[specs[-1].name]


def _other(value):
    """A different value of the same shape (for a bookkeeping field of any type)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, dict):
        return {**value, "other": 1}
    if isinstance(value, EvalSettings):
        return value.replace(enabled=not value.enabled, max_prompts=3)
    return "other"  # None and anything else


# -- (a) bookkeeping never changes a fingerprint; every weight field does -------------------------------------------
def test_every_field_outside_the_allowlist_leaves_the_fingerprint_alone(tmp_path):
    sft, dpo = stages(tmp_path)
    dpo = dpo.replace(eval=EvalSettings())
    base = fp(sft, dpo)
    bookkeeping = [f.name for f in dataclasses.fields(StageSpec) if f.name not in WEIGHT_FIELDS and f.name != "name"]
    assert {"description", "eval", "attempt", "lock_token", "keep_checkpoints", "entry_dir", "fingerprint",
            "resume_from", "stage_dir", "run_dir", "store_dir", "cache_dir"} <= set(bookkeeping)
    for name in bookkeeping:
        assert fp(sft, dpo.replace(**{name: _other(getattr(dpo, name))})) == base, name
    assert fingerprint.fingerprints([sft.replace(name="renamed")], env={})["renamed"] == fp(sft)  # names are places too


def test_a_new_bookkeeping_field_cannot_change_a_fingerprint(tmp_path):
    """What a denylist got wrong: a field added to the stage spec counted until someone listed it."""
    @dataclasses.dataclass(frozen=True)
    class WithNewField(StageSpec):
        new_bookkeeping: str = "anything"

    sft, dpo = stages(tmp_path)
    grown = WithNewField(**{f.name: getattr(dpo, f.name) for f in dataclasses.fields(StageSpec)},
                         new_bookkeeping="a value no run had before")
    assert fp(sft, grown) == fp(sft, dpo)


def test_every_weight_field_changes_the_fingerprint(tmp_path):
    sft, dpo = stages(tmp_path)
    base = fp(sft, dpo)
    changed = {
        "kind": "orpo", "args": {**dpo.args, "learning_rate": 0.123}, "data": dpo.data.replace(seed=7),
        "options": {"constitution": ["be brief"]}, "peft": {"method": "lora", "r": 8}, "world_size": 2,
        "distributed": "ddp", "model": dpo.model.replace(chat_template="{{ messages }}"),
        "precision": "bf16" if dpo.precision != "bf16" else "fp16",
        "links": {**dpo.links, "ref": LinkSpec("ref", "tiny:qwen2")},
    }
    assert set(changed) == set(WEIGHT_FIELDS)
    for name, value in changed.items():
        assert fp(sft, dpo.replace(**{name: value})) != base, name
    assert fp(sft.replace(args={**sft.args, "learning_rate": 0.5}), dpo) != base  # through the `from` link


def test_the_data_identity_is_its_own_allowlist(tmp_path):
    (s,) = stages(tmp_path, "~stages.dpo")
    base = fp(s)
    d = s.data
    other = {"source": "hub", "split": "other", "eval_split": "test", "eval_size": 0.3, "seed": 1,
             "columns": {"prompt": "question"}, "to_messages": True, "format": "json", "system_turns": "drop",
             "name": "config2", "revision": "abc", "stage": "gen",
             "path": str(REPO / "alignctl/assets/data/prefs.jsonl")}
    assert set(other) == set(DATA_FIELDS)
    for name, value in other.items():
        assert fp(s.replace(data=d.replace(**{name: value}))) != base, name
    check = fingerprint.data_check(d)
    elsewhere = DataCheck(content=check.content, files=(("/elsewhere/sft.jsonl", 1, 2, 3, 4, 5),))
    same = d.replace(label="data.renamed", cache_dir="/another/cache", check=elsewhere)
    assert fp(s.replace(data=same)) == base  # label, cache and stat signatures are not the rows


# -- (b) the store format: older entries are stale ------------------------------------------------------------------
def _complete_entry(root: Path, name: str, fmt: int) -> store.Entry:
    e = store.Entry(root, "sft", (name.encode().hex() + "0" * 64)[:64])
    e.final.mkdir(parents=True)
    (e.final / "model.safetensors").write_bytes(b"w" * 1000)
    e.mark_complete({}, extra={"stage": "sft"})
    if fmt != fingerprint.FORMAT:  # as an older alignctl wrote it (before the allowlist fingerprints)
        path = e.dir / "COMPLETE"
        rec = {**json.loads(path.read_text()), "format": fmt}
        path.chmod(0o644)
        path.write_text(json.dumps(rec))
    return e


def test_an_entry_of_an_older_format_is_listed_as_stale_never_reused_and_collected(tmp_path, capsys):
    root = tmp_path / "store"
    old = _complete_entry(root, "old", fingerprint.FORMAT - 1)
    current = _complete_entry(root, "new", fingerprint.FORMAT)
    assert old.stale() and not old.complete() and current.complete() and not current.stale()
    assert store_cli.run(["ls", "--store", str(root)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("sft-")}
    assert f"stale (format {fingerprint.FORMAT - 1})" in rows[old.dir.name] and "complete" in rows[current.dir.name]
    assert store_cli.run(["gc", "--store", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"removed {old.dir.name} (stale: an older format" in out and "1 entries removed" in out
    assert not old.dir.exists() and current.complete()


# -- (c) every shipped recipe: fingerprints stable across resolutions -----------------------------------------------
@pytest.mark.parametrize("recipe", RECIPES)
def test_fingerprints_are_stable_across_resolutions(recipe, tmp_path):
    """Resolved twice into the same run directory (with a previous run's generated data in it the second time) and
    once into another: the same fingerprints, and a fingerprint for every stage."""
    first = stages(tmp_path, f"recipe={recipe}")
    for s in first:  # what an earlier run of a generate stage left in the run folder
        if s.data is not None and s.data.source == "generated":
            Path(s.data.path).mkdir(parents=True, exist_ok=True)
            (Path(s.data.path) / "train.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    again = stages(tmp_path, f"recipe={recipe}")
    elsewhere = stages(tmp_path, f"recipe={recipe}", run_dir="another-run")
    fps = fingerprint.fingerprints(first, env={})
    assert set(fps) == {s.name for s in first} and len(set(fps.values())) == len(fps)
    assert fingerprint.fingerprints(again, env={}) == fps == fingerprint.fingerprints(elsewhere, env={})


# -- the sequence in the store (Entry.reuse_or_train), without a model ----------------------------------------------
def test_reuse_or_train_trains_once_then_reuses_and_places(tmp_path):
    entry = store.Entry(tmp_path / "store", "sft", "e" * 64)
    calls = []

    def train(work: StageSpec, spec_path: Path) -> dict:  # what launch.run_stage does, minus the model
        calls.append(read_spec(spec_path))
        (Path(work.entry_dir) / "final").mkdir(parents=True, exist_ok=True)
        (Path(work.entry_dir) / "final" / "model.safetensors").write_bytes(b"w" * 100)
        return {"metrics": {"train": {"train_loss": 0.5}}, "world_size": 1}

    first = entry.reuse_or_train(stage_spec("sft", run_dir=tmp_path / "run1"), train, {})
    (work,) = calls
    assert work.entry_dir == str(entry.dir) and work.fingerprint == entry.fingerprint and work.attempt
    assert work.lock_token and work.resume_from is None
    assert first.reused_from is None and first.metrics == {"train": {"train_loss": 0.5}} and entry.complete()
    assert (tmp_path / "run1" / "sft" / "final" / "model.safetensors").read_bytes() == b"w" * 100
    assert (tmp_path / "run1" / "sft" / "spec.json").stat().st_mode & 0o777 == 0o600
    second = entry.reuse_or_train(stage_spec("sft", run_dir=tmp_path / "run2"), train, {})
    assert len(calls) == 1 and second.reused_from == str(entry.dir) and second.metrics == first.metrics
    assert (tmp_path / "run2" / "sft" / "final" / "model.safetensors").is_file()
    assert read_spec(tmp_path / "run2" / "sft" / "spec.json").attempt != work.attempt
