"""The zephyr-dpo recipe at the published data sizes, against the same steps written by hand with TRL, on this box.

Writes files laid out like HuggingFaceH4/ultrachat_200k (``prompt``, ``prompt_id``, ``messages``; train_sft / test_sft
as JSON Lines) and HuggingFaceH4/ultrafeedback_binarized (``prompt``, ``prompt_id``, ``chosen``, ``rejected``,
``messages``, ``score_chosen``, ``score_rejected``; train_prefs / test_prefs as Parquet), in alignctl's own words:
200,000 conversations and 61,000 pairs by default, 2,000 held-out rows of each. Then, each command in a fresh process
as a user types it, one after the other (nothing else should run on the machine meanwhile):

1. ``alignctl run recipe=zephyr-dpo model=tiny precision=auto`` on those files, ``max_steps=2`` per stage (first run);
2. the same with ``stages.dpo.beta=0.02`` (a sweep point: SFT comes from the store);
3. a hand-written TRL script of the same steps (SFTTrainer then DPOTrainer, the recipe's settings, TRL's defaults
   for everything the recipe does not set), each trainer evaluating on the held-out split before and after training
   as the recipe's stages do (``trainer.evaluate()``), first run; then re-run with beta 0.02 (the datasets library's
   cache serves its tokenization);
4. the same script without any evaluation, first run and re-run (a datasets cache of its own).

    python benchmarks/zephyr_scale.py [--sft-rows 200000] [--pairs 61000] [--dir DIR]

Prints each command's wall time, the ratios asked for (first run / script, sweep point / script re-run) and, for the
alignctl runs, where the time went (from the manifest and the run log: pre-flight, each stage's training, evaluation
and the rest). Targets: first run <= 1.0x the evaluating script; sweep point <= 60 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_reuse import WORDS, write_split  # noqa: E402  (UltraChat-200k's layout, alignctl's own words)

STEPS = 2


def write_pairs(path: Path, rows: int, seed: int) -> None:
    """``rows`` pairs laid out like ultrafeedback_binarized's preference splits (Parquet)."""
    import datasets

    rng = random.Random(seed)

    def answer(k: int) -> str:
        return " ".join(rng.choices(WORDS, k=k)) + " ."

    def rows_():
        for i in range(rows):
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(8, 40))) + " ?"
            user = {"content": prompt, "role": "user"}
            chosen = [user, {"content": answer(rng.randint(40, 200)), "role": "assistant"}]
            rejected = [user, {"content": answer(rng.randint(20, 200)), "role": "assistant"}]
            yield {"prompt": prompt, "prompt_id": f"{seed}-{i:060x}", "chosen": chosen, "rejected": rejected,
                   "messages": chosen, "score_chosen": float(rng.randint(6, 10)),
                   "score_rejected": float(rng.randint(1, 5))}

    datasets.Dataset.from_generator(rows_, cache_dir=str(path.parent / ".gen")).to_parquet(str(path))


def write_data(root: Path, sft_rows: int, pairs: int, held_out: int) -> None:
    chat, prefs = root / "ultrachat_200k", root / "ultrafeedback_binarized"
    chat.mkdir(parents=True)
    prefs.mkdir(parents=True)
    write_split(chat / "train_sft.jsonl", sft_rows, 0)
    write_split(chat / "test_sft.jsonl", held_out, 1)
    write_pairs(prefs / "train_prefs.parquet", pairs, 2)
    write_pairs(prefs / "test_prefs.parquet", held_out, 3)


def alignctl_command(work: Path, run: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "alignctl.cli", "run", "recipe=zephyr-dpo", "model=tiny", "precision=auto",
            f"data.sft.path={work / 'data' / 'ultrachat_200k'}",
            f"data.prefs.path={work / 'data' / 'ultrafeedback_binarized'}",
            f"stages.sft.max_steps={STEPS}", f"stages.dpo.max_steps={STEPS}", f"output_root={work / 'out'}",
            f"hydra.run.dir={work / run}", *extra]


