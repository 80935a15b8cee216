"""The stage store never reuses wrong weights, never fills the disk, and holds on shared file systems (issue 12):
fingerprints of everything that changes weights, healthy-only completion, immutable verified entries, store
lifecycle commands, the lock file, and ranks that die with the orchestrator."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignctl import digests, errors, fingerprint, fsutil, pipeline, placement, store
from alignctl.cli import store as store_cli
from alignctl.config.compose import compose
from alignctl.config.resolve import resolve
from conftest import REPO, read_manifest, stage_spec


def specs(tmp_path, *overrides) -> list:
    return pipeline._prepare(pipeline.stage_specs(resolve(compose(list(overrides)), tmp_path / "run")))


def fps(tmp_path, *overrides, launcher=None, env=None) -> dict[str, str]:
    resolved = resolve(compose(list(overrides)), tmp_path / "run")
    stages = pipeline._prepare(pipeline.stage_specs(resolved))
    return fingerprint.fingerprints(stages, resolved.launcher if launcher is None else launcher, env)


def strict(path: Path) -> dict:
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


# -- 1. the fingerprint covers everything that changes the weights ---------------------------------------------------
def test_precision_auto_is_resolved_on_this_machine(tmp_path):
    from alignctl import models

    here = models.precision_for("auto")
    s = specs(tmp_path)[0]
    assert s.precision == here and s.precision_setting == "auto"
    assert fps(tmp_path) == fps(tmp_path, f"precision={here}")  # auto is what it resolves to, not the word "auto"
    other = "bf16" if here != "bf16" else "fp16"
    assert fps(tmp_path, f"precision={other}")["sft"] != fps(tmp_path)["sft"]
    q = specs(tmp_path, "peft=qlora")[0]
    assert q.peft["bnb_4bit_compute_dtype"] == here  # QLoRA's compute dtype resolved the same way
    assert fps(tmp_path, "peft=qlora")["sft"] != fps(tmp_path, "peft=qlora", f"peft.bnb_4bit_compute_dtype={other}")[
        "sft"]


def test_library_versions_are_fingerprinted(tmp_path):
    stages = specs(tmp_path)
    env = fingerprint.environment(stages[0])
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        assert env[pkg], pkg
    assert "bitsandbytes" not in env and "bitsandbytes" in fingerprint.environment(specs(tmp_path, "peft=qlora")[0])
    base = fingerprint.fingerprints(stages, env=env)
    assert base == fingerprint.fingerprints(stages)
    for pkg in env:
        changed = fingerprint.fingerprints(stages, env={**env, pkg: "0.0.0-other"})
        assert changed["sft"] != base["sft"] and changed["dpo"] != base["dpo"], pkg


def test_alignctl_source_content_is_fingerprinted(tmp_path):
    copy = tmp_path / "alignctl"
    shutil.copytree(REPO / "alignctl", copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = digests.tree_hash(copy)
    assert before == digests.tree_hash(REPO / "alignctl") == fingerprint.source_hash()
    f = copy / "models.py"
    f.write_text(f.read_text() + "\n# an edit of an editable install, same version number\n")
    assert digests.tree_hash(copy) != before
    assert fingerprint.environment(specs(tmp_path)[0])["alignctl_source"] == before


def test_launcher_settings_that_change_numerics_are_fingerprinted(tmp_path):
    two = ["launcher=torchrun", "launcher.nproc_per_node=2"]
    base = fps(tmp_path, *two)
    assert fps(tmp_path, *two, "launcher.rdzv_id=job7") == base  # where it runs: no
    assert fps(tmp_path, *two, "launcher.extra_args=[--max-restarts,0]")["sft"] != base["sft"]
    assert fps(tmp_path, *two, "launcher.env.CUBLAS_WORKSPACE_CONFIG=1")["sft"] != base["sft"]
    assert fps(tmp_path, *two, "launcher.env.WANDB_API_KEY=abc", "launcher.env.NCCL_DEBUG=INFO") == base
    ddp = fps(tmp_path, "launcher=accelerate", "launcher.num_processes=2")
    assert ddp == base  # the shipped DDP file only says where to run
    mine = tmp_path / "acc.yaml"
    text = (REPO / "alignctl/assets/accelerate/ddp.yaml").read_text()
    mine.write_text(text)
    assert fps(tmp_path, "launcher=accelerate", "launcher.num_processes=2", f"launcher.config_file={mine}") == base
    mine.write_text(text + "dynamo_config:\n  dynamo_backend: INDUCTOR\n")  # the file's content counts
    assert fps(tmp_path, "launcher=accelerate", "launcher.num_processes=2",
               f"launcher.config_file={mine}")["sft"] != base["sft"]


def test_cadence_counts_only_when_it_picks_the_final_weights(tmp_path):
    base = fps(tmp_path)
    assert fps(tmp_path, "stages.sft.eval_steps=7", "stages.sft.save_steps=7", "stages.sft.logging_steps=1") == base
    best = ["stages.sft.load_best_model_at_end=true", "stages.sft.eval_strategy=steps",
            "stages.sft.save_strategy=steps"]
    a = fps(tmp_path, *best, "stages.sft.eval_steps=5", "stages.sft.save_steps=5")
    b = fps(tmp_path, *best, "stages.sft.eval_steps=10", "stages.sft.save_steps=10")
    assert a["sft"] != b["sft"] and a["dpo"] != b["dpo"]
    assert fps(tmp_path, *best, "stages.sft.eval_steps=5", "stages.sft.save_steps=5", "stages.sft.logging_steps=2") == a


def test_data_is_checked_again_when_the_stage_loads_it(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_bytes((REPO / "alignctl/assets/data/sft.jsonl").read_bytes())
    s = specs(tmp_path, f"data.sft.path={data}")[0]
    assert s.data.check.content
    fingerprint.check_data_unchanged(s)  # unchanged: fine
    os.utime(data, (time.time() + 5, time.time() + 5))
    fingerprint.check_data_unchanged(s)  # touched, same bytes: fine
    data.write_text(data.read_text().replace("river", "brook"))
    with pytest.raises(errors.DataChanged, match="changed on disk since this run started"):
        fingerprint.check_data_unchanged(s)
    assert fps(tmp_path, f"data.sft.path={data}")["sft"] != fingerprint.fingerprints([s])["sft"]


# -- 2. only healthy stages complete; strict JSON --------------------------------------------------------------------
def test_non_finite_losses_or_metrics_fail_the_stage():
    from alignctl.errors import StageFailed
    from alignctl.train.health import check_healthy

    check_healthy("sft", {"train": {"train_loss": 1.0, "grad_norm": math.inf}, "after": {"eval_loss": 2.0},
                          "before": {"eval_loss": math.nan}})  # fp16 skipped step, a bad base: not divergence
    with pytest.raises(StageFailed, match=r"diverged.*train_loss=nan"):
        check_healthy("sft", {"train": {"train_loss": math.nan}})
    with pytest.raises(StageFailed, match=r"after.eval_loss=inf.*stages.dpo.learning_rate"):
        check_healthy("dpo", {"train": {"train_loss": 0.5}, "after": {"eval_loss": math.inf}})


def test_json_written_by_alignctl_is_strict(tmp_path):
    fsutil.write_json(tmp_path / "m.json", {"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}})
    assert strict(tmp_path / "m.json") == {"a": None, "b": [None, 1.5], "c": {"d": None}}
    assert not list(tmp_path.glob("*.tmp"))


# -- 3. entries are immutable and verified ---------------------------------------------------------------------------
def fake_entry(root: Path, name: str = "sft", size: int = 300_000, stage: str = "sft") -> store.Entry:
    fp = (name.encode().hex() + "0" * 64)[:64]
    e = store.Entry(root, name, fp)
    (e.final).mkdir(parents=True)
    (e.final / "model.safetensors").write_bytes(os.urandom(size))
    (e.final / "config.json").write_text('{"model_type": "llama"}')
    ck = e.dir / "checkpoints" / "checkpoint-1"
    ck.mkdir(parents=True)
    (ck / "optimizer.pt").write_bytes(os.urandom(size * 2))
    e.mark_complete({"train": {"train_loss": 1.0}}, extra={"stage": stage})
    return e


def test_completed_entry_is_read_only_recorded_and_drops_checkpoints(tmp_path):
    e = fake_entry(tmp_path)
    rec = e.record()
    assert rec["files"]["final/model.safetensors"]["size"] == 300_000 and len(rec["files"]) == 3
    assert rec["bytes"] == sum(f["size"] for f in rec["files"].values())
    assert all(not (e.dir / f).stat().st_mode & 0o222 for f in rec["files"])
    assert not (e.dir / "checkpoints").exists(), "optimizer checkpoints are dropped after completion"
    assert e.complete() and e.verify() == [] and e.verify(full=True) == []
    kept = store.Entry(tmp_path, "dpo", "d" * 64)
    kept.final.mkdir(parents=True)
    (kept.final / "w.safetensors").write_bytes(b"x" * 10)
    (kept.dir / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    kept.mark_complete({}, keep_checkpoints=True)
    assert (kept.dir / "checkpoints" / "checkpoint-1").is_dir()


def test_a_runs_final_costs_no_copy_and_a_write_through_it_never_goes_unnoticed(tmp_path):
    """A run's final/ is a reflink or hard links to the store's read-only files, also as root (a 7B run folder costs
    kilobytes, not 15 GB): a normal user cannot write through it; root can, and the reuse check then finds the
    changed entry (it is trained again, never reused). ALIGNCTL_STORE_LINKS=copy keeps the store out of reach."""
    e = fake_entry(tmp_path / "store")
    run_final = tmp_path / "run" / "sft" / "final"
    how = placement.link_tree(e.final, run_final)
    assert sum(how.values()) == 300_000 + len('{"model_type": "llama"}') and "copy" not in how, how
    target, stored = run_final / "model.safetensors", e.final / "model.safetensors"
    if "reflink" in how:  # its own inode, shared blocks: a write never reaches the store
        assert target.stat().st_ino != stored.stat().st_ino
        os.chmod(target, 0o644)
        with open(target, "r+b") as f:
            f.write(b"\0" * 1000)
        assert e.verify(full=True) == []
        return
    assert target.stat().st_ino == stored.stat().st_ino  # one copy of the bytes
    if os.geteuid() != 0:  # a hard link to a read-only file: an in-place writer fails loudly
        with pytest.raises(PermissionError):
            open(target, "r+b")
        assert e.verify(full=True) == []
    else:  # root writes through it: the entry changed, and the check of the next reuse says so (it retrains)
        with open(target, "r+b") as f:
            f.write(b"\0" * 1000)
        assert any("content changed" in p for p in e.verify())


def test_copies_keep_a_runs_final_out_of_the_stores_reach_when_asked(tmp_path, monkeypatch):
    e = fake_entry(tmp_path / "store")
    monkeypatch.setenv(placement.PLACEMENT_ENV, "copy")
    run_final = tmp_path / "run" / "sft" / "final"
    assert set(placement.link_tree(e.final, run_final)) == {"copy"}
    target = run_final / "model.safetensors"
    os.chmod(target, 0o644)
    with open(target, "r+b") as f:
        f.write(b"\0" * 1000)
    assert e.verify(full=True) == []


def test_reuse_check_finds_damage_and_full_verify_finds_the_rest(tmp_path):
    e = fake_entry(tmp_path, size=1 << 20)
    f = e.final / "model.safetensors"
    st = f.stat()

    def poke(offset: int) -> None:
        os.chmod(f, 0o644)
        with open(f, "r+b") as h:
            h.seek(offset)
            h.write(b"\xff" * 16)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # hide the write from the mtime check

    poke(0)  # a sampled block: the cheap check sees it
    assert any("sampled hash differs" in p for p in e.verify())
    shutil.rmtree(tmp_path)
    e = fake_entry(tmp_path, size=1 << 20)
    f, st = e.final / "model.safetensors", (e.final / "model.safetensors").stat()
    poke(1 << 19 | 123)  # between sampled blocks, mtime restored: only the full hash sees it
    assert e.verify() == [] and any("SHA-256 differs" in p for p in e.verify(full=True))
    os.utime(f)  # the mtime moved: the cheap check hashes that file in full
    assert any("SHA-256 differs" in p for p in e.verify())
    os.truncate(f, 1000)
    assert any("1000 bytes" in p for p in e.verify())
    (e.final / "extra.bin").write_bytes(b"1")
    assert any("extra.bin: not part" in p for p in e.verify())
    e.invalidate()
    assert not e.complete() and not e.final.exists()


# -- 4. lifecycle: alignctl store ... --------------------------------------------------------------------------------
def run_store(capsys, *args) -> tuple[int, str]:
    rc = store_cli.run(list(args))
    out = capsys.readouterr()
    return rc, out.out + out.err


def file_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in fsutil.tree_files(root))


def test_store_ls_du_verify(tmp_path, capsys):
    root = tmp_path / "store"
    a, b = fake_entry(root, "sft"), fake_entry(root, "dpo", stage="dpo")
    (b.dir / "checkpoints" / "checkpoint-9").mkdir(parents=True)
    (b.dir / "checkpoints" / "checkpoint-9" / "optimizer.pt").write_bytes(b"o" * 5000)
    rc, out = run_store(capsys, "ls", "--store", str(root))
    assert rc == 0 and a.dir.name in out and b.dir.name in out and "complete" in out and "2 entries" in out
    rc, out = run_store(capsys, "du", "--store", str(root))
    assert rc == 0 and "Trainer checkpoints (optimizer state; resumable runs): 4.9 KB" in out
    rc, out = run_store(capsys, "verify", "--store", str(root))
    assert rc == 0 and "2 entries, 0 damaged" in out
    os.chmod(a.final / "config.json", 0o644)
    (a.final / "config.json").write_text('{"model_type": "gpt2"}')
    rc, out = run_store(capsys, "verify", "--store", str(root))
    assert rc == 1 and f"{a.dir.name}: DAMAGED" in out
    rc, out = run_store(capsys, "ls", "--store", str(tmp_path / "nope"))
    assert rc == 2 and "not a store folder" in out


def test_store_gc_frees_what_it_reports_and_spares_locked_entries(tmp_path, capsys):
    root = tmp_path / "store"
    old, linked, locked, fresh = (fake_entry(root, n) for n in ("old", "linked", "locked", "fresh"))
    for e in (old, linked, locked):
        os.utime(e.dir / ".last_used", (time.time() - 10 * 86400,) * 2)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.link(linked.final / "model.safetensors", run_dir / "model.safetensors")  # a run still uses it
    (fresh.dir / "checkpoints").mkdir()  # left by a run killed between COMPLETE and the clean-up
    (fresh.dir / "checkpoints" / "optimizer.pt").write_bytes(b"o" * 7000)
    (fresh.dir / "final.partial").mkdir()
    (fresh.dir / "final.partial" / "x").write_bytes(b"p" * 3000)
    before = file_bytes(root)
    rc, out = run_store(capsys, "gc", "--store", str(root), "--older-than", "5", "--dry-run")
    assert rc == 0 and "would remove" in out and file_bytes(root) == before
    with locked.lock(timeout=0):
        rc, out = run_store(capsys, "gc", "--store", str(root), "--older-than", "5")
        assert f"skip {locked.dir.name}: locked by" in out
    reported = int(out.split("freed ")[1].split(" bytes")[0])
    assert reported == before - file_bytes(root) - 300_000, out  # the linked weights stay on disk (a run has them)
    assert "stay on disk, hard-linked from run folders" in out
    assert not old.dir.exists() and not linked.dir.exists() and locked.complete() and fresh.complete()
    assert not (fresh.dir / "checkpoints").exists() and not (fresh.dir / "final.partial").exists()


def test_store_rm_by_fingerprint_and_by_run_dir(tmp_path, capsys):
    root = tmp_path / "store"
    a, b, c = fake_entry(root, "sft"), fake_entry(root, "dpo"), fake_entry(root, "orpo")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fsutil.write_json(run_dir / "manifest.json", {"store_dir": str(root), "stages": [
        {"name": "sft", "fingerprint": a.fingerprint}, {"name": "dpo", "fingerprint": b.fingerprint}]})
    rc, out = run_store(capsys, "rm", str(run_dir), "--dry-run")
    assert rc == 0 and "would free" in out and a.dir.exists() and b.dir.exists()
    rc, out = run_store(capsys, "rm", str(run_dir))
    assert rc == 0 and not a.dir.exists() and not b.dir.exists() and c.dir.exists()
    rc, out = run_store(capsys, "rm", "--store", str(root), c.fingerprint[:10])
    assert rc == 0 and not c.dir.exists()
    rc, out = run_store(capsys, "rm", "--store", str(root), "deadbeef00")
    assert rc == 2 and "no such store entry" in out


def test_store_cli_does_not_import_torch():
    code = "import sys; from alignctl.cli import store as store_cli; assert 'torch' not in sys.modules; " \
           "sys.exit(store_cli.run(['ls', '--help']))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True).returncode == 0


# -- 5. the lock file --------------------------------------------------------------------------------------------------
def test_lock_waits_names_the_holder_and_times_out(tmp_path, caplog):
    caplog.set_level("INFO", logger="alignctl")
    path = tmp_path / "e" / ".lock"
    with fsutil.FileLock(path, "entry e", heartbeat=0.1):
        t0 = time.monotonic()
        holder = rf"entry e is locked by .*@{socket.gethostname()} pid {os.getpid()}"
        with pytest.raises(errors.LockTimeout, match=holder):
            fsutil.FileLock(path, "entry e", timeout=0.6, stale=0.3).acquire()  # heartbeats keep it live
        assert time.monotonic() - t0 >= 0.6
    assert "waiting for" in caplog.text and not path.exists()


def test_stale_locks_are_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / ".lock"
    path.write_text(json.dumps({**fsutil.identity(), "pid": dead.pid, "token": "x"}))
    t0 = time.monotonic()
    with fsutil.FileLock(path, "dead holder", timeout=5):  # same host, dead pid: at once
        assert time.monotonic() - t0 < 1 and json.loads(path.read_text())["pid"] == os.getpid()
    path.write_text(json.dumps({"host": "another-node", "pid": 1, "token": "y"}))
    with fsutil.FileLock(path, "silent holder", timeout=10, stale=0.5):  # no heartbeat for `stale` seconds
        assert time.monotonic() - t0 >= 0.5 and json.loads(path.read_text())["host"] == socket.gethostname()


RACER = """
import sys, time
from pathlib import Path
from alignctl import store
e = store.Entry(sys.argv[1], "sft", "ab" * 32)
with e.lock():
    if not e.complete():
        with open(Path(sys.argv[1]) / "trained.log", "a") as f:
            f.write(sys.argv[2] + "\\n")
        time.sleep(0.5)
        e.final.mkdir(parents=True, exist_ok=True)
        (e.final / "w.safetensors").write_bytes(b"w" * 100)
        e.mark_complete({})
