"""rlhf-ppo over seeds, judged by its audit reward model (never the model PPO optimises): the held-out reward gain,
win rate and length-controlled win rate over the SFT model, and the last quarter's KL against kl_target.

Each seed runs the recipe through the real CLI with ``stages.ppo.seed=<seed>`` (SFT and both reward models come from
the store after the first run) and any extra overrides, e.g. the KL-held variant:

    python benchmarks/ppo_seeds.py [--seeds 1 2 3] [--dir DIR] [overrides...]
    python benchmarks/ppo_seeds.py stages.ppo.reward=rm     # one reward model instead of the shipped ensemble

Targets (issue 20): reward gain >= +1.0, win rate >= 0.8, LC win rate >= 0.7, last-quarter KL within +-50 % of
the stage's kl_target (when set). Prints one row per seed and whether each target holds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def seed_args(doc: str, prefix: str) -> tuple[argparse.Namespace, Path]:
    """The command line of a benchmark over seeds (--seeds, --dir, overrides) and its work folder."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    return a, (a.dir or Path(tempfile.mkdtemp(prefix=prefix))).absolute()


def main() -> None:
    a, work = seed_args(__doc__, "ppo-seeds-")
    print(f"rlhf-ppo {' '.join(a.overrides)} (work: {work})")
    print("| seed | audit reward before → after | gain | win rate [95% CI] | LC win rate [95% CI] | KL last quarter |")
    print("| --- | --- | --- | --- | --- | --- |")
    held = []
    for seed in a.seeds:
        run_dir = work / f"seed{seed}"
        cmd = [sys.executable, "-m", "alignctl.cli", "run", "recipe=rlhf-ppo", f"hydra.run.dir={run_dir}",
               f"output_root={work}/outputs", f"stages.ppo.seed={seed}", *a.overrides]
        proc = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"run failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        m = json.loads((run_dir / "manifest.json").read_text())
        ppo = next(s for s in m["stages"] if s["name"] == "ppo")["metrics"]
        b, f, kl = ppo["before"], ppo["after"], ppo["rollouts"]["kl_last_quarter"]
        target = json.loads((run_dir / "ppo" / "spec.json").read_text())["spec"]["args"].get("kl_target")
        assert ppo["eval"]["reward"] == "rm_audit", ppo["eval"]
        gain = f["eval_reward_mean"] - b["eval_reward_mean"]
        ok = [gain >= 1.0, f["eval_win_rate"] >= 0.8, f["eval_win_rate_lc"] >= 0.7,
              target is None or abs(kl - target) <= 0.5 * target]
        held.append(all(ok))
        print(f"| {seed} | {b['eval_reward_mean']:.2f} → {f['eval_reward_mean']:.2f} | {gain:+.2f} | "
              f"{f['eval_win_rate']:.2f} [{f['eval_win_rate_low']:.2f}, {f['eval_win_rate_high']:.2f}] | "
              f"{f['eval_win_rate_lc']:.2f} [{f['eval_win_rate_lc_low']:.2f}, {f['eval_win_rate_lc_high']:.2f}] | "
              f"{kl:.2f} |" + ("" if all(ok) else " misses: " + ", ".join(
                  n for n, o in zip(("gain", "win", "LC", "KL"), ok) if not o)))
    print(f"targets held on {sum(held)} of {len(held)} seeds")


if __name__ == "__main__":
    main()
