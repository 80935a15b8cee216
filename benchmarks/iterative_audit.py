"""iterative-dpo over seeds, judged by an independent reward model: is round 2 better than round 1?

The audit is `rm_audit` of the rlhf-ppo recipe (the same SFT model and pairs, another seed; trained once here with a
short PPO stage), which iterative-dpo never trains on. Each seed runs

    alignctl run recipe=iterative-dpo seed=<s> eval.reward=<rm_audit> eval.max_prompts=<n>

and reads dpo2's held-out samples: its "before" answers are round 1's policy, its "after" answers round 2's, on the
same prompts, so the per-prompt difference of the audit's scores is paired. Prints per seed the audit reward of SFT,
round 1 and round 2, the mean paired difference round 2 - round 1 with a 95 % bootstrap interval over prompts, and
whether it excludes 0.

    python benchmarks/iterative_audit.py [--seeds 1 2 3] [--dir DIR] [overrides...]
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys


def _cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "alignctl.cli", *args], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: alignctl {' '.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def paired_interval(diffs: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of the paired differences and its 95 % bootstrap interval (prompts resampled with replacement)."""
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(diffs) for _ in diffs) / len(diffs) for _ in range(draws))
    return sum(diffs) / len(diffs), means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def main() -> None:
    from ppo_seeds import seed_args  # benchmarks/ppo_seeds.py, beside this script

    a, work = seed_args(__doc__, "iterative-audit-")
    audit_run = work / "audit"
    if not (audit_run / "rm_audit" / "final").is_dir():
        _cli("run", "recipe=rlhf-ppo", f"output_root={work}/outputs", f"hydra.run.dir={audit_run}",
             "stages.ppo.total_episodes=16")
    audit = audit_run / "rm_audit" / "final"
    print(f"iterative-dpo judged by {audit} {' '.join(a.overrides)} (work: {work})")
    print("| seed | prompts | audit reward: SFT → round 1 → round 2 | round 2 − round 1 [95% CI] | significant |")
    print("| --- | --- | --- | --- | --- |")
    for seed in a.seeds:
        run_dir = work / f"seed{seed}"
        _cli("run", "recipe=iterative-dpo", f"seed={seed}", f"output_root={work}/outputs", f"hydra.run.dir={run_dir}",
             f"eval.reward={audit}", *a.overrides)
        m = {s["name"]: s for s in json.loads((run_dir / "manifest.json").read_text())["stages"]}
        sft, r1 = m["dpo1"]["metrics"]["before"], m["dpo1"]["metrics"]["after"]
        r2 = m["dpo2"]["metrics"]["after"]
        rows = [json.loads(line) for line in (run_dir / "dpo2" / "samples.jsonl").read_text().splitlines()]
        diffs = [r["scores"]["after"] - r["scores"]["before"] for r in rows]
        mean, low, high = paired_interval(diffs)
        print(f"| {seed} | {len(diffs)} | {sft['eval_reward_mean']:.2f} → {r1['eval_reward_mean']:.2f} → "
              f"{r2['eval_reward_mean']:.2f} | {mean:+.2f} [{low:+.2f}, {high:+.2f}] | "
              f"{'yes' if low > 0 or high < 0 else 'no'} |")


if __name__ == "__main__":
    main()