"""


def test_racing_processes_train_an_entry_once_with_the_lock_file_alone(tmp_path):
    env = {**os.environ, "ALIGNCTL_LOCK_HEARTBEAT": "0.1"}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(i)], cwd=REPO, env=env)
             for i in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]
    assert len((tmp_path / "trained.log").read_text().split()) == 1
    assert not (tmp_path / f"sft-{'ab' * 8}" / ".lock").exists()


def test_a_second_run_in_the_same_run_directory_is_refused(tmp_path):
    from alignctl.errors import ConfigError

    with pipeline._run_dir_lock(tmp_path):
        with pytest.raises(ConfigError, match="is in use by another alignctl run"):
            with pipeline._run_dir_lock(tmp_path):
                pass


def test_run_directories_are_unique_within_a_second(tmp_path):
    cfg = compose([], return_hydra_config=True)
    assert "%f" in str(cfg.hydra.run._get_node("dir")._value())


def test_guard_does_not_start_the_command_when_its_parent_is_gone(tmp_path):
    marker = tmp_path / "started"
    cmd = [sys.executable, "-m", "alignctl.worker", "--guard", "1", "--", "touch", str(marker)]  # parent is not pid 1
    assert subprocess.run(cmd, cwd=REPO).returncode == 137 and not marker.exists()
    cmd[4] = str(os.getpid())
    assert subprocess.run(cmd, cwd=REPO).returncode == 0 and marker.exists()


# -- real runs (tiny model, a few steps) -----------------------------------------------------------------------------
FAST = ["stages.sft.max_steps=3", "stages.sft.save_strategy=steps", "stages.sft.save_steps=1",
        "stages.dpo.max_steps=1"]


def run_in_process(cache_root: Path, store_dir: Path, run_dir: Path, *overrides, keep_sft_checkpoints=False) -> dict:
    overrides = [f"output_root={cache_root}", f"store={store_dir}", *FAST, *overrides]
    resolved = resolve(compose(overrides), run_dir)
    if keep_sft_checkpoints:  # keep_checkpoints is a stage setting outside the fingerprint
        sft, *rest = resolved.stages
        resolved = resolved.replace(stages=(sft.replace(keep_checkpoints=True), *rest))
    return pipeline.run(resolved, overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_root):
    """One completed default run whose SFT entry kept its three checkpoints."""
    work = tmp_path_factory.mktemp("trained")
    m = run_in_process(cache_root, work / "store", work / "run", keep_sft_checkpoints=True)
    return work / "store", m


def copy_store(trained, tmp_path) -> tuple[Path, store.Entry]:
    src, m = trained
    dst = tmp_path / "store"
    shutil.copytree(src, dst)
    sft = m["stages"][0]
    return dst, store.Entry(dst, "sft", sft["fingerprint"])


def test_damaged_entry_is_trained_again(trained, tmp_path, cache_root, caplog):
    caplog.set_level("INFO", logger="alignctl")
    root, sft = copy_store(trained, tmp_path)
    assert sft.complete() and sft.verify() == []
    f = sft.final / "model.safetensors"
    os.chmod(f, 0o644)
    with open(f, "r+b") as h:  # bit rot / a writer through a link: same size, same mtime
        st = f.stat()
        h.seek(st.st_size - 100)
        h.write(b"\0" * 100)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    m = run_in_process(cache_root, root, tmp_path / "run")
    assert "is damaged (final/model.safetensors: content changed" in caplog.text
    assert m["status"] == "completed" and not m["stages"][0]["reused_from"]
    assert not m["stages"][1]["reused_from"] and "trained again" in m["stages"][1]["retrained"]  # N11: new SFT
    assert sft.complete() and sft.verify(full=True) == []


def test_corrupted_newest_checkpoint_is_skipped_on_resume(trained, tmp_path, cache_root, caplog):
    caplog.set_level("INFO", logger="alignctl")
    root, sft = copy_store(trained, tmp_path)
    kept = sorted(p.name for p in (sft.dir / "checkpoints").glob("checkpoint-*"))
    assert kept == [f"checkpoint-{i}" for i in (1, 2, 3)]
    sft.invalidate()  # as if killed after the third checkpoint
    (sft.dir / "checkpoints" / "checkpoint-3" / "trainer_state.json").write_text("")  # truncated by a full disk
    m = run_in_process(cache_root, root, tmp_path / "run")
    assert "skipping checkpoint checkpoint-3: trainer_state.json is not valid JSON" in caplog.text
    assert "stage sft: resuming from checkpoint-2 (step 2)" in caplog.text
    assert "[sft] step 3:" in caplog.text and "[sft] step 1:" not in caplog.text
    assert m["status"] == "completed" and sft.complete()
    assert not (sft.dir / "checkpoints").exists(), "completion drops the checkpoints (keep_checkpoints unset)"
    size = strict(tmp_path / "run" / "manifest.json")["store"]  # the size line: manifest and report.md
    assert size["entries"] == 2 and size["bytes"] == sum(e.size() for e in store.entries(root))
    # DPO is trained again on top of the resumed SFT (N11), so both entries are new
    assert m["stages"][1]["retrained"] and not m["stages"][1]["reused_from"]
    assert size["added_bytes"] == m["stages"][0]["bytes"] + m["stages"][1]["bytes"] > 0 and "Store: 2 entries" in (
        tmp_path / "run" / "report.md").read_text()


def test_diverged_stage_fails_and_is_never_stored(tmp_path, cache_root):
    from alignctl.errors import StageFailed

    with pytest.raises(StageFailed, match="training diverged"):
        run_in_process(cache_root, tmp_path / "store", tmp_path / "run", "stages.sft.learning_rate=1e3")
    m = strict(tmp_path / "run" / "manifest.json")
    assert m["status"] == "failed" and [s["status"] for s in m["stages"]] == ["failed", "pending"]
    assert "non-finite" in m["error"]
    assert not list((tmp_path / "store").glob("*/COMPLETE")) and not (tmp_path / "run" / "sft" / "final").exists()


def cli(args: list[str], cwd: Path, log: Path, **env) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.Popen([sys.executable, "-m", "alignctl.cli", *args], cwd=cwd, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


SFT_ONLY = """name: sft-only
stages:
  sft: {trainer: sft, data: sft, max_steps: 3, per_device_train_batch_size: 8, save_strategy: "no"}
