"""Launchers, run for real: each stage through torchrun ranks (2 CPU processes, gloo), a failing rank's error shown
once, an engine this machine lacks refused, and the sharded-weights (ZeRO-3 / FSDP) path (plan-time launcher checks:
tests/config/test_launchers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignctl import launch
from alignctl.config import launcher as launch_config
from conftest import read_manifest, read_spec, run_cli

pytestmark = pytest.mark.slow

# the default recipe, a few optimizer steps per stage; the plain DPO loss, which moves 3 steps measurably far from the
# reference (the default's added NLL term keeps DPO's held-out KL ~1e-4 after 3 steps: below what the test can tell)
FAST = ["stages.sft.max_steps=4", "stages.dpo.max_steps=3", "stages.dpo.loss_type=sigmoid"]
TORCHRUN_2 = ["launcher=torchrun", "launcher.nproc_per_node=2"]
# The same global batches on one process and on two (one process accumulates 2 micro-batches), and two batches of
# held-out prompts (per_device_eval_batch_size 32; the built-in data holds 50), so that each of two processes
# answers one of them.
SAME = [*FAST, "stages.sft.global_batch_size=32", "stages.dpo.global_batch_size=64", "eval.max_prompts=64"]


# -- the default recipe through torchrun, 2 CPU processes (gloo) ---------------------------------------------------
@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("torchrun")
    run_dir = work / "run"
    proc = run_cli(["run", f"hydra.run.dir={run_dir}", f"output_root={work}/outputs", *TORCHRUN_2, *SAME], cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, run_dir, proc


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, cache_root):
    """The torchrun run's recipe and settings on one process (its own store): (run dir, manifest)."""
    from alignctl import pipeline
    from alignctl.config.compose import compose
    from alignctl.config.resolve import resolve

    work = tmp_path_factory.mktemp("one-process")
    overrides = [f"output_root={cache_root}", f"store={work}/store", *SAME]
    return work / "run", pipeline.run(resolve(compose(overrides), work / "run"), overrides)


