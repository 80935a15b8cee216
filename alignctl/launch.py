"""How each stage's processes are started: ``local``, ``torchrun`` or ``accelerate`` (configs/launcher).

The orchestrator (the one process that ran Hydra) resolves the run once and writes each stage's spec to
``<run dir>/<stage>/spec.json``. ``local`` trains the stage in the orchestrator itself. ``torchrun`` and
``accelerate`` start ``python -m alignctl.worker <spec.json>`` on every rank of a fresh process group: every rank
reads the spec (never Hydra), rank 0 writes the final model and ``launch/result.json``, and the processes exit, so
all GPU memory is released before the next stage. Everything the ranks print goes to ``launch/output.log``; rank 0's
alignctl log lines are passed on to the run log. A rank that raises writes ``launch/rank<k>.error.json``; the
orchestrator then raises :class:`alignctl.errors.StageFailed` with the first failing rank's error, shown once.

Resolving the launcher node at plan time (world size, engine, global batch) is alignctl.config.launcher.
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

from alignctl import models
from alignctl.config.launcher import ENGINE_NAMES
from alignctl.config.types import StageSpec
from alignctl.errors import StageFailed
from alignctl.ranks import ATTEMPT_ENV

log = logging.getLogger("alignctl")

RAN_AS = {"none": ("NO", "MULTI_GPU", "MULTI_CPU"), "ddp": ("MULTI_GPU", "MULTI_CPU"), "deepspeed": ("DEEPSPEED",),
          "fsdp": ("FSDP",)}
FAIL_HOOK = "ALIGNCTL_TEST_FAIL_RANK"  # tests only: see alignctl.worker
_WORKER_LINE = re.compile(r"^alignctl\[rank(\d+)\]: (.*)$")


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
        from alignctl.train.lifecycle import run_stage as run_here

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
    from alignctl.config.redact import redact_text

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