"""


def test_two_runs_racing_on_one_fingerprint_train_it_once(tmp_path, cache_root):
    """The lock file alone (alignctl has no flock) keeps the shared SFT trained once."""
    recipe = tmp_path / "sft-only.yaml"
    recipe.write_text(SFT_ONLY)
    common = [f"recipe={recipe}", f"output_root={cache_root}", f"store={tmp_path}/store"]
    procs = [cli(["run", f"hydra.run.dir={tmp_path}/run{i}", *common], tmp_path, tmp_path / f"log{i}",
                 ALIGNCTL_LOCK_HEARTBEAT="0.2") for i in (0, 1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0], (tmp_path / "log0").read_text()[-2000:]
    ms = [read_manifest(tmp_path / f"run{i}") for i in (0, 1)]
    assert sorted(bool(m["stages"][0]["reused_from"]) for m in ms) == [False, True]
    assert ms[0]["stages"][0]["fingerprint"] == ms[1]["stages"][0]["fingerprint"]
    logs = "".join((tmp_path / f"log{i}").read_text() for i in (0, 1))  # the consoles
    run_logs = "".join((tmp_path / f"run{i}" / "alignctl.log").read_text() for i in (0, 1))  # per-step metrics
    assert run_logs.count("train_runtime=") == 1, "trained once"
    assert "waiting for" in logs + run_logs, "the other run waited"


def _pids_with(text: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if text in cmd and state != "Z":
                out.append(int(d.name))
    return out


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc (Linux)")
def test_kill_9_of_the_orchestrator_leaves_no_rank_running(tmp_path, cache_root):
    run_dir = tmp_path / "run"
    proc = cli(["run", f"hydra.run.dir={run_dir}", f"output_root={cache_root}", f"store={tmp_path}/store",
                "launcher=torchrun", "launcher.nproc_per_node=2", "stages.sft.max_steps=100000"], tmp_path,
               tmp_path / "log")
    spec_path = str(run_dir / "sft" / "spec.json")
    try:
        t0 = time.time()
        while len(_pids_with(spec_path)) < 3:  # torchrun (behind the guard) and its two ranks
            assert proc.poll() is None, (tmp_path / "log").read_text()[-3000:]
            assert time.time() - t0 < 240, "the ranks never started"
            time.sleep(0.2)
        time.sleep(2)  # the ranks are loading torch / the model: the stage is under way
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        t0 = time.time()
        while _pids_with(spec_path) and time.time() - t0 < 20:
            time.sleep(0.2)
        assert _pids_with(spec_path) == [], "ranks kept running after the orchestrator was killed"
    finally:
        for pid in _pids_with(spec_path):  # only the processes this test started
            os.kill(pid, signal.SIGKILL)


def test_a_rank_refuses_a_spec_rewritten_by_another_run_or_resolved_elsewhere(monkeypatch):
    from alignctl import ranks, worker

    monkeypatch.setenv(ranks.ATTEMPT_ENV, "abc123")
    with pytest.raises(RuntimeError, match="rewritten by another run"):
        worker._check_spec(stage_spec(attempt="other", precision_setting="fp32", precision="fp32"))
    worker._check_spec(stage_spec(attempt="abc123", precision_setting="fp32", precision="fp32"))
    from alignctl.models import precision_for

    elsewhere = "bf16" if precision_for("auto") != "bf16" else "fp16"
    with pytest.raises(RuntimeError, match="set precision explicitly"):
        worker._check_spec(stage_spec(attempt="abc123", precision_setting="auto", precision=elsewhere))


def test_a_holder_whose_lock_was_taken_over_knows_it(tmp_path):
    path = tmp_path / ".lock"
    mine = fsutil.FileLock(path, "entry", heartbeat=0.05).acquire()
    path.unlink()  # what a takeover does after `stale` seconds without a heartbeat (e.g. this process was stopped)
    with fsutil.FileLock(path, "entry", timeout=1):
        time.sleep(0.3)
        assert mine.lost
        mine.release()  # must not remove the new holder's lock
        assert path.exists()


def test_nan_weights_fail_the_stage_even_when_the_logged_loss_looks_fine():
    import torch

    from alignctl.errors import StageFailed
    from alignctl.train.health import check_weights_finite

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    check_weights_finite(model, "sft")
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(StageFailed, match=r"non-finite weights \(1.weight\)"):
        check_weights_finite(model, "sft")


def test_a_run_directory_left_by_a_killed_run_on_another_node_is_taken_over(tmp_path):
    path = tmp_path / ".alignctl.lock"
    path.write_text(json.dumps({"host": "node-7", "pid": 4242, "token": "t"}))  # no heartbeat any more
    t0 = time.monotonic()
    with fsutil.FileLock(path, "run directory", timeout=None, only_if_dead=True, stale=0.5):
        assert time.monotonic() - t0 >= 0.5
    path.write_text(json.dumps({"host": "node-7", "pid": 4242, "token": "t"}))
    beating = fsutil.FileLock(path, "run directory", timeout=None, only_if_dead=True, stale=5, poll=0.05)
    toucher = subprocess.Popen([sys.executable, "-c", f"import os, time\nfor _ in range(40): os.utime({str(path)!r}); "
                                "time.sleep(0.05)"])
    try:
        with pytest.raises(errors.LockTimeout, match="node-7 pid 4242 .* which is alive"):
            beating.acquire()  # its heartbeat moves: a live run elsewhere, refused without waiting for `stale`
    finally:
        toucher.wait()


def test_store_command_is_reachable_from_the_cli(tmp_path, capsys):
    from alignctl.cli import main

    assert main(["store", "ls", "--store", str(tmp_path / "missing")]) == 2
    assert "is not a store folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["store", "ls", "--store", str(tmp_path / "empty")]) == 0
    assert main(["store", "--help"]) == 0  # the store command's own help, not alignctl's usage
    assert "{ls,du,gc,rm,verify}" in capsys.readouterr().out
