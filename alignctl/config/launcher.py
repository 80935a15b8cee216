"""How each stage's processes will be started, resolved at plan time without torch: the ``launcher`` group
(configs/launcher: ``local``, ``torchrun`` or ``accelerate``), its world size and distributed engine (DDP, DeepSpeed
ZeRO-1/2/3, FSDP, read from the accelerate config file), the global batch of a stage, the stage / engine
combinations that cannot work, and what this machine lacks for the launcher (checked by ``run`` only).

Starting the processes is alignctl.launch (run time).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignctl.errors import suggest

if TYPE_CHECKING:
    from alignctl.config.types import StageSpec
    from alignctl.stages import StageKind

ACCELERATE_DIR = Path(__file__).resolve().parent.parent / "assets" / "accelerate"
KINDS = ("local", "torchrun", "accelerate")
COMMON = {"kind": "local | torchrun | accelerate", "prefix": "command words put before the launcher (e.g. srun ...)",
          "extra_args": "extra arguments for the launcher", "env": "environment variables for the ranks"}
FIELDS = {
    "local": {"kind": COMMON["kind"]},
    "torchrun": {**COMMON, "nproc_per_node": "processes per node: an integer or gpu (the GPUs visible here)",
                 "nnodes": "number of nodes", "rdzv_backend": "rendezvous backend (c10d)",
                 "rdzv_endpoint": "host:port of the rendezvous (null: this host, a free port)",
                 "rdzv_id": "rendezvous id shared by the nodes (null: a fresh one per stage)"},
    "accelerate": {**COMMON, "config_file": "a shipped accelerate config (ddp, zero2, zero3, fsdp) or a path",
                   "num_processes": "processes on all machines: an integer, gpu, or null (the file's)",
                   "num_machines": "machines (null: the file's, else 1)"},
}
SHARDED = ("deepspeed-zero3", "fsdp")
ENGINE_NAMES = {"none": "a single process", "ddp": "DDP", "deepspeed-zero1": "DeepSpeed ZeRO-1",
                "deepspeed-zero2": "DeepSpeed ZeRO-2", "deepspeed-zero3": "DeepSpeed ZeRO-3", "fsdp": "FSDP"}


def shipped_configs() -> dict[str, Path]:
    return {p.stem: p for p in sorted(ACCELERATE_DIR.glob("*.yaml"))}


def gpu_count() -> int:
    """GPUs visible to this process, without importing torch: CUDA_VISIBLE_DEVICES, else ``nvidia-smi -L``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in visible.split(",") if v.strip()]
        return 0 if ids[:1] == ["-1"] else len(ids)
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def _count(value: Any, where: str, problems: list[str], allow_null: bool = False, allow_gpu: bool = True) -> int | None:
    """A process/node count: a positive integer (or a numeric string from ${oc.env:...}), ``gpu``, or null."""
    if value is None and allow_null:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if allow_gpu and value in ("gpu", "auto"):
        n = gpu_count()
        if n == 0:
            problems.append(f"{where}: {value} means one process per visible GPU, but no GPU is visible here; "
                            "set a number (on CPU the ranks use the gloo backend)")
        return n or None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"{where}: must be a positive integer{' or gpu' if allow_gpu else ''}, got {value!r}")
        return None
    return value


