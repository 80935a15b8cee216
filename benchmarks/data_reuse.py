"""What a sweep point pays for data at UltraChat-200k's size: a first SFT run, then the same run with another
learning rate (a new fingerprint: SFT trains again, on the same rows).

Writes ``--rows`` conversations laid out like HuggingFaceH4/ultrachat_200k (``prompt``, ``prompt_id``, ``messages``;
splits train_sft and test_sft; alignctl's own words, ~320 MB at 200k rows), then runs, each in a fresh process as a
user's command would, the SFT stage of a one-stage recipe on the tiny model (``max_steps`` 2, held-out sampling off):

    python benchmarks/data_reuse.py [--rows 200000] [--dir DIR]

Prints each run's wall time and the ratio sweep point / first run. The first run converts the rows to TRL's format
(twice: the pre-flight, then the stage) and TRL tokenizes them; the sweep point is served both from the datasets
cache the data's content keys (alignctl.data: the conversion's fingerprint covers the input rows, its settings and
alignctl's and TRL's code). Before the conversion was cacheable, the sweep point converted the 200k rows twice again.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "calm kind river window garden lake bright cold warm gentle light stone bridge morning quiet".split()


def write_split(path: Path, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(rows):
            question = " ".join(rng.choices(WORDS, k=rng.randint(8, 30))) + " ?"
            messages = [{"role": "user", "content": question}]
            for turn in range(rng.choice([1, 1, 2, 3])):
                if turn:
                    messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=12)) + " ?"})
                answer = " ".join(rng.choices(WORDS, k=rng.randint(40, 160))) + " ."
                messages.append({"role": "assistant", "content": answer})
            f.write(json.dumps({"prompt": question, "prompt_id": f"{seed}-{i:060x}", "messages": messages}) + "\n")


def point(work: Path, lr: str) -> None:
    """One run (in this process): the SFT stage with learning rate ``lr``."""
    from alignctl import pipeline
    from alignctl.config.compose import compose
    from alignctl.config.resolve import resolve

    overrides = [f"recipe={work / 'recipe.yaml'}", f"output_root={work / 'out'}", "model=tiny", "eval.enabled=false",
                 f"stages.sft.learning_rate={lr}"]
    manifest = pipeline.run(resolve(compose(overrides), work / f"run-{lr}"), overrides)
    assert manifest["status"] == "completed", manifest.get("error")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dir", default=None, help="where to write the data and outputs (default: a temporary folder)")
    ap.add_argument("--point", nargs=2, metavar=("WORK", "LR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.point:
        return point(Path(args.point[0]), args.point[1])

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        (work / "data").mkdir()
        write_split(work / "data" / "train_sft.jsonl", args.rows, 0)
        write_split(work / "data" / "test_sft.jsonl", max(args.rows // 100, 16), 1)
        (work / "recipe.yaml").write_text(json.dumps({
            "description": "data reuse benchmark",
            "data": {"chat": {"path": str(work / "data"), "split": "train_sft", "eval_split": "test_sft"}},
            "stages": {"sft": {"trainer": "sft", "data": "chat", "max_steps": 2, "per_device_train_batch_size": 4,
                               "max_length": 256, "save_strategy": "no", "activation_checkpointing": False}}}))
        size = (work / "data" / "train_sft.jsonl").stat().st_size
        times = {}
        for name, lr in (("first run", "1e-4"), ("sweep point", "2e-4")):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--point", str(work), lr], check=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
            times[name] = time.perf_counter() - t0
    print(f"{args.rows} conversations ({size / 2**20:.0f} MB), SFT max_steps=2 on the tiny model, fresh process each:")
    for name, seconds in times.items():
        print(f"  {name:<12} {seconds:7.1f} s")
    print(f"  ratio sweep point / first run: {times['sweep point'] / times['first run']:.3f}")


if __name__ == "__main__":
    main()
