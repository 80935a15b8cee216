"""Wall time of a 3-point DPO beta sweep (shared SFT trained once, via the stage store) against 3 independent full runs.

Both are measured side by side in this one run, on the default tiny recipe, through the real CLI:

    python benchmarks/sweep_reuse.py [--points 0.05,0.1,0.5]

Prints each wall time and their ratio (sweep / independent); target <= 0.6.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def alignctl(args: list[str], cwd: Path) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "alignctl.cli", *args], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", default="0.05,0.1,0.5")
    betas = ap.parse_args().points.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Build the tiny model once so neither side pays for it.
        alignctl(["plan", f"output_root={tmp}/o"], tmp)
        from alignctl import models

        models.materialize("tiny:llama", tmp / "o" / ".cache")
        # Independent runs: a separate store each, so every run trains SFT and DPO.
        independent = sum(alignctl(["run", f"output_root={tmp}/o", f"store={tmp}/ind{i}", f"stages.dpo.beta={b}",
                                    f"hydra.run.dir={tmp}/ind{i}/run"], tmp) for i, b in enumerate(betas))
        sweep = alignctl(["run", "-m", f"output_root={tmp}/o", f"store={tmp}/sweep-store",
                          f"stages.dpo.beta={','.join(betas)}", f"hydra.sweep.dir={tmp}/sweep"], tmp)
    print(f"{len(betas)} independent full runs: {independent:7.1f} s")
    print(f"{len(betas)}-point sweep (SFT once): {sweep:7.1f} s")
    print(f"ratio sweep / independent:   {sweep / independent:7.2f}  (target <= 0.6)")


if __name__ == "__main__":
    main()
