"""One rank of a stage: ``python -m alignctl.worker <spec.json>``, started by torchrun or accelerate.

Every rank reads the stage spec the orchestrator wrote (the run was resolved once, by the process that ran Hydra;
nothing here imports Hydra) and runs :func:`alignctl.runner.run_stage`: the TRL trainer does the distributed work,
rank 0 writes the final model. Each rank then reports into ``<spec dir>/launch/``:

* ``rank<k>.json``: world size, device, distributed backend, and whether Hydra was imported in this process;
* ``result.json`` (rank 0): the stage's metrics and the world size, read by the orchestrator;
* ``rank<k>.error.json`` (a rank that raised): its error line and traceback. The rank prints one short line and
  exits 1; the orchestrator shows the first failing rank's error once (see :mod:`alignctl.launch`).

Testing hook: ``ALIGNCTL_TEST_FAIL_RANK=<rank>[:<stage>]`` makes that rank raise before loading anything (in that
stage only, with ``:<stage>``). tests/test_launch.py uses it to check how a failing rank is reported.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from alignctl.launch import FAIL_HOOK, rank_env


def _write(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _test_hook(rank: int, stage: str) -> None:
    value = os.environ.get(FAIL_HOOK)
    if not value:
        return
    want_rank, _, want_stage = value.partition(":")
    if int(want_rank) == rank and want_stage in ("", stage):
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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

        from alignctl.runner import load_spec, run_stage

        spec = load_spec(spec_path)
        _test_hook(rank, spec.get("name", ""))
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
