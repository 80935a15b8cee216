"""Peak memory and step time of the DPO stage under full fine-tuning, LoRA and QLoRA, next to the SFT stage's.

A random Llama-shaped model (CPU: ~290M parameters; CUDA: ~1.1B, TinyLlama's shape) runs a few optimizer steps
of each stage through alignctl's own stage code (the same loading, peft and TRL trainer as `alignctl run`), each
mode and stage in its own process so that peaks are not shared:

    python benchmarks/peft_memory.py                 # auto: CUDA if available, else CPU
    python benchmarks/peft_memory.py --steps 4 --max-length 64 --batch 2

Peak memory is the peak over training (from the Trainer's train begin to its end: the models, a DPO reference
copy if any, gradients, optimizer state and activations), measured as torch.cuda.max_memory_allocated on CUDA and
on CPU as the peak resident set size (Linux VmHWM, reset at train begin) minus the resident size after imports
(the interpreter and libraries, the same for every mode). Loading transients are left out on purpose: on CPU the
checkpoint's memory-mapped pages count as resident while a 4-bit load quantises them. The whole-stage peaks are
printed too. Step time is the Trainer's train_runtime / steps.

Printed: per mode the SFT and DPO peaks, DPO / SFT (target <= 1.15 for lora and qlora: with an adapter the DPO
reference is the policy with its adapter disabled, not a second copy) and each mode's DPO peak relative to full
fine-tuning (target: qlora < lora < full).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # Llama-shaped, random init, untied embeddings
    "cpu": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=32000),
    "cuda": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000),
}
MODES = ("none", "lora", "qlora")


def proc_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _measured_context(stage, record: dict):
    """alignctl's StageContext of ``stage``, whose trainer gets a callback that takes the memory peak over training
    only (added to what the stage kind builds; the lifecycle is alignctl's own)."""
    import dataclasses

    import torch
    from transformers import TrainerCallback

    from alignctl.train.context import StageContext

    class Peak(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current resident size
            except OSError:  # not Linux, or not allowed: the peak then covers loading as well
                pass
            if torch.cuda.is_available():
                record["cuda_at_begin_mb"] = torch.cuda.memory_allocated() / 2**20
                torch.cuda.reset_peak_memory_stats()
            record["rss_at_begin_mb"] = proc_mb()

        def on_train_end(self, args, state, control, **kwargs):
            record["train_peak_rss_mb"] = proc_mb("VmHWM")
            if torch.cuda.is_available():
                record["train_peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20

    ctx = StageContext(stage)
    build = ctx.kind.build

    def measured(c):
        trainer = build(c)
        trainer.add_callback(Peak())
        return trainer

    ctx.kind = dataclasses.replace(ctx.kind, build=measured)
    return ctx


def build_model(out: Path, device: str, layers: int | None = None) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignctl.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    cfg = AutoConfig.for_model("llama", pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, max_position_embeddings=2048, tie_word_embeddings=False,
                               **{**SHAPES[device], **({"num_hidden_layers": layers} if layers else {})})
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return n


def child(args) -> None:
    """Run one stage of one mode and write its measurements as JSON."""
    import torch

    from alignctl import pipeline
    from alignctl.config.compose import compose
    from alignctl.config.resolve import resolve
    from alignctl.train import lifecycle

    cuda = torch.cuda.is_available()
    common = [f"model.name_or_path={args.model}", f"peft={args.mode}", f"output_root={args.work}/o",
              "data.sft.eval_size=0", "data.prefs.eval_size=0", "stages.dpo.from=null"]
    for stage in ("sft", "dpo"):
        common += [f"stages.{stage}.max_steps={args.steps}", f"stages.{stage}.max_length={args.max_length}",
                   f"stages.{stage}.per_device_train_batch_size={args.batch}", f"stages.{stage}.logging_steps=1",
                   f"stages.{stage}.activation_checkpointing={str(args.checkpointing).lower()}",
                   f"stages.{stage}.gradient_accumulation_steps=1"]
    resolved = resolve(compose(common), Path(args.work) / "run")
    stage = next(s for s in pipeline.stage_specs(resolved) if s.name == args.stage)
    stage = stage.replace(entry_dir=str(Path(args.work) / f"{args.mode}-{args.stage}"))
    import bitsandbytes  # noqa: F401  (every mode pays the same imports before the baseline)
    import peft  # noqa: F401
    import trl  # noqa: F401
    import trl.experimental.utils  # noqa: F401

    record: dict = {}
    base = proc_mb()
    t0 = time.perf_counter()
    metrics, _ = lifecycle.train_stage(_measured_context(stage, record))  # train + save (a merge comes later)
    wall = time.perf_counter() - t0
    out = {"mode": args.mode, "stage": args.stage, "wall_s": wall, **record,
           "step_s": metrics["train"]["train_runtime"] / args.steps,
           "stage_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_rss_mb": base}
    if cuda:
        out["device"] = torch.cuda.get_device_name()
    Path(args.result).write_text(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing on (off by default)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--layers", type=int, help="override the number of layers (a quick check of the script)")
    ap.add_argument("--keep", help="keep the model and outputs in this folder")
    # internal: one measurement
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("mode", "stage", "model", "work", "result"):
        ap.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    modes = args.modes.split(",")
    work = Path(args.keep or tempfile.mkdtemp(prefix="peft-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / f"llama-{device}"
    t0 = time.perf_counter()
    n = build_model(model_dir, device, args.layers) if not (model_dir / "config.json").exists() else None
    shape = {**SHAPES[device], **({"num_hidden_layers": args.layers} if args.layers else {})}
    print(f"device {device}; Llama-shaped random model {shape}"
          + (f" = {n / 1e6:.0f}M parameters" if n else "") + f" (built in {time.perf_counter() - t0:.0f} s)")
    print(f"{args.steps} steps per stage, batch {args.batch}, max_length {args.max_length}, activation checkpointing "
          f"{'on' if args.checkpointing else 'off'}; each mode and stage in its own process\n", flush=True)
    results: dict[tuple[str, str], dict] = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu on a GPU machine
    for mode in modes:
        for stage in ("sft", "dpo"):
            result = work / f"{mode}-{stage}.json"
            cmd = [sys.executable, __file__, "--child", "--mode", mode, "--stage", stage, "--model", str(model_dir),
                   "--work", str(work), "--result", str(result), "--steps", str(args.steps),
                   "--max-length", str(args.max_length), "--batch", str(args.batch)]
            cmd += ["--checkpointing"] if args.checkpointing else []
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{mode} {stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
            r = results[mode, stage] = json.loads(result.read_text())
            if device == "cuda":
                r["peak_mb"] = r["train_peak_cuda_mb"]
                detail = f"allocated at train begin {r['cuda_at_begin_mb']:.0f} MB; {r['device']}"
            else:
                r["peak_mb"] = r["train_peak_rss_mb"] - r["base_rss_mb"]
                detail = (f"RSS after imports {r['base_rss_mb']:.0f}, at train begin {r['rss_at_begin_mb']:.0f}, "
                          f"training peak {r['train_peak_rss_mb']:.0f}, whole-stage peak {r['stage_peak_rss_mb']:.0f}")
            print(f"  {mode:<6} {stage}: peak {r['peak_mb']:8.0f} MB ({detail}), {r['step_s']:.2f} s/step",
                  flush=True)
    what = ("torch.cuda.max_memory_allocated over training" if device == "cuda"
            else "peak RSS over training above the after-import baseline")
    print(f"\npeak memory ({what}), MB, and step time, s:")
    print(f"{'mode':<7}{'SFT peak':>10}{'DPO peak':>10}{'DPO/SFT':>9}{'DPO vs full':>13}{'SFT s/step':>12}"
          f"{'DPO s/step':>12}")
    full = results.get(("none", "dpo"), {}).get("peak_mb")
    for mode in modes:
        sft, dpo = results[mode, "sft"], results[mode, "dpo"]
        vs_full = f"{dpo['peak_mb'] / full:13.2f}" if full else f"{'-':>13}"
        print(f"{mode:<7}{sft['peak_mb']:10.0f}{dpo['peak_mb']:10.0f}{dpo['peak_mb'] / sft['peak_mb']:9.2f}{vs_full}"
              f"{sft['step_s']:12.2f}{dpo['step_s']:12.2f}")
    print()
    for mode in ("lora", "qlora"):
        if mode in modes:
            ratio = results[mode, "dpo"]["peak_mb"] / results[mode, "sft"]["peak_mb"]
            print(f"{mode} DPO/SFT peak {ratio:.2f}: {'OK' if ratio <= 1.15 else 'ABOVE'} target <= 1.15")
    if set(MODES) <= set(modes):
        d = {m: results[m, "dpo"]["peak_mb"] for m in MODES}
        ok = d["qlora"] < d["lora"] < d["none"]
        print(f"DPO peak qlora {d['qlora']:.0f} < lora {d['lora']:.0f} < full {d['none']:.0f} MB: "
              f"{'OK' if ok else 'NOT MET'}")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
