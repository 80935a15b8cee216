"""What a process learns from the launcher's environment: its rank, and the attempt it was started for.

Imported by the orchestrator (alignctl.launch sets the variables), the ranks (alignctl.worker) and the stage code
that runs in both (rank 0 saves and checks): a leaf module, so that none of them imports another for it.
"""

from __future__ import annotations

import os

ATTEMPT_ENV = "ALIGNCTL_ATTEMPT"  # the attempt id of the spec the ranks must read (see alignctl.worker)


def rank_env() -> tuple[int, int, int]:
    """(rank, local rank, world size) from the launcher's environment."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))
