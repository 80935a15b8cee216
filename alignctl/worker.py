"""One rank of a stage: ``python -m alignctl.worker <spec.json>``, started by torchrun or accelerate.

Every rank reads the stage spec the orchestrator wrote (``StageSpec.from_json``; the run was resolved once, by the
process that ran Hydra; nothing here imports Hydra) and runs :func:`alignctl.train.lifecycle.run_stage`: the TRL
trainer does the distributed work, rank 0 writes the final model. Each rank then reports into ``<spec dir>/launch/``:

* ``rank<k>.json``: world size, device, distributed backend, and whether Hydra was imported in this process;
* ``result.json`` (rank 0): the stage's metrics and the world size, read by the orchestrator;
* ``rank<k>.error.json`` (a rank that raised): its error line and traceback. The rank prints one short line and
  exits 1; the orchestrator shows the first failing rank's error once (see :mod:`alignctl.launch`).

Ranks die with their parent: each rank sets the Linux parent-death signal (``PR_SET_PDEATHSIG``, SIGKILL) at start, or
elsewhere watches its parent pid from a thread, so no rank trains on after its launcher is gone; the launcher itself
runs behind ``python -m alignctl.worker --guard <orchestrator pid> -- <command>``, which sets the same signal and
execs the command, so a killed orchestrator takes the launcher and its ranks with it. A rank also refuses a spec
whose ``attempt`` id is not the one the orchestrator started it for (another run rewrote that spec.json), a spec
whose ``precision: auto`` resolves differently on this machine than on the orchestrator's, and a stage whose store
entry's lock no longer holds the orchestrator's ``lock_token``; rank 0 checks that token again right before it
replaces the entry's ``final/`` or ``adapter/`` (alignctl.train.context.owner_guard).

Testing hook: ``ALIGNCTL_TEST_FAIL_RANK=<rank>[:<stage>]`` makes that rank raise before loading anything (in that
stage only, with ``:<stage>``). tests/e2e/test_launch.py uses it to check how a failing rank is reported. It is read in
production (a real launch is the only way to test a failing rank); a value that does not parse is ignored with one
warning on rank 0.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from alignctl.config.types import StageSpec
from alignctl.fsutil import write_text_atomic
from alignctl.launch import FAIL_HOOK
from alignctl.ranks import ATTEMPT_ENV, rank_env

PR_SET_PDEATHSIG = 1


def _write(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


_HOOK_VALUE = re.compile(r"^\s*(\d+)(?::([A-Za-z0-9_][A-Za-z0-9_-]*))?\s*$")


def _test_hook(rank: int, stage: str) -> None:
    """Tests only (ALIGNCTL_TEST_FAIL_RANK=<rank>[:<stage>]): make that rank raise before loading anything. Read in
    every rank because a failing rank can only be tested in a real launch; a value that does not parse is ignored
    (one warning on rank 0), so a stray setting can never fail a real run."""
    value = os.environ.get(FAIL_HOOK)
    if not value:
        return
    m = _HOOK_VALUE.match(value)
    if m is None:
        if rank == 0:
            logging.getLogger("alignctl").warning("ignoring %s=%r: a test hook, expected <rank>[:<stage>]",
                                                  FAIL_HOOK, value[:40])
        return
    if int(m.group(1)) == rank and m.group(2) in (None, stage):
        raise RuntimeError(f"failure injected on rank {rank} by {FAIL_HOOK}={value}")


def _process_info(rank: int, local_rank: int, world: int) -> dict:
    info = {"rank": rank, "local_rank": local_rank, "world_size": world, "pid": os.getpid(),
            "hydra_imported": "hydra" in sys.modules, "device": "cpu", "backend": None}
    torch = sys.modules.get("torch")
    if torch is not None:
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(torch.cuda.current_device())
            info["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            info["backend"] = torch.distributed.get_backend_config()
            info["world_size"] = torch.distributed.get_world_size()
    accelerate_state = sys.modules.get("accelerate.state")
    if accelerate_state is not None and accelerate_state.PartialState._shared_state:
        # how the Trainer actually ran: MULTI_GPU / MULTI_CPU (DDP), DEEPSPEED, FSDP, or NO
        info["distributed_type"] = str(accelerate_state.PartialState().distributed_type).split(".")[-1]
    return info


def _setup_logging(rank: int) -> None:
    """alignctl's own log lines carry the rank (the orchestrator passes rank 0's on to the run log; other ranks log
    warnings only); everything else (library warnings) goes plainly to stderr, i.e. to launch/output.log."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING, stream=sys.stderr)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"alignctl[rank{rank}]: %(message)s"))
    logger = logging.getLogger("alignctl")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def die_with_parent() -> None:
    """Get SIGKILL when the parent process dies (Linux prctl), else a thread that exits when the parent changes."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        def watch():
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(137)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def guard(argv: list[str]) -> int:
    """``--guard <pid> -- cmd...``: exec ``cmd`` with the parent-death signal set (it survives exec), unless the
    parent ``pid`` is already gone."""
    if len(argv) < 4 or argv[2] != "--":
        print("usage: python -m alignctl.worker --guard <parent pid> -- <command...>", file=sys.stderr)
        return 2
    die_with_parent()
    if os.getppid() != int(argv[1]):
        return 137
    os.execvp(argv[3], argv[3:])
    return 127  # pragma: no cover - execvp does not return


def _check_spec(spec: StageSpec) -> None:
    """The spec must be the one this attempt was started for, and ``precision: auto`` must resolve as it did in the
    orchestrator (it is part of the stage's fingerprint)."""
    want = os.environ.get(ATTEMPT_ENV)
    if want and spec.attempt != want:
        raise RuntimeError(f"the stage spec was rewritten by another run (attempt {spec.attempt}, expected "
                           f"{want}); nothing was trained. Give each run its own run directory")
    if spec.lock_token:  # the orchestrator lost the entry's lock before this rank started: do not train
        from alignctl.fsutil import check_owner

        check_owner(Path(spec.entry_dir) / ".lock", spec.lock_token, f"stage {spec.name}")
    if spec.precision_setting == "auto":
        from alignctl.models import precision_for

        here = precision_for("auto")
        if here != spec.precision:
            raise RuntimeError(f"precision auto is {here} on this machine but {spec.precision} where alignctl "
                               "runs; set precision explicitly (bf16, fp16 or fp32)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--guard"]:
        return guard(argv)
    die_with_parent()
    if os.getppid() == 1:  # the launcher died before the signal was set: orphaned at birth
        return 137
    if len(argv) != 1:
        print("usage: python -m alignctl.worker <stage spec.json>", file=sys.stderr)
        return 2
    spec_path = Path(argv[0])
    out = spec_path.parent / "launch"
    out.mkdir(parents=True, exist_ok=True)
    rank, local_rank, world = rank_env()
    _setup_logging(rank)
    try:
        import torch

        from alignctl.train.lifecycle import run_stage

        spec = StageSpec.from_json(spec_path.read_text())
        _check_spec(spec)
        _test_hook(rank, spec.name)
        if world > 1 and not torch.cuda.is_available():
            # Without this, accelerate treats CPU ranks as separate single-process runs (no gradient averaging);
            # with it the Trainer runs DDP over gloo (what `accelerate launch --cpu` sets).
            os.environ.setdefault("ACCELERATE_USE_CPU", "true")
        metrics = run_stage(spec)
        info = _process_info(rank, local_rank, world)
        if rank == 0:
            _write(out / "result.json", {"metrics": metrics, "world_size": info["world_size"],
                                         "hydra_imported": info["hydra_imported"], "device": info["device"],
                                         "backend": info["backend"],
                                         "distributed_type": info.get("distributed_type")})
        _write(out / f"rank{rank}.json", info)
        _shutdown()
    except BaseException as e:  # noqa: BLE001 - every failure is reported the same way, then the rank exits
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        _write(out / f"rank{rank}.error.json", {"rank": rank, "error": error, "time": time.time(),
                                                "traceback": traceback.format_exc()})
        print(f"alignctl worker rank {rank}: {error} (traceback: {out / f'rank{rank}.error.json'})", file=sys.stderr)
        # no process-group teardown here: it can wait on peers stuck in a collective; the launcher ends them
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    return 0


def _shutdown() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