def handwritten(work: Path, model_dir: str, out: Path, beta: float, evaluate: bool) -> None:
    """What a user writes by hand for the same two stages: TRL as documented, the recipe's settings; ``evaluate``:
    each trainer also evaluates on the held-out split before and after training, as the recipe's stages do (TRL's
    own metrics only: alignctl's preference accuracy, answers and KL come on top)."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    data = work / "data"
    common = dict(bf16=torch.cuda.is_available(), max_steps=STEPS,
                  lr_scheduler_type="cosine", warmup_steps=0.1, activation_checkpointing=True,
                  logging_steps=5, save_strategy="no", seed=42, report_to="none", disable_tqdm=True)
    chat = {split: load_dataset("json", data_files=str(data / "ultrachat_200k" / f"{split}.jsonl"), split="train")
            .select_columns(["messages"]) for split in ("train_sft", "test_sft")}
    tok = AutoTokenizer.from_pretrained(model_dir)
    sft = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), processing_class=tok,
                     train_dataset=chat["train_sft"], eval_dataset=chat["test_sft"] if evaluate else None,
                     args=SFTConfig(output_dir=str(out / "sft"), learning_rate=2e-5, max_length=2048,
                                    per_device_train_batch_size=16, gradient_accumulation_steps=8,
                                    per_device_eval_batch_size=8, **common))
    run(sft, evaluate, out / "sft" / "final")
    del sft
    # the prompt is the conversations' shared first turn
    pairs = {split: load_dataset("parquet", data_files=str(data / "ultrafeedback_binarized" / f"{split}.parquet"),
                                 split="train").select_columns(["chosen", "rejected"])
             for split in ("train_prefs", "test_prefs")}
    dpo = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(str(out / "sft" / "final")), processing_class=tok,
                     train_dataset=pairs["train_prefs"], eval_dataset=pairs["test_prefs"] if evaluate else None,
                     args=DPOConfig(output_dir=str(out / "dpo"), learning_rate=5e-7, beta=beta, loss_type="sigmoid",
                                    max_length=1024, per_device_train_batch_size=8, gradient_accumulation_steps=16,
                                    per_device_eval_batch_size=8, optim="adamw_torch", **common))
    run(dpo, evaluate, out / "dpo" / "final")


def run(trainer, evaluate: bool, final: Path) -> None:
    if evaluate:
        print("before", trainer.evaluate())
    trainer.train()
    if evaluate:
        print("after", trainer.evaluate())
    trainer.save_model(str(final))


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds


def phases(run_dir: Path) -> str:
    """Where an alignctl run's time went: per stage its seconds, training (TRL's train_runtime) and evaluation."""
    m = json.loads((run_dir / "manifest.json").read_text())
    parts = []
    for s in m["stages"]:
        metrics = s.get("metrics") or {}
        train = (metrics.get("train") or {}).get("train_runtime")
        ev = (metrics.get("eval") or {}).get("seconds")
        reused = " (reused)" if s.get("reused_from") else ""
        parts.append(f"{s['name']}{reused} {s.get('seconds', 0):.1f} s"
                     + (f" [train() {train:.1f} s, policy eval {ev:.1f} s]" if train is not None and not reused
                        else ""))
    return "; ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sft-rows", type=int, default=200_000)
    ap.add_argument("--pairs", type=int, default=61_000)
    ap.add_argument("--held-out", type=int, default=2_000)
    ap.add_argument("--dir", default=None, help="where to write the data and outputs (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the data and outputs (in --dir)")
    ap.add_argument("--handwritten", nargs=5, metavar=("WORK", "MODEL", "OUT", "BETA", "EVAL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.handwritten:
        work, model, out, beta, evaluate = args.handwritten
        return handwritten(Path(work), model, Path(out), float(beta), evaluate == "eval")

    with contextlib.nullcontext(tempfile.mkdtemp(dir=args.dir)) if args.keep else \
            tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        write_data(work / "data", args.sft_rows, args.pairs, args.held_out)
        size = sum(f.stat().st_size for f in (work / "data").rglob("*") if f.is_file() and ".gen" not in f.parts)
        print(f"data: {args.sft_rows} conversations + {args.pairs} pairs (+{args.held_out} held-out each), "
              f"{size / 2**20:.0f} MB, written in {time.perf_counter() - t0:.0f} s", flush=True)
        times = {"alignctl first run": timed(alignctl_command(work, "run1", []), work)}
        print(f"  {'alignctl first run':<34} {times['alignctl first run']:7.1f} s  {phases(work / 'run1')}", flush=True)
        times["alignctl sweep point"] = timed(alignctl_command(work, "run2", ["stages.dpo.beta=0.02"]), work)
        print(f"  {'alignctl sweep point':<34} {times['alignctl sweep point']:7.1f} s  {phases(work / 'run2')}",
              flush=True)
        model = str(next((work / "out" / ".cache").glob("tiny-llama-*")))  # the model alignctl built, as is
        script = [sys.executable, __file__, "--handwritten", str(work), model]
        for mode, label in (("eval", "TRL script, evaluating"), ("none", "TRL script, no eval")):
            # each variant in a cache of its own: the first of them must tokenize as any first run does
            env_dir = work / f"hf-{mode}"
            for i, beta in ((1, "0.01"), (2, "0.02")):
                name = f"{label}" + (" (re-run)" if i == 2 else "")
                times[name] = timed([*script, str(work / f"trl-{mode}{i}"), beta, mode], work,
                                    {"HF_DATASETS_CACHE": str(env_dir)})
                print(f"  {name:<34} {times[name]:7.1f} s", flush=True)
    first, sweep = times["alignctl first run"], times["alignctl sweep point"]
    for label in ("TRL script, evaluating", "TRL script, no eval"):
        print(f"ratio first run / {label}: {first / times[label]:.2f}; sweep point / its re-run: "
              f"{sweep / times[label + ' (re-run)']:.2f}")
    print(f"sweep point {sweep:.1f} s (target <= 60 s); first run / TRL script, evaluating: target <= 1.0")


if __name__ == "__main__":
    main()
