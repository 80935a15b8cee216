"""The GPU check: alignctl's SFT and DPO stages beside the same settings written by hand with TRL, on one GPU.

Cases (models of the published shapes, random init, built on the GPU and saved in bf16; Llama-3-shaped tokenizer and
data written here, every row longer than ``max_length`` so each step processes exactly batch x max_length tokens):

* ``1b-full``: Llama-3.2-1B's shape, full fine-tuning in bf16, SFT -> DPO (the SFT model is DPO's start and
  reference);
* ``8b-lora`` / ``8b-qlora``: Llama-3-8B's shape (32 layers, hidden 4096, MLP 14336, 32/8 heads, vocabulary 128,256),
  LoRA r=16 on all linear layers, over a bf16 base / a 4-bit NF4 base (bitsandbytes), SFT -> DPO;
* ``1b-ppo``: alignctl's own PPO (SFT and reward model one step each, then PPO): rollout and update throughput from
  its per-update ``time/rollout``, ``time/update`` and ``tokens/answers``.

Each case runs ``alignctl run`` and then the hand-written script (``--handwritten``), each in a fresh process, and
prints per stage: tokens/s of ``train()``, MFU = model FLOPs / s / 989 TFLOP/s (H100/H200 bf16 dense), peak GPU
memory of training (both sides measure phases with alignctl.train.phases). Model FLOPs per token
(:func:`flops_per_token`): forward 2 x the matmul parameters (output head included) + attention 4 x layers x hidden x
length; the backward pass twice the forward under full fine-tuning, once under LoRA (activation gradients only, no
weight gradients of the frozen base); DPO adds the reference's forward on the same tokens.

    python benchmarks/gpu_check.py [--only 1b-full 8b-lora ...] [--dir DIR] [--steps 10]
    python benchmarks/gpu_check.py --smoke      # CPU: the same code on small shapes, 2 steps (a test of the script)

About 8 minutes on one H200 with no network (torch, transformers, peft, accelerate there; trl, alignctl's other
dependencies and bitsandbytes as wheels). Disk: the 8B base (16 GB) plus two merged stages (32 GB) at most; each
case's outputs are deleted after it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_reuse import WORDS  # noqa: E402
from scale import LLAMA_3_2_1B, build_model, disk  # noqa: E402

# Llama-3-8B's published configuration (meta-llama/Meta-Llama-3-8B config.json); only the weights are random.
LLAMA_3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
                  rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, hidden_act="silu")
SMALL = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             vocab_size=4096)
CASES = {  # model name, shape, peft, per-device batch, max_length, activation checkpointing
    "1b-full": ("llama-3.2-1b-shape", LLAMA_3_2_1B, "none", 8, 1024, False),
    "8b-lora": ("llama-3-8b-shape", LLAMA_3_8B, "lora", 4, 1024, True),
    "8b-qlora": ("llama-3-8b-shape", LLAMA_3_8B, "qlora", 4, 1024, True),
    "1b-ppo": ("llama-3.2-1b-shape", LLAMA_3_2_1B, "none", 0, 0, False),
}
PEAK_BF16 = 989e12  # H100 / H200 SXM dense bf16 FLOP/s
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def write_data(out: Path, rows: int, words: int) -> None:
    """SFT conversations and preference pairs, every answer ``words`` words long (longer than max_length)."""
    import random

    rng = random.Random(0)
    text = lambda k: " ".join(rng.choices(WORDS, k=k))  # noqa: E731
    (out / "sft").mkdir(parents=True)
    (out / "prefs").mkdir(parents=True)
    with open(out / "sft" / "train.jsonl", "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"messages": [{"role": "user", "content": text(20) + " ?"},
                                             {"role": "assistant", "content": text(words) + " ."}]}) + "\n")
    with open(out / "prefs" / "train.jsonl", "w") as f:
        for _ in range(rows):
            prompt = [{"role": "user", "content": text(20) + " ?"}]
            f.write(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": text(words)}],
                                "rejected": [{"role": "assistant", "content": text(words)}]}) + "\n")


def settings(steps: int, batch: int, length: int, checkpointing: bool) -> dict:
    return dict(max_steps=steps, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                max_length=length, learning_rate=1e-5, lr_scheduler_type="constant", logging_steps=1,
                save_strategy="no", activation_checkpointing=checkpointing, seed=42)


def alignctl_command(work: Path, model: Path, peft: str, stage: dict, smoke: bool) -> list[str]:
    out = [sys.executable, "-m", "alignctl.cli", "run", "data=ultra", f"model.name_or_path={model}",
           f"peft={peft}", f"precision={'auto' if smoke else 'bf16'}", "eval.enabled=false",
           f"output_root={work / 'out'}", f"hydra.run.dir={work / 'run'}"]
    for d in ("sft", "prefs"):
        out += [f"data.{d}.path={work / 'data' / d}", f"data.{d}.split=train", f"data.{d}.eval_split=null",
                f"data.{d}.eval_size=0"]
    if peft != "none":
        out += [f"peft.{k}={v}" for k, v in LORA.items()]
    for s in ("sft", "dpo"):
        out += [f"stages.{s}.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in stage.items()]
    return out + ["stages.dpo.beta=0.1"]


def handwritten(work: Path, model_dir: Path, out: Path, peft: str, stage: dict) -> None:
    """SFT then DPO as a user writes them with TRL and PEFT; phases measured as alignctl measures its own."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from alignctl.train.phases import PhaseClock

    clock, cuda = PhaseClock(), torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    args = dict(stage, bf16=cuda, report_to="none", disable_tqdm=True)

    def load(path):
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype) if peft == "qlora" else None
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, quantization_config=quant,
                                                    device_map={"": 0} if cuda else None)

    def run(name, trainer_cls, config, base, data):
        with clock.phase(f"{name}: model load"):
            model = load(base)
        with clock.phase(f"{name}: prepare"):
            trainer = trainer_cls(model=model, processing_class=tok, args=config, train_dataset=data,
                                  peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA) if peft != "none" else None)
        with clock.phase(f"{name}: train"):
            trainer.train()
        with clock.phase(f"{name}: save"):
            trainer.save_model(str(out / name))
        del trainer, model
        if cuda:
            torch.cuda.empty_cache()
        if peft == "none":
            return out / name
        with clock.phase(f"{name}: merge"):  # the next stage starts from plain weights, as alignctl's does
            base_model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
            merged = PeftModel.from_pretrained(base_model, str(out / name)).merge_and_unload()
            merged.save_pretrained(str(out / f"{name}-merged"))
            tok.save_pretrained(str(out / f"{name}-merged"))
        return out / f"{name}-merged"

    sft = load_dataset("json", data_files=str(work / "data" / "sft" / "train.jsonl"), split="train")
    prefs = load_dataset("json", data_files=str(work / "data" / "prefs" / "train.jsonl"), split="train")
    start = run("sft", SFTTrainer, SFTConfig(output_dir=str(out / "sft-ckpt"), **args), model_dir, sft)
    run("dpo", DPOTrainer, DPOConfig(output_dir=str(out / "dpo-ckpt"), beta=0.1, **args), start, prefs)
    (out / "phases.json").write_text(json.dumps(clock.records))


