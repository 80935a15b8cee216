"""Launchers (issue 6): each stage through torchrun / accelerate ranks, world size and global batch in the plan,
a failing rank's error shown once, the shipped accelerate configs, and the sharded-weights (ZeRO-3 / FSDP) path."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from alignctl import launch
from alignctl.cli import main
from alignctl.config import launcher as launch_config
from conftest import read_manifest, read_spec, run_cli

FAST = ["stages.sft.max_steps=4", "stages.dpo.max_steps=3"]  # the default recipe, a few optimizer steps per stage
TORCHRUN_2 = ["launcher=torchrun", "launcher.nproc_per_node=2"]


# -- the default recipe through torchrun, 2 CPU processes (gloo) ---------------------------------------------------
@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("torchrun")
    run_dir = work / "run"
    proc = run_cli(["run", f"hydra.run.dir={run_dir}", f"output_root={work}/outputs", *TORCHRUN_2, *FAST,
                    "stages.dpo.global_batch_size=64"], cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, run_dir, proc


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
    proc = run_cli(["run", f"hydra.run.dir={run_dir}", f"output_root={work}/outputs", *TORCHRUN_2, *FAST,
                    "stages.dpo.global_batch_size=64", "stages.dpo.beta=0.2"], cwd=work)
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


# -- the plan: world size and global batch under each launcher ---------------------------------------------------
def _plan(capsys, *args) -> str:
    rc = main(["plan", *args])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return re.sub(r"\s+", " ", out.out)


@pytest.mark.parametrize("args, world, engine, batches", [
    ([], 1, "a single process", (16, 16)),
    (["launcher=torchrun", "launcher.nproc_per_node=4"], 4, "DDP", (64, 64)),
    (["launcher=torchrun", "launcher.nproc_per_node=4", "launcher.nnodes=2"], 8, "DDP", (128, 128)),
    (["launcher=accelerate", "launcher.num_processes=8"], 8, "DDP", (128, 128)),
    (["launcher=accelerate", "launcher.config_file=zero2", "launcher.num_processes=8"], 8, "DeepSpeed ZeRO-2",
     (128, 128)),
    (["launcher=accelerate", "launcher.config_file=zero3", "launcher.num_processes=8",
      "stages.dpo.gradient_accumulation_steps=2"], 8, "DeepSpeed ZeRO-3", (128, 256)),
    (["launcher=accelerate", "launcher.config_file=fsdp", "launcher.num_processes=2"], 2, "FSDP", (32, 32)),
])
def test_plan_shows_world_size_and_global_batch(capsys, args, world, engine, batches):
    out = _plan(capsys, *args)
    assert out.count(f"world size {world} ({engine})") == 2
    sft, dpo = batches
    assert f"batch global {sft} = 16 per device × 1 accumulation × {world} world size" in out
    gas = dpo // (16 * world)
    assert f"batch global {dpo} = 16 per device × {gas} accumulation × {world} world size" in out


def test_global_batch_size_derives_accumulation_for_the_world_size(capsys):
    out = _plan(capsys, "launcher=torchrun", "launcher.nproc_per_node=2", "stages.sft.global_batch_size=128")
    assert "batch global 128 = 16 per device × 4 accumulation × 2 world size" in out
    out = _plan(capsys, "launcher=torchrun", "launcher.nproc_per_node=8", "stages.sft.global_batch_size=128")
    assert "batch global 128 = 16 per device × 1 accumulation × 8 world size" in out


def _plan_error(capsys, *args) -> str:
    rc = main(["plan", *args])
    out = capsys.readouterr()
    assert rc == 2, out.out + out.err
    assert "Traceback" not in out.err
    return out.err


def test_global_batch_size_errors(capsys):
    err = _plan_error(capsys, *TORCHRUN_2, "stages.sft.global_batch_size=100")
    assert "stages.sft.global_batch_size: 100 is not a multiple of per_device_train_batch_size 16 × world size 2" \
        in err
    assert "use 96 or 128" in err
    err = _plan_error(capsys, *TORCHRUN_2, "stages.sft.global_batch_size=64",
                      "stages.sft.gradient_accumulation_steps=4")
    assert "stages.sft.gradient_accumulation_steps: 4 contradicts global_batch_size 64" in err


def test_combinations_that_cannot_work_are_rejected_at_plan_time(capsys, tmp_path, monkeypatch):
    zero3 = ["launcher=accelerate", "launcher.config_file=zero3", "launcher.num_processes=8"]
    err = _plan_error(capsys, "recipe=rlhf-ppo", *zero3)
    assert "stages.ppo: a ppo stage cannot run under DeepSpeed ZeRO-3" in err and "stages.sft" not in err
    assert _plan(capsys, "recipe=rlhf-ppo", "launcher=accelerate", "launcher.config_file=zero2",
                 "launcher.num_processes=8").count("world size 8 (DeepSpeed ZeRO-2)") == 3
    err = _plan_error(capsys, "peft=qlora", "launcher=accelerate", "launcher.config_file=fsdp",
                      "launcher.num_processes=2")
    assert "stages.dpo.peft: qlora under FSDP" in err and "bnb_4bit_quant_storage=bf16" in err
    _plan(capsys, "peft=qlora", "peft.bnb_4bit_quant_storage=bf16", "precision=bf16", *zero3)
    # User accelerate configs: what alignctl relies on is checked.
    bad = tmp_path / "z3.yaml"
    bad.write_text(yaml.safe_dump({"distributed_type": "DEEPSPEED", "mixed_precision": "bf16",
                                   "deepspeed_config": {"zero_stage": 3}}))
    err = _plan_error(capsys, "launcher=accelerate", f"launcher.config_file={bad}", "launcher.num_processes=2")
    assert "z3.yaml): ZeRO-3 must gather the 16-bit weights on save" in err
    assert "mixed_precision bf16 disagrees with precision auto" in err
    bad.write_text(yaml.safe_dump({"distributed_type": "FSDP", "fsdp_config": {
        "fsdp_state_dict_type": "SHARDED_STATE_DICT"}}))
    err = _plan_error(capsys, "launcher=accelerate", f"launcher.config_file={bad}", "launcher.num_processes=2")
    assert "fsdp_state_dict_type is SHARDED_STATE_DICT; alignctl needs FULL_STATE_DICT" in err
    err = _plan_error(capsys, "launcher=accelerate", "launcher.config_file=zero4")
    assert "'zero4' is neither a shipped accelerate config (ddp, fsdp, zero2, zero3)" in err
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    err = _plan_error(capsys, "launcher=torchrun", "launcher.nprocs=2")
    assert "launcher: unknown key 'nprocs'" in err
    assert "launcher.nproc_per_node: gpu means one process per visible GPU" in err


# -- the shipped accelerate configs ----------------------------------------------------------------------------------
def test_shipped_accelerate_configs_have_what_alignctl_relies_on():
    from accelerate.commands.config.config_args import load_config_from_file

    shipped = launch_config.shipped_configs()
    assert set(shipped) == {"ddp", "zero2", "zero3", "fsdp"}
    for name, path in shipped.items():
        cfg = yaml.safe_load(path.read_text())
        text = path.read_text()
        assert text.startswith("# accelerate config shipped with alignctl"), name
        load_config_from_file(str(path))  # accelerate itself accepts the file (no unknown keys)
        # alignctl's `precision` drives mixed precision; the file stays neutral (the launcher also passes 'no').
        assert cfg["mixed_precision"] == "no", name
        assert "num_processes" not in cfg and cfg["num_machines"] == 1  # launcher.num_processes decides
    assert yaml.safe_load(shipped["ddp"].read_text())["distributed_type"] == "MULTI_GPU"
    for name, stage in (("zero2", 2), ("zero3", 3)):
        cfg = yaml.safe_load(shipped[name].read_text())
        ds = cfg["deepspeed_config"]
        assert cfg["distributed_type"] == "DEEPSPEED" and ds["zero_stage"] == stage
        # the TRL config fills DeepSpeed's "auto" batch settings; a fixed value here would contradict it
        assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds
    z3 = yaml.safe_load(shipped["zero3"].read_text())["deepspeed_config"]
    assert z3["zero3_save_16bit_model"] is True and z3["zero3_init_flag"] is True
    fsdp = yaml.safe_load(shipped["fsdp"].read_text())
    assert fsdp["distributed_type"] == "FSDP"
    assert fsdp["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is False
    assert {launch_config.accelerate_engine(yaml.safe_load(p.read_text()), n)[0] for n, p in shipped.items()} == {
        "ddp", "deepspeed-zero2", "deepspeed-zero3", "fsdp"}
    assert all(not launch_config.accelerate_engine(yaml.safe_load(p.read_text()), n)[1] for n, p in shipped.items())


def test_launch_commands():
    node, problems = launch_config.resolve({"kind": "accelerate", "config_file": "zero3", "num_processes": 8})
    assert not problems
    cmd = launch.command(node, "/runs/r/dpo/spec.json")
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and cmd[-3:] == ["-m", "alignctl.worker",
                                                                           "/runs/r/dpo/spec.json"]
    joined = shlex.join(cmd)
    assert f"--config_file {launch_config.ACCELERATE_DIR / 'zero3.yaml'}" in joined and "--num_processes 8" in joined
    assert "--mixed_precision no" in joined
    node, problems = launch_config.resolve({"kind": "torchrun", "nproc_per_node": "4", "nnodes": 2, "prefix": [
        "srun", "--ntasks-per-node=1"], "rdzv_id": "job7"})
    assert not problems and node["world_size"] == 8
    cmd = launch.command(node, "spec.json")
    assert cmd[:2] == ["srun", "--ntasks-per-node=1"] and "--standalone" not in cmd
    assert re.search(r"--rdzv_endpoint \S+:\d+ --rdzv_id job7", shlex.join(cmd))


def test_world_size_is_part_of_the_stage_fingerprint(tmp_path):
    from alignctl import store
    from alignctl.config.compose import compose
    from alignctl.config.resolve import resolve
    from alignctl.pipeline import stage_specs

    def fps(*overrides):
        return store.fingerprints(stage_specs(resolve(compose(list(overrides)), tmp_path / "run")))

    local = fps()
    assert fps("launcher=torchrun", "launcher.nproc_per_node=1") == local  # one process either way: same weights
    two = fps(*TORCHRUN_2)
    assert two["sft"] != local["sft"] and two["dpo"] != local["dpo"]
    assert fps("launcher=accelerate", "launcher.num_processes=2") == two  # DDP through either launcher


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
def test_sharded_weights_path_matches_the_plain_path(run_recipe, tmp_path, monkeypatch):
    """Under ZeRO-3 / FSDP the "before" evaluation runs inside train() (step 0) and final/ is written by the
    Trainer's gathering save_model. Forced here on one CPU process, it must give the numbers of the plain path."""
    from safetensors.torch import load_file

    from alignctl.train import lifecycle

    plain = run_recipe([*FAST, f"store={tmp_path}/store-plain"], tmp_path / "plain")
    monkeypatch.setattr(lifecycle, "weights_sharded", lambda trainer: True)
    sharded = run_recipe([*FAST, f"store={tmp_path}/store-sharded"], tmp_path / "sharded")
    for a, b in zip(plain["stages"], sharded["stages"]):
        head = "eval_pref_accuracy" if a["name"] == "dpo" else "eval_loss"
        assert b["metrics"]["before"][head] == pytest.approx(a["metrics"]["before"][head], abs=1e-5)
        assert b["metrics"]["after"][head] == pytest.approx(a["metrics"]["after"][head], abs=1e-4)
    final = tmp_path / "sharded" / "dpo" / "final"
    assert not (final / "training_args.bin").exists() and (final / "tokenizer.json").is_file()
    w_plain = load_file(str(tmp_path / "plain" / "dpo" / "final" / "model.safetensors"))
    w_sharded = load_file(str(final / "model.safetensors"))
    assert w_plain.keys() == w_sharded.keys()


def test_slurm_sweep_example_composes_one_task_per_job():
    """configs/hydra/launcher/slurm_gpu_node.yaml: one SLURM job per sweep point, one task (alignctl) per job."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the slurm extra")
    from alignctl.config.compose import compose

    cfg = compose(["hydra/launcher=slurm_gpu_node", "launcher=torchrun"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node == 1 and cfg.hydra.launcher.nodes == 1
    assert cfg.launcher.kind == "torchrun" and cfg.launcher.nproc_per_node == "gpu"
