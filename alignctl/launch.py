"""How each stage's processes are started: ``local``, ``torchrun`` or ``accelerate`` (configs/launcher).

The orchestrator (the one process that ran Hydra) resolves the run once and writes each stage's spec to
``<run dir>/<stage>/spec.json``. ``local`` trains the stage in the orchestrator itself. ``torchrun`` and
``accelerate`` start ``python -m alignctl.worker <spec.json>`` on every rank of a fresh process group: every rank
reads the spec (never Hydra), rank 0 writes the final model and ``launch/result.json``, and the processes exit, so
all GPU memory is released before the next stage. Everything the ranks print goes to ``launch/output.log``; rank 0's
alignctl log lines are passed on to the run log. A rank that raises writes ``launch/rank<k>.error.json``; the
orchestrator then raises :class:`alignctl.errors.StageFailed` with the first failing rank's error, shown once.

:func:`resolve` (used by ``alignctl plan``) computes the world size and the distributed engine (DDP, DeepSpeed
ZeRO-2/3, FSDP) without importing torch.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from alignctl import models
from alignctl.config.types import StageSpec
from alignctl.errors import StageFailed, suggest
from alignctl.ranks import ATTEMPT_ENV, rank_env  # noqa: F401  (moved: alignctl.ranks; re-exported for callers)

log = logging.getLogger("alignctl")

ACCELERATE_DIR = Path(__file__).parent / "assets" / "accelerate"
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
# Stage kinds that cannot run when the weights are sharded across ranks (ZeRO-3, FSDP), and why.
SHARDED_UNSUPPORTED = {
    "ppo": "alignctl's PPO stage samples held-out completions from and saves the policy outside TRL's parameter "
           "gathering, which sharded weights need; use zero2 or ddp",
}
SHARDED = ("deepspeed-zero3", "fsdp")
ENGINE_NAMES = {"none": "a single process", "ddp": "DDP", "deepspeed-zero1": "DeepSpeed ZeRO-1",
                "deepspeed-zero2": "DeepSpeed ZeRO-2", "deepspeed-zero3": "DeepSpeed ZeRO-3", "fsdp": "FSDP"}
# What accelerate reports (its DistributedType) for each planned engine.
RAN_AS = {"none": ("NO", "MULTI_GPU", "MULTI_CPU"), "ddp": ("MULTI_GPU", "MULTI_CPU"), "deepspeed": ("DEEPSPEED",),
          "fsdp": ("FSDP",)}
FAIL_HOOK = "ALIGNCTL_TEST_FAIL_RANK"  # tests only: see alignctl.worker
_WORKER_LINE = re.compile(r"^alignctl\[rank(\d+)\]: (.*)$")


# -- resolving the launcher node (plan time, no torch) ------------------------------------------------------------
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


def global_batch(stage: dict, trl: dict) -> tuple[int, int, int, int]:
    """(global batch, per-device batch, gradient accumulation, world size) of a resolved stage."""
    args = stage["args"]
    per_device = args.get("per_device_train_batch_size", trl.get("per_device_train_batch_size", {}).get("default", 8))
    gas = args.get("gradient_accumulation_steps", trl.get("gradient_accumulation_steps", {}).get("default", 1))
    ws = stage.get("world_size", 1)
    return per_device * gas * ws, per_device, gas, ws


def stage_problems(trainer: str, peft: dict, launcher: dict, where: str) -> list[str]:
    """Combinations of a stage with the distributed engine that cannot work, found before anything runs."""
    engine = launcher.get("distributed", "none")
    if engine not in SHARDED:
        return []
    problems = []
    name = ENGINE_NAMES[engine]
    if trainer in SHARDED_UNSUPPORTED:
        problems.append(f"{where}: a {trainer} stage cannot run under {name}: {SHARDED_UNSUPPORTED[trainer]}")
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


# -- running a stage -----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def command(launcher: dict, spec_path: str | os.PathLike) -> list[str]:
    """The command line that starts every rank of a stage."""
    worker = ["-m", "alignctl.worker", str(spec_path)]
    py = sys.executable
    if launcher["kind"] == "torchrun":
        cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(launcher["nproc_per_node"]),
               "--nnodes", str(launcher["nnodes"])]
        if launcher["nnodes"] == 1 and not launcher.get("rdzv_endpoint"):
            cmd.append("--standalone")  # a free local port: concurrent sweep jobs on one machine do not collide
        else:
            endpoint = launcher.get("rdzv_endpoint") or f"{socket.gethostname()}:{_free_port()}"
            cmd += ["--rdzv_backend", launcher["rdzv_backend"], "--rdzv_endpoint", str(endpoint),
                    "--rdzv_id", str(launcher.get("rdzv_id") or uuid.uuid4().hex[:12])]
    elif launcher["kind"] == "accelerate":
        cmd = [py, "-m", "accelerate.commands.launch", "--config_file", launcher["config_file"],
               "--num_processes", str(launcher["num_processes"]), "--num_machines", str(launcher["num_machines"]),
               # alignctl's `precision` decides mixed precision (the Trainer's bf16/fp16 flags), not the file
               "--mixed_precision", "no"]
        if launcher["num_machines"] == 1:
            cmd += ["--main_process_port", str(_free_port())]
    else:
        raise ValueError(f"launcher {launcher['kind']!r} starts no processes")
    return [*launcher.get("prefix", []), *cmd, *launcher.get("extra_args", []), *worker]


def run_stage(work: StageSpec, spec_path: str | os.PathLike, launcher: dict | None) -> dict:
    """Train one stage with the launcher; returns ``{"metrics": ..., "world_size": ...}``.

    ``work`` has already been written to ``spec_path`` (the worker reads it there: :meth:`StageSpec.from_json`)."""
    launcher = launcher or {"kind": "local"}
    if launcher["kind"] == "local":
        from alignctl.runner import run_stage as run_here

        with models.training_environment(work):  # no inherited variable changes how it trains (alignctl.models)
            return {"metrics": run_here(work), "world_size": 1}
    for link in work.links.values():  # build a built-in tiny model once, not per rank
        if link.path:
            models.materialize(link.path, work.cache_dir, work.model)
    out = Path(spec_path).parent / "launch"
    env, dropped = models.training_env(work, dict(os.environ), launcher.get("env", {}))  # as in-process (local)
    models.note_dropped_env(work.name, dropped)
    env.update({"PYTHONUNBUFFERED": "1", ATTEMPT_ENV: work.attempt or ""})
    for retry in range(PORT_RETRIES + 1):
        rc = _launch_once(work.name, spec_path, launcher, env, out)
        if retry == PORT_RETRIES or not _port_was_taken(launcher, out, rc):
            break
        log.warning("stage %s: the port given to accelerate was taken by another process before it started "
                    "(address already in use); launching again with a fresh port (retry %d of %d)", work.name,
                    retry + 1, PORT_RETRIES)
    return _collect(work.name, out, rc, launcher)


PORT_RETRIES = 3  # launches again after the main process port was taken between _free_port() and accelerate's bind
_PORT_TAKEN = re.compile(r"EADDRINUSE|address already in use", re.IGNORECASE)


def _launch_once(stage: str, spec_path: str | os.PathLike, launcher: dict, env: dict, out: Path) -> int:
    """Start every rank of the stage once (a fresh ``launch/`` folder, a fresh port); the launcher's exit code."""
    from alignctl.checks import redact_text

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = command(launcher, spec_path)
    (out / "command.txt").write_text(redact_text(" ".join(cmd)) + "\n")  # e.g. srun --export=...,HF_TOKEN=...
    log.info("stage %s: launching %d processes with %s (output of every rank: %s)", stage,
             launcher["world_size"], launcher["kind"], out / "output.log")
    return _stream(cmd, env, out / "output.log")