def resolve(node: dict | None, precision: str = "auto") -> tuple[dict, list[str]]:
    """The launcher node as a plain dict with ``world_size`` and ``distributed`` (the engine), plus problems."""
    node = dict(node or {"kind": "local"})
    kind = node.get("kind", "local")
    if kind not in KINDS:
        return {"kind": "local", "world_size": 1, "distributed": "none"}, [
            f"launcher.kind: unknown launcher '{kind}'{suggest(kind, KINDS)}; choose from {', '.join(KINDS)}"]
    problems = [f"launcher: unknown key '{k}'{suggest(k, FIELDS[kind])} for the {kind} launcher; its keys: "
                f"{', '.join(FIELDS[kind])}" for k in node if k not in FIELDS[kind]]
    out: dict[str, Any] = {"kind": kind, "world_size": 1, "distributed": "none"}
    if kind == "local":
        return out, problems
    for key in ("prefix", "extra_args"):
        value = node.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
            problems.append(f"launcher.{key}: must be a list of command-line words, got {value!r}")
            value = []
        out[key] = [str(v) for v in value]
    env = node.get("env") or {}
    if not isinstance(env, dict):
        problems.append(f"launcher.env: must be a mapping NAME: value, got {env!r}")
        env = {}
    out["env"] = {str(k): str(v) for k, v in env.items()}
    if kind == "torchrun":
        nproc = _count(node.get("nproc_per_node", "gpu"), "launcher.nproc_per_node", problems)
        nnodes = _count(node.get("nnodes", 1), "launcher.nnodes", problems, allow_gpu=False)
        out.update(nproc_per_node=nproc, nnodes=nnodes, rdzv_backend=node.get("rdzv_backend") or "c10d",
                   rdzv_endpoint=node.get("rdzv_endpoint"), rdzv_id=node.get("rdzv_id"))
        if nproc and nnodes:
            out["world_size"] = nproc * nnodes
            out["distributed"] = "ddp" if out["world_size"] > 1 else "none"
    else:
        _resolve_accelerate(node, precision, out, problems)
    return out, problems


def _resolve_accelerate(node: dict, precision: str, out: dict, problems: list[str]) -> None:
    import yaml

    name = str(node.get("config_file") or "ddp")
    shipped = shipped_configs()
    path = shipped.get(name) or Path(name).expanduser()
    if not path.is_file():
        problems.append(f"launcher.config_file: '{name}' is neither a shipped accelerate config "
                        f"({', '.join(shipped)}){suggest(name, shipped)} nor an existing file")
        return
    out["config_file"] = str(path.absolute())
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        problems.append(f"launcher.config_file: {path} is not valid YAML: {str(e).splitlines()[0]}")
        return
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"launcher.config_file: {path} cannot be read: {getattr(e, 'strerror', None) or e}")
        return
    if not isinstance(cfg, dict):
        problems.append(f"launcher.config_file: {path} must hold a mapping of accelerate settings (as written by "
                        f"`accelerate config`), got a {type(cfg).__name__}")
        return
    where = f"launcher.config_file ({path.name})"
    nproc = _count(node.get("num_processes", "gpu"), "launcher.num_processes", problems, allow_null=True)
    if nproc is None and "num_processes" in node and node["num_processes"] is None:
        nproc = _count(cfg.get("num_processes", 1), f"{where}: num_processes", problems)
    machines = _count(node.get("num_machines") or cfg.get("num_machines") or 1, "launcher.num_machines", problems,
                      allow_gpu=False)
    out.update(num_processes=nproc, num_machines=machines)
    if not isinstance(cfg.get("deepspeed_config") or {}, dict) or not isinstance(cfg.get("fsdp_config") or {}, dict):
        problems.append(f"{where}: deepspeed_config and fsdp_config must be mappings")
        return
    engine, engine_problems = accelerate_engine(cfg, where)
    problems += engine_problems
    mixed = str(cfg.get("mixed_precision") or "no")
    if mixed != "no" and mixed != precision:
        problems.append(f"{where}: mixed_precision {mixed} disagrees with precision {precision}; alignctl's "
                        f"`precision` sets mixed precision: set precision={mixed}, or mixed_precision: 'no' in "
                        "the file")
    if nproc and machines and nproc % machines:
        problems.append(f"launcher.num_processes: {nproc} processes do not split evenly over {machines} machines")
    if nproc:
        out["world_size"] = nproc
        out["distributed"] = "none" if engine == "ddp" and nproc == 1 else engine


