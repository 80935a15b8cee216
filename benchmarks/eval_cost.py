"""What the held-out evaluation (alignctl.evaluate) adds to the default run's wall time.

Runs the default recipe (tiny SFT -> DPO, CPU) through the real CLI with eval.enabled=true and eval.enabled=false,
alternating, each run in a fresh output root and store (so both train every stage), and prints the median wall time
of each and their ratio. Target: ratio <= 1.15.

    OMP_NUM_THREADS=1 python benchmarks/eval_cost.py [--repeats 3] [extra overrides...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def eval_seconds(run_dir: Path) -> float:
    """Seconds the runs' stages spent in the held-out evaluation (manifest: metrics.eval.seconds)."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return sum(((s.get("metrics") or {}).get("eval") or {}).get("seconds") or 0 for s in manifest["stages"])


def one_run(enabled: bool, work: Path, i: int, extra: list[str], inside: list[float] | None = None) -> float:
    root = work / f"{'on' if enabled else 'off'}-{i}"
    cmd = [sys.executable, "-m", "alignctl.cli", "run", f"hydra.run.dir={root}/run", f"output_root={root}/outputs",
           f"eval.enabled={'true' if enabled else 'false'}", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"run failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    if inside is not None:
        inside.append(eval_seconds(root / "run"))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="alignctl-eval-cost-") as tmp:
        work = Path(tmp)
        one_run(False, work, -1, extra)  # warm-up: builds the tiny model cache and the OS file cache
        times: dict[bool, list[float]] = {True: [], False: []}
        inside: list[float] = []
        for i in range(args.repeats):
            for enabled in ((True, False) if i % 2 == 0 else (False, True)):
                times[enabled].append(one_run(enabled, work, i, extra, inside if enabled else None))
                print(f"run {i + 1}/{args.repeats} eval.enabled={str(enabled).lower():5s} "
                      f"{times[enabled][-1]:6.2f} s", flush=True)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"default recipe, whole `alignctl run` wall time (median of {args.repeats}): "
          f"eval.enabled=true {on:.2f} s, eval.enabled=false {off:.2f} s")
    print(f"ratio enabled/disabled: {on / off:.3f} (target <= 1.15)")
    spent = statistics.median(inside)
    print(f"time inside the evaluation (manifest metrics.eval.seconds, median): {spent:.2f} s = "
          f"{100 * spent / off:.1f}% of the run without it (ratio {(off + spent) / off:.3f}); the two ratios differ "
          "by the machine's noise between runs")


if __name__ == "__main__":
    main()
