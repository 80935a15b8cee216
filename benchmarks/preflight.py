"""What `run`'s up-front checks cost on the default recipe (target: at most 3 s), next to the run they protect.

    python benchmarks/preflight.py [--repeat 3] [--no-run]

Measured in fresh processes (HF_HUB_OFFLINE=1):
  * checks (plan level): compose + resolve for `run` (alignctl.config.compose.check_point: every key, range, choice,
    name, path, model and recipe-file check; for a sweep, once per point);
  * checks (run level): alignctl.pipeline.preflight: every stage's TRL config built, every stage's data loaded and
    column-checked, device checks; plus the launcher's machine checks. The stages' TRL config modules and datasets
    are imported first and timed on their own: with the local launcher the first stage imports them anyway to
    train (with torchrun/accelerate launchers the orchestrator pays this import for the checks);
  * a full `alignctl run` of the default recipe (training included), for scale.
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

PROBE = r"""
import importlib, json, sys, time, tempfile
from alignctl import pipeline
from alignctl.config import launcher
from alignctl.config.compose import check_point
from alignctl.stages import STAGES
out = tempfile.mkdtemp()
t0 = time.perf_counter()
spec = check_point([f"output_root={out}", f"hydra.run.dir={out}/run"], run=True)
t_plan = time.perf_counter() - t0
t0 = time.perf_counter()
import datasets  # what the first stage imports anyway to train: datasets and its TRL config/trainer modules
for s in spec.stages:
    module, _, cls = STAGES[s.kind].config_class.rpartition(".")
    getattr(importlib.import_module(module), cls)
t_import = time.perf_counter() - t0
t0 = time.perf_counter()
problems = launcher.runtime_problems(spec.launcher)
pipeline.preflight(pipeline.stage_specs(spec))
t_preflight = time.perf_counter() - t0
print(json.dumps({"import": t_import, "plan_checks": t_plan, "preflight": t_preflight}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-run", action="store_true", help="skip the full run (training) used for scale")
    a = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    samples = []
    for _ in range(a.repeat):
        proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
        samples.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    checks = 2 * med["plan_checks"] + med["preflight"]  # run resolves twice: before Hydra starts, and in the job
    print(f"default recipe, median of {a.repeat} fresh processes (HF_HUB_OFFLINE=1)")
    plan = med["plan_checks"]
    print(f"  checks, plan level (compose + resolve for run)   {plan:6.2f} s   x2 (before Hydra, in the job)")
    print(f"  checks, run level (TRL configs, data, devices)   {med['preflight']:6.2f} s")
    print(f"  up-front checks in all                           {checks:6.2f} s   (target <= 3 s)")
    print(f"  import of the stages' TRL modules + datasets     {med['import']:6.2f} s   (paid by training anyway)")
    if a.no_run:
        return
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "alignctl.cli", "run", f"output_root={tmp}/out", f"hydra.run.dir={tmp}/run"]
        subprocess.run(cmd, capture_output=True, env=env, check=True)  # builds the tiny model once
        t0 = time.perf_counter()
        subprocess.run([*cmd[:-1], f"hydra.run.dir={tmp}/run2", f"store={tmp}/store2"], capture_output=True,
                       env=env, check=True)
        total = time.perf_counter() - t0
    print(f"  full `alignctl run` (fresh store, training)      {total:6.2f} s")
    print(f"  checks / full run                                {checks / total:6.1%}")


if __name__ == "__main__":
    main()