def _port_was_taken(launcher: dict, out: Path, rc: int) -> bool:
    """A single-machine accelerate launch that failed because its main process port was in use: another job took
    the port alignctl picked (:func:`_free_port` cannot reserve it). torchrun on one node picks its own port
    (``--standalone``) and is not retried."""
    if launcher.get("kind") != "accelerate" or launcher.get("num_machines") != 1 or rc == 0 \
            or (out / "result.json").is_file():
        return False
    return any(_PORT_TAKEN.search(_tail(p)) for p in (out / "output.log", *out.glob("rank*.error.json"))
               if p.is_file())


def _tail(path: Path, size: int = 1 << 18) -> str:
    """The last ``size`` bytes of a file, as text."""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - size))
        return f.read().decode(errors="replace")


GRACE_S = 30  # seconds the launcher's process group gets to stop after SIGTERM, before SIGKILL
_LIVE: set[subprocess.Popen] = set()


def guarded(cmd: list[str]) -> list[str]:
    """``cmd`` behind alignctl's guard (alignctl.worker --guard): it sets the parent-death signal, so the launcher
    (torchrun / accelerate / srun) is killed when this process dies, even by SIGKILL, and its ranks, which set the
    same signal on themselves, die with it."""
    return [sys.executable, "-m", "alignctl.worker", "--guard", str(os.getpid()), "--", *cmd]


DRAIN_S = 2.0  # seconds to read what is left in the pipe once the launcher has exited


