"""Interrupted runs: SIGKILL mid-stage then re-run resumes; SIGTERM stops cleanly with a valid manifest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import read_manifest, run_cli, run_spec, stage_spec

pytestmark = pytest.mark.slow

FAST = ["stages.sft.num_train_epochs=4", "stages.dpo.num_train_epochs=4"]


def start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "alignctl.cli", *args], cwd=cwd, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_for_checkpoint(proc: subprocess.Popen, store: Path, trainer: str, timeout: float = 240) -> Path:
    t0 = time.time()
    while time.time() - t0 < timeout:
        found = list(store.glob(f"{trainer}-*/checkpoints/checkpoint-*/trainer_state.json"))
        if found:
            return found[0].parent
        assert proc.poll() is None, f"run ended before a {trainer} checkpoint appeared"
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


def interrupt_at_checkpoint(args: list[str], tmp_path: Path, store: Path, trainer: str, sig: int):
    """Start a run, send ``sig`` once the ``trainer`` stage has a complete checkpoint; returns (exit code,
    checkpoint)."""
    proc = start(args, tmp_path, tmp_path / "first.log")
    ckpt = wait_for_checkpoint(proc, store, trainer)
    proc.send_signal(sig)
    return proc.wait(timeout=60), ckpt


def final_loads(path: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoTokenizer.from_pretrained(path)
    AutoModelForCausalLM.from_pretrained(path)


def test_sigkill_in_each_stage_then_rerun_resumes_it(tmp_path):
    """kill -9 during SFT: the re-run resumes SFT from its checkpoint; kill -9 again during DPO: the next re-run
    reuses the completed SFT, resumes DPO from its checkpoint and finishes, and DPO still learns."""
    run_dir, store = tmp_path / "run", tmp_path / "store"
    args = ["run", f"hydra.run.dir={run_dir}", f"output_root={tmp_path}/out", f"store={store}", *FAST,
            "stages.sft.save_strategy=steps", "stages.sft.save_steps=5",
            "stages.dpo.save_strategy=steps", "stages.dpo.save_steps=5"]
    interrupt_at_checkpoint(args, tmp_path, store, "sft", signal.SIGKILL)
    assert json.loads((run_dir / "manifest.json").read_text())["stages"][0]["status"] == "running"
    assert not list(store.glob("sft-*/COMPLETE"))

    # the second run resumes SFT, completes it, and is killed in turn once DPO has a checkpoint
    proc = start(args, tmp_path, tmp_path / "second.log")
    ckpt = wait_for_checkpoint(proc, store, "dpo")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert "[sft] resuming from" in (tmp_path / "second.log").read_text()
    m = read_manifest(run_dir)  # still valid JSON
    assert [s["status"] for s in m["stages"]] == ["completed", "running"] and m["status"] == "running"

    again = run_cli(args, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    m = read_manifest(run_dir)
    assert m["status"] == "completed" and [s["status"] for s in m["stages"]] == ["completed", "completed"]
    sft, dpo = m["stages"]
    assert sft["reused_from"] and not dpo["reused_from"], "SFT must not be retrained"
    out = again.stdout + again.stderr
    assert "[dpo] resuming from" in out and "checkpoint-" in out
    resumed_at = int(ckpt.name.split("-")[1])
    # per-step metrics are in the run log (the console shows one line per stage): those after the resume
    resumed_log = (run_dir / "alignctl.log").read_text().rsplit("[dpo] resuming from", 1)[1]
    steps = [int(line.split("step ")[1].split(":")[0]) for line in resumed_log.splitlines() if "[dpo] step " in line]
    assert steps and min(s for s in steps if s > 0) > resumed_at  # training went on from the checkpoint
    assert dpo["metrics"]["after"]["eval_pref_accuracy"] >= 0.9
    final_loads(m["final_model"])


def test_sigterm_stops_cleanly_and_marks_interrupted(tmp_path):
    run_dir, store = tmp_path / "run", tmp_path / "store"
    # SFT only needs to complete here (a few steps); DPO is stopped at its first checkpoint
    args = ["run", f"hydra.run.dir={run_dir}", f"output_root={tmp_path}/out", f"store={store}", *FAST,
            "stages.sft.max_steps=8", "stages.dpo.save_strategy=steps", "stages.dpo.save_steps=5"]
    rc, _ = interrupt_at_checkpoint(args, tmp_path, store, "dpo", signal.SIGTERM)
    assert rc != 0
    m = read_manifest(run_dir)
    assert m["status"] == "interrupted" and [s["status"] for s in m["stages"]] == ["completed", "interrupted"]
    assert not list(store.glob("dpo-*/COMPLETE")) and not (run_dir / "dpo" / "final").exists()
    log = (tmp_path / "first.log").read_text()
    assert "Re-run the same command to resume" in log and "Traceback" not in log


# -- which checkpoint a re-run resumes from (issue 12) ---------------------------------------------------------------
def make_checkpoint(root: Path, step: int, state: str | None = None, optimizer: bytes | None = b"o" * 64,
                    truncate_weights: bool = False) -> Path:
    import torch
    from safetensors.torch import save_file

    ckpt = root / "checkpoints" / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}) if state is None else state)
    save_file({"w": torch.ones(64, 64)}, str(ckpt / "model.safetensors"))
    if truncate_weights:
        os.truncate(ckpt / "model.safetensors", (ckpt / "model.safetensors").stat().st_size // 2)
    if optimizer is not None:
        (ckpt / "optimizer.pt").write_bytes(optimizer)
    return ckpt


def test_resume_picks_the_newest_valid_checkpoint_and_says_which_it_skipped(tmp_path, caplog):
    from alignctl import store

    caplog.set_level("INFO", logger="alignctl")
    e = store.Entry(tmp_path, "sft", "f" * 64)
    make_checkpoint(e.dir, 10)
    make_checkpoint(e.dir, 15, optimizer=b"")  # a truncated optimizer.pt
    make_checkpoint(e.dir, 20, optimizer=None)  # save_only_model: no optimizer/scheduler state
    make_checkpoint(e.dir, 25, truncate_weights=True)
    make_checkpoint(e.dir, 30, state="")  # an empty trainer_state.json (ENOSPC / killed mid-write)
    make_checkpoint(e.dir, 35, state='{"epoch": 1}')
    ckpt, skipped = e.resume_checkpoint()
    assert Path(ckpt).name == "checkpoint-10"
    assert skipped == [("checkpoint-35", "trainer_state.json has no global_step"),
                       ("checkpoint-30", "trainer_state.json is not valid JSON"),
                       ("checkpoint-25", "truncated model.safetensors"),
                       ("checkpoint-20", "no optimizer state (saved with save_only_model?)"),
                       ("checkpoint-15", "empty file(s): optimizer.pt")]
    assert e.resume_point(stage_spec("sft")) == ckpt
    assert "stage sft: skipping checkpoint checkpoint-30: trainer_state.json is not valid JSON" in caplog.text
    assert "stage sft: resuming from checkpoint-10 (step 10)" in caplog.text


def test_checkpoints_on_top_of_an_upstream_trained_again_are_dropped(tmp_path, caplog):
    from alignctl import pipeline, store

    root = tmp_path / "store"
    sft = store.Entry(root, "sft", "a" * 64)
    sft.final.mkdir(parents=True)
    (sft.final / "model.safetensors").write_bytes(b"1" * 100)
    sft.mark_complete({})
    run_dir = tmp_path / "run"
    spec = run_spec(run_dir, root, stage_spec("sft", run_dir=run_dir), stage_spec("dpo", "dpo", "sft", run_dir))
    run_dir.mkdir()
    manifest = pipeline.Manifest(spec, [])
    manifest.update("sft", fingerprint=sft.fingerprint)
    dpo = store.Entry(root, "dpo", "b" * 64)
    s = spec.stages[1]
    first = dpo.check_upstream(s, manifest.entries())
    make_checkpoint(dpo.dir, 5)
    assert dpo.check_upstream(s, manifest.entries()) == first and dpo.last_checkpoint()  # same SFT: resumable
    sft.invalidate()  # SFT removed and trained again under the same fingerprint: other weights
    sft.final.mkdir()
    (sft.final / "model.safetensors").write_bytes(b"2" * 100)
    sft.mark_complete({})
    assert dpo.check_upstream(s, manifest.entries()) != first
    assert dpo.last_checkpoint() is None and "were trained again since its checkpoints" in caplog.text