def matmul_params(config: dict) -> tuple[int, int, int]:
    """(parameters in matrix multiplications incl. the output head, layers, hidden size) of a Llama config."""
    h, m, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    q = config["num_attention_heads"] * config["head_dim"]
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * m
    return n * per_layer + h * config["vocab_size"], n, h


def flops_per_token(config: dict, peft: str, length: int, kind: str) -> float:
    """Model FLOPs per trained token: forward 2N + attention 4·L·h·T; backward twice that under full fine-tuning,
    once (activation gradients only) under LoRA; DPO adds the reference's forward on the same tokens."""
    n, layers, hidden = matmul_params(config)
    forward = 2 * n + 4 * layers * hidden * length
    total = forward * (3 if peft == "none" else 2)
    return total + (forward if kind == "dpo" else 0)


def report(case: str, shape: dict, peft: str, stage: dict, phases: dict, side: str) -> list[str]:
    lines = []
    for kind in ("sft", "dpo"):
        rec = phases.get(kind, {})
        if "train" not in rec:
            continue
        seqs = stage["max_steps"] * stage["per_device_train_batch_size"] * (2 if kind == "dpo" else 1)
        tokens_s = seqs * stage["max_length"] / rec["train"]["seconds"]
        mfu = tokens_s * flops_per_token(shape, peft, stage["max_length"], kind) / PEAK_BF16
        gpu = rec["train"].get("peak_gpu_mb")
        lines.append(f"{case:<10}{kind:<5}{side:<12}{tokens_s:>11.0f}{mfu:>8.1%}"
                     f"{(gpu or 0) / 1024:>10.1f}{rec['train']['seconds']:>9.1f}")
    return lines