def _stream(cmd: list[str], env: dict, output: Path) -> int:
    """Run the launcher; every line goes to ``output``, rank log lines of alignctl also to the run log.

    The launcher runs in a new session (its own process group) behind :func:`guarded`; on Ctrl-C / SIGTERM /
    an error here the whole group gets SIGTERM, then SIGKILL after ``GRACE_S`` (a second interrupt kills at once),
    and at interpreter exit any group still alive is killed. The end of the stage is the launcher's exit, not the
    end of its output: a process that left the group (``setsid``) and still holds the pipe is not waited for."""
    with open(output, "w") as sink:
        proc = subprocess.Popen(guarded(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, bufsize=0,
                                start_new_session=True)
        _LIVE.add(proc)
        try:
            _pump(proc, lambda line: _pass_on(line, sink))
            return proc.wait()
        except BaseException:  # Ctrl-C / SIGTERM of the orchestrator: stop every rank too
            stop_group(proc)
            raise
        finally:
            _kill_group(proc, 9)  # anything of the group still alive (a rank the launcher did not reap)
            proc.stdout.close()
            _LIVE.discard(proc)


def _pump(proc: subprocess.Popen, emit, drain: float = DRAIN_S) -> None:
    """Read ``proc``'s output line by line until end of file, or until ``drain`` seconds after ``proc`` exited (its
    group is killed then: whatever still writes to the pipe outlived the launcher)."""
    import select
    import time

    fd, pending, deadline = proc.stdout.fileno(), b"", None
    while deadline is None or time.monotonic() < deadline:
        if deadline is None and proc.poll() is not None:
            _kill_group(proc, 9)
            deadline = time.monotonic() + drain
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            emit(line.decode(errors="replace") + "\n")
    if pending:
        emit(pending.decode(errors="replace") + "\n")


def _pass_on(line: str, sink) -> None:
    sink.write(line)
    sink.flush()
    m = _WORKER_LINE.match(line.rstrip("\n"))
    if m and m.group(1) == "0":
        log.info("%s", m.group(2))
    elif m:
        log.warning("[rank %s] %s", m.group(1), m.group(2))


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(proc: subprocess.Popen, grace: float = GRACE_S) -> None:
    """SIGTERM to the launcher's process group (torchrun passes it on to its ranks), SIGKILL after ``grace``
    seconds or at a second interrupt."""
    import signal

    _kill_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log.warning("the launcher did not stop within %d s; killing it", grace)
    except KeyboardInterrupt:  # a second Ctrl-C / SIGTERM while waiting: do not wait any longer
        pass
    finally:
        _kill_group(proc, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            pass


def kill_live_groups() -> int:
    """SIGKILL the process group of every running launcher (torchrun / accelerate and their ranks) at once, e.g.
    when the orchestrator lost a stage's store lock and the stage must stop writing; returns how many."""
    live = list(_LIVE)
    for proc in live:
        _kill_group(proc, 9)
    return len(live)


@atexit.register
def _kill_live_groups() -> None:
    kill_live_groups()


def _collect(stage: str, out: Path, rc: int, launcher: dict) -> dict:
    errors = []
    for f in out.glob("rank*.error.json"):
        try:
            errors.append(json.loads(f.read_text()))
        except ValueError:
            continue
    result = out / "result.json"
    if rc == 0 and result.is_file() and not errors:
        data = json.loads(result.read_text())
        ran, planned = data.get("distributed_type"), launcher.get("distributed", "none")
        if ran and ran not in RAN_AS.get(planned.split("-")[0], (ran,)):
            log.warning("stage %s: planned %s, but the Trainer ran as %s; see %s", stage,
                        ENGINE_NAMES.get(planned, planned), ran, out / "output.log")
        return data
    ws = launcher.get("world_size", "?")
    if errors:
        first = min(errors, key=lambda e: e.get("time", 0))  # the root cause; others may fail because it did
        where = f"on rank {first['rank']} of {ws}"
        if len(errors) > 1:
            where += f" ({len(errors) - 1} other rank(s) failed after it)"
        raise StageFailed(stage, where, first["error"], first.get("traceback", ""), str(out / "output.log"))
    if result.is_file():  # rank 0 finished and saved; a non-zero exit at teardown does not lose the stage
        log.warning("stage %s: %s exited with code %s after rank 0 reported success; see %s", stage,
                    launcher["kind"], rc, out / "output.log")
        return json.loads(result.read_text())
    tail = (out / "output.log").read_text(errors="replace").splitlines()[-15:]
    raise StageFailed(stage, f"({launcher['kind']} exited with code {rc} and no rank reported an error: killed, out "
                      "of memory?)", "last lines of the output:\n  " + "\n  ".join(tail), "", str(out / "output.log"))
