"""Launchers at plan time: world size and global batch in the plan, combinations that cannot work refused, the
shipped accelerate configs, the launch commands, world size in the fingerprint (the runs: tests/e2e/test_launch.py)."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from alignctl import launch
from alignctl.cli import main
from alignctl.config import launcher as launch_config

TORCHRUN_2 = ["launcher=torchrun", "launcher.nproc_per_node=2"]


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
                 "launcher.num_processes=8").count("world size 8 (DeepSpeed ZeRO-2)") == 5  # 5 stages
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
    from alignctl import fingerprint
    from alignctl.config.compose import compose
    from alignctl.config.resolve import resolve
    from alignctl.pipeline import stage_specs

    def fps(*overrides):
        return fingerprint.fingerprints(stage_specs(resolve(compose(list(overrides)), tmp_path / "run")))

    local = fps()
    assert fps("launcher=torchrun", "launcher.nproc_per_node=1") == local  # one process either way: same weights
    two = fps(*TORCHRUN_2)
    assert two["sft"] != local["sft"] and two["dpo"] != local["dpo"]
    assert fps("launcher=accelerate", "launcher.num_processes=2") == two  # DDP through either launcher


def test_slurm_sweep_example_composes_one_task_per_job():
    """configs/hydra/launcher/slurm_gpu_node.yaml: one SLURM job per sweep point, one task (alignctl) per job."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the slurm extra")
    from alignctl.config.compose import compose

    cfg = compose(["hydra/launcher=slurm_gpu_node", "launcher=torchrun"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.tasks_per_node == 1 and cfg.hydra.launcher.nodes == 1
    assert cfg.launcher.kind == "torchrun" and cfg.launcher.nproc_per_node == "gpu"