def accelerate_engine(cfg: dict, where: str) -> tuple[str, list[str]]:
    """The engine an accelerate config selects, and what alignctl needs of it: ZeRO-3 must gather 16-bit weights on
    save and FSDP must save a FULL_STATE_DICT, else ``final/`` would not be a plain Hugging Face folder."""
    dtype = str(cfg.get("distributed_type", "NO"))
    if dtype in ("NO", "MULTI_GPU", "MULTI_CPU"):
        return "ddp", []
    if dtype == "DEEPSPEED":
        ds = dict(cfg.get("deepspeed_config") or {})
        stage, gather = ds.get("zero_stage"), ds.get("zero3_save_16bit_model")
        if ds.get("deepspeed_config_file"):
            try:
                ds_json = json.loads(Path(ds["deepspeed_config_file"]).expanduser().read_text())
            except (OSError, ValueError) as e:
                return "deepspeed", [f"{where}: deepspeed_config_file cannot be read: {e}"]
            if not isinstance(ds_json, dict) or not isinstance(ds_json.get("zero_optimization") or {}, dict):
                return "deepspeed", [f"{where}: deepspeed_config_file {ds['deepspeed_config_file']} must be a JSON "
                                     "object with a `zero_optimization` mapping"]
            zero = ds_json.get("zero_optimization") or {}
            stage = zero.get("stage", 0)
            gather = zero.get("stage3_gather_16bit_weights_on_model_save", zero.get(
                "gather_16bit_weights_on_model_save"))
        if stage not in (1, 2, 3):
            return "deepspeed", [f"{where}: deepspeed zero_stage must be 1, 2 or 3, got {stage!r}"]
        if stage == 3 and gather is not True:
            return "deepspeed-zero3", [f"{where}: ZeRO-3 must gather the 16-bit weights on save "
                                       "(deepspeed_config.zero3_save_16bit_model: true) so that final/ is a plain "
                                       "Hugging Face model, not a DeepSpeed checkpoint"]
        return f"deepspeed-zero{stage}", []
    if dtype == "FSDP":
        fsdp = dict(cfg.get("fsdp_config") or {})
        state = str(fsdp.get("fsdp_state_dict_type", fsdp.get("state_dict_type", "FULL_STATE_DICT")))
        problems = []
        if "FULL_STATE_DICT" not in state:
            problems.append(f"{where}: fsdp_state_dict_type is {state}; alignctl needs FULL_STATE_DICT so that final/ "
                            "is a plain Hugging Face model (gathered on rank 0), not sharded checkpoints")
        return "fsdp", problems
    return "unsupported", [f"{where}: distributed_type {dtype} is not supported by alignctl; use NO, MULTI_GPU, "
                           "DEEPSPEED or FSDP"]


def describe(launcher: dict) -> str:
    """One line for the plan: how the stages are launched."""
    kind, ws = launcher["kind"], launcher.get("world_size", 1)
    engine = ENGINE_NAMES.get(launcher.get("distributed", "none"), launcher.get("distributed"))
    if kind == "local":
        return "local (each stage in this process, one device)"
    if kind == "torchrun":
        where = f"{launcher.get('nproc_per_node')} per node × {launcher.get('nnodes')} node(s)"
    else:
        where = f"{launcher.get('num_processes')} on {launcher.get('num_machines')} machine(s), " \
                f"config {Path(launcher.get('config_file', '?')).name}"
    return f"{kind}: world size {ws} ({where}), {engine}"


def apply_batch(raw: dict, args: dict, trl: dict, launcher: dict, where: str) -> list[str]:
    """Derive gradient_accumulation_steps from the stage's ``global_batch_size`` for this world size (in ``args``)."""
    target = raw.get("global_batch_size")
    if target is None:
        return []
    if isinstance(target, bool) or not isinstance(target, int) or target < 1:
        return [f"{where}.global_batch_size: must be a positive integer, got {target!r}"]
    per_device = args.get("per_device_train_batch_size", trl.get("per_device_train_batch_size", {}).get("default", 8))
    if isinstance(per_device, bool) or not isinstance(per_device, int) or per_device < 1:
        return []  # the per-device batch itself is reported (checks.field_problems)
    ws = launcher.get("world_size") or 1
    step = per_device * ws
    if target % step:
        lower, upper = max(step, target - target % step), target - target % step + step
        return [f"{where}.global_batch_size: {target} is not a multiple of per_device_train_batch_size {per_device} × "
                f"world size {ws} = {step}; use {lower} or {upper}, or change per_device_train_batch_size"]
    gas = target // step
    if "gradient_accumulation_steps" in args and args["gradient_accumulation_steps"] != gas:
        return [f"{where}.gradient_accumulation_steps: {args['gradient_accumulation_steps']} contradicts "
                f"global_batch_size {target} (which needs {gas} at world size {ws}); set only one of them"]
    args["gradient_accumulation_steps"] = gas
    return []