def test_torchrun_two_processes_run_both_stages_as_ddp(torchrun_run):
    _, run_dir, proc = torchrun_run
    m = read_manifest(run_dir)
    assert m["status"] == "completed"
    assert m["launcher"]["kind"] == "torchrun" and m["launcher"]["world_size"] == 2
    assert [(s["name"], s["status"], s["world_size"], s["distributed"]) for s in m["stages"]] == [
        ("sft", "completed", 2, "ddp"), ("dpo", "completed", 2, "ddp")]
    for stage in ("sft", "dpo"):
        launch_dir = run_dir / stage / "launch"
        ranks = [json.loads((launch_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
        # Really one DDP job of two processes (gloo on CPU), not two independent single-process runs.
        assert {(r["rank"], r["world_size"], r["distributed_type"]) for r in ranks} == {
            (0, 2, "MULTI_CPU"), (1, 2, "MULTI_CPU")}
        assert "gloo" in ranks[0]["backend"] and ranks[0]["pid"] != ranks[1]["pid"]
        # Hydra ran once, in the orchestrator: no rank imported it (ranks read only the stage's spec.json).
        assert not any(r["hydra_imported"] for r in ranks)
        assert json.loads((launch_dir / "result.json").read_text())["hydra_imported"] is False
        assert "-m alignctl.worker" in (launch_dir / "command.txt").read_text()
    assert len(list(run_dir.rglob("config.yaml"))) == 1
    # The batches were split over the two ranks: SFT (576 training rows, 16 per device) covers 2 × 16 rows per step;
    # DPO's global_batch_size 64 gave gradient_accumulation_steps 2 at world size 2, i.e. 64 rows per step.
    sft_hist = json.loads((run_dir / "sft" / "log_history.json").read_text())
    assert sft_hist[-1]["epoch"] == pytest.approx(4 * 32 / 576)
    dpo_spec = read_spec(run_dir / "dpo" / "spec.json")
    assert dpo_spec.args["gradient_accumulation_steps"] == 2 and dpo_spec.world_size == 2
    dpo_hist = json.loads((run_dir / "dpo" / "log_history.json").read_text())
    assert dpo_hist[-1]["epoch"] == pytest.approx(3 * 64 / 576)
    # It learned: held-out SFT loss fell; rank 0's log lines reached the run log (once, not once per rank).
    sft = m["stages"][0]["metrics"]
    assert sft["after"]["eval_loss"] < sft["before"]["eval_loss"] - 0.3
    log = (run_dir / "alignctl.log").read_text()
    assert "[dpo] step 3:" in log and log.count("[sft] step 4: train_runtime") == 1
    assert "Traceback" not in proc.stdout + proc.stderr


def test_torchrun_reports_the_held_out_evaluation_of_one_process(torchrun_run, one_process_run):
    """Two DDP processes each answer one batch of the 64 held-out prompts and gather: the "before" answers (same
    weights, same seeds per batch) are the one-process answers; after training (same global batches, reduced in
    another order) the metrics agree within sampling noise."""
    _, run_dir, _ = torchrun_run
    one_dir, one = one_process_run
    two = read_manifest(run_dir)
    for a, b in zip(one["stages"], two["stages"]):
        name = a["name"]
        n = a["metrics"]["eval"]["prompts"]
        assert "skipped" not in b["metrics"]["eval"] and b["metrics"]["eval"]["prompts"] == n > 32  # 2 batches
        rows = [[json.loads(line) for line in (d / name / "samples.jsonl").read_text().splitlines()]
                for d in (one_dir, run_dir)]
        assert [r["prompt"] for r in rows[0]] == [r["prompt"] for r in rows[1]] and len(rows[1]) == n
        same = sum(x["before"] == y["before"] for x, y in zip(*rows))
        if name == "sft":  # the same initial weights (DPO starts from each run's own SFT weights)
            assert same >= n - 3, f"{name}: {same} of {n} before-answers equal"  # a float-order tie may flip one
        for phase in ("before", "after"):
            m1, m2 = a["metrics"][phase], b["metrics"][phase]
            assert m2["eval_completion_tokens"] == pytest.approx(m1["eval_completion_tokens"], rel=0.15)
            assert m2["eval_kl"] == pytest.approx(m1["eval_kl"], rel=0.3, abs=0.002), (name, phase, m1, m2)
        assert b["metrics"]["after"]["eval_kl"] > 0.002  # trained away from its reference (SFT ~0.018, DPO ~0.004)


def test_torchrun_final_model_loads_and_differs_from_sft(torchrun_run):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run_dir, _ = torchrun_run
    final = read_manifest(run_dir)["final_model"]
    weights = sorted(p.name for p in Path(final).iterdir() if p.suffix in (".bin", ".safetensors"))
    assert weights == ["model.safetensors"]
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    ids = tok.apply_chat_template([{"role": "user", "content": "describe the river ."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    assert torch.isfinite(model(**ids).logits).all()
    sft = load_file(str(run_dir / "sft" / "final" / "model.safetensors"))
    dpo = load_file(str(run_dir / "dpo" / "final" / "model.safetensors"))
    assert any(not torch.equal(sft[k], dpo[k]) for k in sft)


def test_failing_rank_fails_the_run_with_its_error_shown_once(torchrun_run, monkeypatch):
    work, _, _ = torchrun_run
    run_dir = work / "failing"
    monkeypatch.setenv(launch.FAIL_HOOK, "1:dpo")  # rank 1 raises in the dpo stage (alignctl.worker's test hook)
    proc = run_cli(["run", f"hydra.run.dir={run_dir}", f"output_root={work}/outputs", *TORCHRUN_2, *SAME,
                    "stages.dpo.beta=0.2"], cwd=work)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert out.count("failure injected on rank 1") == 1, out[-3000:]
    assert "stage dpo failed on rank 1 of 2" in proc.stderr
    assert out.count("Traceback") == 1 and "ChildFailedError" not in out  # the rank's traceback, not torchrun's
    m = read_manifest(run_dir)
    assert m["status"] == "failed" and "rank 1 of 2" in m["error"] and "failure injected" in m["error"]
    assert [(s["name"], s["status"]) for s in m["stages"]] == [("sft", "completed"), ("dpo", "failed")]
    assert m["stages"][0]["reused_from"]  # the sft stage of the first run was reused from the store
    err = json.loads((run_dir / "dpo" / "launch" / "rank1.error.json").read_text())
    assert err["rank"] == 1 and "failure injected" in err["traceback"]
    assert "ChildFailedError" in (run_dir / "dpo" / "launch" / "output.log").read_text()  # kept for debugging


def test_run_refuses_an_engine_this_machine_lacks(run_recipe, tmp_path):
    from importlib.util import find_spec

    from alignctl.errors import ConfigError

    if find_spec("deepspeed") is not None and launch_config.gpu_count():
        pytest.skip("DeepSpeed and a GPU are available here")
    with pytest.raises(ConfigError) as e:
        run_recipe(["launcher=accelerate", "launcher.config_file=zero3", "launcher.num_processes=2"], tmp_path / "r")
    assert "DeepSpeed ZeRO-3" in str(e.value) or "DeepSpeed, which is not installed" in str(e.value)
    m = read_manifest(tmp_path / "r")
    assert m["status"] == "failed" and all(s["status"] == "pending" for s in m["stages"])


# -- ZeRO-3 / FSDP: the gathered save and the evaluation at step 0, exercised on one CPU process ---------------------
def test_sharded_weights_path_matches_the_plain_path(run_recipe, one_process_run, tmp_path, monkeypatch):
    """Under ZeRO-3 / FSDP the "before" evaluation runs inside train() (step 0) and final/ is written by the
    Trainer's gathering save_model. Forced here on one CPU process, it must give the numbers of the plain path."""
    from safetensors.torch import load_file

    from alignctl.train import lifecycle

    plain_dir, plain = one_process_run
    monkeypatch.setattr(lifecycle, "weights_sharded", lambda trainer: True)
    sharded = run_recipe([*SAME, f"store={tmp_path}/store-sharded"], tmp_path / "sharded")
    for a, b in zip(plain["stages"], sharded["stages"]):
        head = "eval_pref_accuracy" if a["name"] == "dpo" else "eval_loss"
        assert b["metrics"]["before"][head] == pytest.approx(a["metrics"]["before"][head], abs=1e-5)
        assert b["metrics"]["after"][head] == pytest.approx(a["metrics"]["after"][head], abs=1e-4)
        # no process holds the whole weights to sample from: the answers are left to `alignctl eval <run dir>`
        assert "ZeRO-3 / FSDP" in b["metrics"]["eval"]["skipped"] and "prompts" in a["metrics"]["eval"]
    final = tmp_path / "sharded" / "dpo" / "final"
    assert not (final / "training_args.bin").exists() and (final / "tokenizer.json").is_file()
    w_plain = load_file(str(plain_dir / "dpo" / "final" / "model.safetensors"))
    w_sharded = load_file(str(final / "model.safetensors"))
    assert w_plain.keys() == w_sharded.keys()