def timed(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, capture_output=True,
                          text=True)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def ppo_case(work: Path, model: Path, smoke: bool) -> str:
    episodes, length = (8, 8) if smoke else (512, 128)
    cmd = [sys.executable, "-m", "alignctl.cli", "run", "recipe=rlhf-ppo", f"model.name_or_path={model}",
           f"precision={'auto' if smoke else 'bf16'}", "eval.enabled=false", f"output_root={work / 'out'}",
           f"hydra.run.dir={work / 'run'}", "stages.sft.max_steps=1", "stages.rm.max_steps=1",
           f"stages.ppo.total_episodes={episodes}", f"stages.ppo.response_length={length}",
           "stages.ppo.learning_rate=1e-6", "stages.ppo.per_device_train_batch_size=" + ("4" if smoke else "64"),
           "stages.ppo.local_rollout_forward_batch_size=" + ("4" if smoke else "64")]
    seconds = timed(cmd)
    history = json.loads((work / "run" / "ppo" / "log_history.json").read_text())
    roll = sum(h["time/rollout"] for h in history)
    upd = sum(h["time/update"] for h in history)
    tokens = sum(h["tokens/answers"] for h in history)
    return (f"1b-ppo: {len(history)} updates of {episodes // len(history)} episodes, {tokens:.0f} answer tokens: "
            f"rollout {tokens / roll:.0f} tokens/s ({roll:.1f} s), update {tokens / upd:.0f} tokens/s ({upd:.1f} s); "
            f"whole command {seconds:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None, choices=list(CASES), help="the cases to run (default: all)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU, small shapes, 2 steps: checks the script itself")
    ap.add_argument("--handwritten", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.handwritten:
        work, model, out, peft, stage = args.handwritten
        return handwritten(Path(work), Path(model), Path(out), peft, json.loads(stage))
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.smoke and device == "cpu":
        sys.exit("no CUDA GPU here: run with --smoke to check the script on a CPU")
    cases = args.only or list(CASES)
    root = Path(tempfile.mkdtemp(dir=args.dir))
    t_all = time.perf_counter()
    lines = [f"{'case':<10}{'stage':<5}{'side':<12}{'tokens/s':>11}{'MFU':>8}{'peak GiB':>10}{'train s':>9}"]
    extra = []
    try:
        for case in cases:
            t0 = time.perf_counter()
            name, shape, peft, batch, length, ckpt = CASES[case]
            layers = shape["num_hidden_layers"]
            if args.smoke:
                shape, layers, batch, length = {**shape, **SMALL}, 1, 2, 64
            model = build_model(root, layers, shape, name + ("-small" if args.smoke else ""), device)
            work = root / case
            work.mkdir()
            if case == "1b-ppo":
                extra.append(ppo_case(work, model, args.smoke))
                shutil.rmtree(work)
                continue
            steps = 2 if args.smoke else args.steps
            write_data(work / "data", rows=max(64, steps * batch), words=int(length * 1.5))
            stage = settings(steps, batch, length, ckpt)
            timed(alignctl_command(work, model, peft, stage, args.smoke))
            m = json.loads((work / "run" / "manifest.json").read_text())
            ours = {s["name"]: s["metrics"]["phases"] for s in m["stages"]}
            lines += report(case, shape, peft, stage, ours, "alignctl")
            shutil.rmtree(work / "out")
            timed([sys.executable, __file__, "--handwritten", str(work), str(model), str(work / "trl"), peft,
                   json.dumps(stage)], {"HF_DATASETS_CACHE": str(work / "hf")})
            raw = json.loads((work / "trl" / "phases.json").read_text())
            theirs = {k: {p.split(": ", 1)[1]: v for p, v in raw.items() if p.startswith(k + ": ")}
                      for k in ("sft", "dpo")}
            lines += report(case, shape, peft, stage, theirs, "TRL script")
            print(f"[{case}: {time.perf_counter() - t0:.0f} s, {disk(work) / 2**30:.1f} GiB left]", flush=True)
            shutil.rmtree(work)
    finally:
        for line in lines + extra:
            print(line)
        where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
        print(f"total {time.perf_counter() - t_all:.0f} s on {where}")
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