def global_batch(stage: StageSpec, trl: dict) -> tuple[int, int, int, int]:
    """(global batch, per-device batch, gradient accumulation, world size) of a resolved stage."""
    args = stage.args
    per_device = args.get("per_device_train_batch_size", trl.get("per_device_train_batch_size", {}).get("default", 8))
    gas = args.get("gradient_accumulation_steps", trl.get("gradient_accumulation_steps", {}).get("default", 1))
    ws = stage.world_size
    return per_device * gas * ws, per_device, gas, ws


def stage_problems(kind: StageKind, peft: dict, launcher: dict, where: str) -> list[str]:
    """Combinations of a stage with the distributed engine that cannot work, found before anything runs (a kind
    that cannot run sharded says why: StageKind.sharded_unsupported)."""
    engine = launcher.get("distributed", "none")
    if engine not in SHARDED:
        return []
    problems = []
    name = ENGINE_NAMES[engine]
    if kind.sharded_unsupported:
        problems.append(f"{where}: a {kind.name} stage cannot run under {name}: {kind.sharded_unsupported}")
    if (peft or {}).get("method") == "qlora" and not peft.get("bnb_4bit_quant_storage"):
        problems.append(f"{where}.peft: qlora under {name} needs the 4-bit weights stored in the dtype of the other "
                        "parameters so that they can be sharded: set peft.bnb_4bit_quant_storage=bf16 (with "
                        "precision bf16)")
    return problems


def runtime_problems(launcher: dict | None) -> list[str]:
    """What this machine lacks for the launcher (checked by ``run`` before anything trains, not by ``plan``)."""
    from importlib.util import find_spec

    launcher = launcher or {"kind": "local"}
    engine = launcher.get("distributed", "none")
    problems = []
    if engine.startswith("deepspeed") and find_spec("deepspeed") is None:
        problems.append(f"launcher.config_file: {Path(launcher['config_file']).name} uses DeepSpeed, which is not "
                        "installed here: pip install 'alignctl[deepspeed]' (or choose config_file=ddp or fsdp)")
    nodes = launcher.get("nnodes") if launcher.get("kind") == "torchrun" else launcher.get("num_machines")
    if isinstance(nodes, int) and nodes > 1 and not launcher.get("prefix"):
        key = "nnodes" if launcher.get("kind") == "torchrun" else "num_machines"
        problems.append(f"launcher.{key}: {nodes} nodes, but no `prefix` starts {launcher['kind']} on the other nodes "
                        "(it would wait for them ~10 minutes); set e.g. launcher.prefix=[srun,--ntasks-per-node=1]")
    nproc = launcher.get("nproc_per_node") if launcher.get("kind") == "torchrun" else launcher.get("num_processes")
    if isinstance(nproc, int) and not launcher.get("prefix"):  # this machine starts every process
        if launcher.get("kind") == "accelerate":
            nproc //= max(1, launcher.get("num_machines") or 1)
        gpus = gpu_count()
        have, what = (gpus, "GPUs") if gpus else (os.cpu_count() or 1, "CPU cores")
        if nproc > have:
            key = "nproc_per_node" if launcher.get("kind") == "torchrun" else "num_processes"
            problems.append(f"launcher.{key}: {nproc} processes on this machine, which has {have} {what}; use at "
                            f"most {have} (one process per {'GPU' if gpus else 'core'})")
    if (engine.startswith("deepspeed") or engine == "fsdp") and gpu_count() == 0:
        problems.append(f"launcher.config_file: {ENGINE_NAMES.get(engine, engine)} needs CUDA GPUs and none is visible "
                        "here; on CPU use launcher=torchrun or config_file=ddp (DDP over gloo)")
    return problems
