"""A billion-parameter model through zephyr-dpo (SFT -> DPO, LoRA) on this box, phase by phase, beside the same steps
written by hand with TRL.

The model is Llama-3.2-1B's published shape (16 layers, hidden 2048, MLP 8192, 32 heads / 8 KV heads, head 64,
vocabulary 128,256, tied embeddings, llama3 RoPE scaling: 1.24 B parameters), random init, built here and saved in
bf16 like the published checkpoint, with a tokenizer shaped like Llama 3's (``<|begin_of_text|>``, header tokens,
turns closed by ``<|eot_id|>``; byte-level BPE trained on the benchmark's words; template written here). The data are
the zephyr_scale files: 200,000 UltraChat-shaped conversations and 61,000 UltraFeedback-shaped pairs, and a small
held-out split of each (``--held-out``), since every held-out row costs forward passes of the 1B model.

Then, each in a fresh process, one after the other (nothing else should run on the machine meanwhile):

1. ``alignctl plan`` of the run below;
2. ``alignctl run recipe=zephyr-dpo model.name_or_path=<the model> peft=lora precision=auto`` on those files, each
   stage ``max_steps`` 20 at batch 1, ``max_length`` 128, no activation checkpointing (CPU: memory is not the limit),
   held-out answers for 8 prompts x 32 tokens;
3. a hand-written TRL script of the same steps: SFTTrainer with the same LoRA, evaluate / train / evaluate, the
   adapter saved and merged into the base as the start of DPO; DPOTrainer the same way (reference = adapter off).

    python benchmarks/scale.py [--steps 20] [--layers 16] [--sft-rows 200000] [--pairs 61000] [--dir DIR] [--keep]

Prints per phase (plan, pre-flight, data preparation, model load, evaluation, train, save/merge, store placement)
the wall time and peak resident memory of each side, the disk each wrote, and the ratios asked for: time outside
``train()`` over training time per stage, with and without the held-out evaluation, and each stage's evaluation peak
memory over its training peak. Targets: outside train() <= 0.2x (bookkeeping: everything but the evaluation, whose
cost is set by the held-out sizes chosen), evaluation peak <= 1.3x training peak.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_reuse import WORDS  # noqa: E402  (the benchmark's words)
from zephyr_scale import write_data  # noqa: E402  (UltraChat-200k / UltraFeedback-binarized layouts)

# Llama-3.2-1B's published configuration (meta-llama/Llama-3.2-1B config.json); only the weights are random.
LLAMA_3_2_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, hidden_act="silu",
                    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
           "<|finetune_right_pad_id|>"]
# Llama-3-shaped turns (header tokens, each turn closed by <|eot_id|>), written for this benchmark.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
            "+ m['content'] + '<|eot_id|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# The run's settings, the same on both sides.
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
SFT = dict(learning_rate=2e-5, lr_scheduler_type="cosine", warmup_steps=0.1)
DPO = dict(learning_rate=5e-7, lr_scheduler_type="cosine", warmup_steps=0.1, beta=0.01, loss_type="sigmoid")
COMMON = dict(per_device_train_batch_size=1, per_device_eval_batch_size=4, activation_checkpointing=False,
              logging_steps=5, seed=42)
EVAL = dict(max_prompts=8, max_new_tokens=32)


def build_model(out: Path, layers: int, shape: dict | None = None, name: str = "llama-3.2-1b-shape",
                device: str = "cpu") -> Path:
    """A model of ``shape`` (default Llama-3.2-1B's; ``layers`` of its layers), random init, bf16 safetensors + a
    Llama-3-shaped tokenizer; kept in ``out`` and reused while its recipe is the same. ``device``: where the weights
    are initialised (a GPU does it in seconds)."""
    shape = {**(shape or LLAMA_3_2_1B), "num_hidden_layers": layers}
    recipe = hashlib.sha256(json.dumps([shape, SPECIAL, TEMPLATE, 1]).encode()).hexdigest()[:12]
    folder = out / f"{name}-{layers}l-{recipe}"
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return folder
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([" ".join(WORDS + ["?", ".", "\n"])] * 64, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|finetune_right_pad_id|>", chat_template=TEMPLATE,
                                  additional_special_tokens=["<|end_of_text|>", "<|start_header_id|>",
                                                             "<|end_header_id|>"], model_max_length=131072)
    cfg = LlamaConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.generation_config.pad_token_id = tok.pad_token_id
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def alignctl_overrides(work: Path, model: Path, steps: int, max_length: int) -> list[str]:
    stage = {**COMMON, "max_steps": steps, "max_length": max_length, "global_batch_size": 1}
    out = ["recipe=zephyr-dpo", f"model.name_or_path={model}", "peft=lora", "precision=auto",
           f"data.sft.path={work / 'data' / 'ultrachat_200k'}",
           f"data.prefs.path={work / 'data' / 'ultrafeedback_binarized'}",
           f"output_root={work / 'out'}", f"hydra.run.dir={work / 'run'}"]
    out += [f"peft.{k}={v}" for k, v in LORA.items()]
    out += [f"eval.{k}={v}" for k, v in EVAL.items()]
    for name, settings in (("sft", SFT), ("dpo", DPO)):
        out += [f"stages.{name}.{k}={str(v).lower() if isinstance(v, bool) else v}"
                for k, v in {**settings, **stage}.items()]
    return out


def handwritten(work: Path, model_dir: Path, out: Path, steps: int, max_length: int) -> None:
    """What a user writes by hand for the same two stages, TRL and PEFT as documented; each phase timed and its peak
    memory taken the way alignctl's are (alignctl.train.phases), written to ``out/phases.json``."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from alignctl.train.phases import PhaseClock

    clock, data = PhaseClock(), work / "data"
    common = dict(COMMON, max_steps=steps, max_length=max_length, save_strategy="no", report_to="none",
                  disable_tqdm=True, bf16=torch.cuda.is_available())

    def stage(name, trainer_cls, config, base, train, held):
        with clock.phase(f"{name}: model load"):
            model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        with clock.phase(f"{name}: prepare"):
            trainer = trainer_cls(model=model, processing_class=tok, train_dataset=train, eval_dataset=held,
                                  args=config, peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
        with clock.phase(f"{name}: evaluate before"):
            trainer.evaluate()
        with clock.phase(f"{name}: train"):
            trainer.train()
        with clock.phase(f"{name}: evaluate after"):
            trainer.evaluate()
        with clock.phase(f"{name}: save"):
            trainer.save_model(str(out / name / "adapter"))
        del trainer, model
        with clock.phase(f"{name}: merge"):
            merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                               str(out / name / "adapter")).merge_and_unload()
            merged.save_pretrained(str(out / name / "final"))
            tok.save_pretrained(str(out / name / "final"))
        del merged

    with clock.phase("sft: data"):
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        chat = {s: load_dataset("json", data_files=str(data / "ultrachat_200k" / f"{s}.jsonl"), split="train")
                .select_columns(["messages"]) for s in ("train_sft", "test_sft")}
    stage("sft", SFTTrainer, SFTConfig(output_dir=str(out / "sft"), **SFT, **common), model_dir,
          chat["train_sft"], chat["test_sft"])
    with clock.phase("dpo: data"):  # the prompt is the conversations' shared first turn (TRL extracts it)
        pairs = {s: load_dataset("parquet", data_files=str(data / "ultrafeedback_binarized" / f"{s}.parquet"),
                                 split="train").select_columns(["chosen", "rejected"])
                 for s in ("train_prefs", "test_prefs")}
    stage("dpo", DPOTrainer, DPOConfig(output_dir=str(out / "dpo"), **DPO, **common), out / "sft" / "final",
          pairs["train_prefs"], pairs["test_prefs"])
    (out / "phases.json").write_text(json.dumps(clock.records))


def timed(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds


def disk(root: Path, seen: set | None = None) -> int:
    """Bytes of the files under ``root``, each inode once and none of those in ``seen`` (hard links are not written
    twice); ``seen`` gets the inodes counted."""
    seen, total = set() if seen is None else seen, 0
    for f in root.rglob("*"):
        st = f.lstat()
        if f.is_file() and not f.is_symlink() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


# the table's rows: a label and the phases it sums (stage phases; the TRL script's "data" is its load_dataset)
ROWS = [("data preparation", ["context", "prepare", "data"]), ("model load", ["model load"]),
        ("evaluate before", ["evaluate before"]), ("train", ["train"]), ("evaluate after", ["evaluate after"]),
        ("save", ["save"]), ("merge", ["merge"]), ("store: verify + place", ["verify", "place"])]
EVAL_PHASES = ("evaluate before", "evaluate after")


def alignctl_stages(manifest: dict) -> dict[str, dict]:
    """Each stage's phases (its lifecycle's and the store's steps), and its whole wall time as ``total``."""
    out = {}
    for s in manifest["stages"]:
        phases = dict(s["metrics"]["phases"])
        phases.update({k: {"seconds": v} for k, v in (s.get("store_seconds") or {}).items()})
        out[s["name"]] = {"phases": phases, "total": s["seconds"]}
    return out


def script_stages(records: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for key, rec in records.items():
        stage, phase = key.split(": ", 1)
        out.setdefault(stage, {"phases": {}})["phases"][phase] = rec
    for v in out.values():
        v["total"] = sum(r["seconds"] for r in v["phases"].values())
    return out


def summarise(sides: list[tuple[str, dict, dict | None]], walls: dict[str, float]) -> list[str]:
    """The per-phase table (seconds and peak resident MiB of each side) and the ratios; ``sides``: (label, stages,
    run-level phases or None)."""
    head = f"{'phase':<30}" + "".join(f"{label + ' s':>16}{'MiB':>7}" for label, _, _ in sides)
    lines = [head]
    num = lambda v, w, p: f"{v:>{w}.{p}f}" if v is not None else " " * (w - 1) + "-"  # noqa: E731

    def row(label, cells):
        lines.append(f"{label:<30}" + "".join(f"{num(a, 16, 1)}{num(b, 7, 0)}" for a, b in cells))

    def cell(phases, keys):
        recs = [phases[k] for k in keys if k in phases]
        if not recs:
            return None, None
        return sum(r["seconds"] for r in recs), max((r.get("peak_rss_mb") or 0) for r in recs) or None

    row("plan (alignctl plan)", [(walls.get("plan"), None) if run else (None, None) for _, _, run in sides])
    row("pre-flight + fingerprint", [cell(run, ["pre-flight", "fingerprint"]) if run else (None, None)
                                     for _, _, run in sides])
    ratios = []
    for name in sides[0][1]:
        for label, keys in ROWS:
            row(f"{name}: {label}", [cell(st[name]["phases"], keys) for _, st, _ in sides])
        row(f"{name}: stage total", [(st[name]["total"], None) for _, st, _ in sides])
        for label, st, _ in sides:
            ph, total = st[name]["phases"], st[name]["total"]
            train = ph["train"]["seconds"]
            evaluation = sum(ph[k]["seconds"] for k in EVAL_PHASES if k in ph)
            eval_peak = max(ph[k].get("peak_rss_mb", 0) for k in EVAL_PHASES if k in ph)
            bookkeeping = (total - train - evaluation) / train
            ratios.append(f"{name} {label}: train() {train:.0f} s; outside train() / train() "
                          f"{(total - train) / train:.2f}, without the evaluation {bookkeeping:.2f}"
                          f" (target <= 0.2); evaluation peak / training peak "
                          f"{eval_peak / ph['train']['peak_rss_mb']:.2f} (target <= 1.3)")
    row("whole command (wall)", [(walls.get(key), None) for key in walls.get("order", [])])
    return lines + ratios


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--layers", type=int, default=16, help="Llama-3.2-1B has 16; fewer for a quick try")
    ap.add_argument("--sft-rows", type=int, default=200_000)
    ap.add_argument("--pairs", type=int, default=61_000)
    ap.add_argument("--held-out", type=int, default=16)
    ap.add_argument("--dir", default=None, help="where to write the model, data and outputs (default: a temporary "
                                                "folder); the model and data already there are reused")
    ap.add_argument("--work", default=None, help="a work folder of an earlier --keep run: the commands that "
                                                 "finished there are not run again")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    ap.add_argument("--handwritten", nargs=5, metavar=("WORK", "MODEL", "OUT", "STEPS", "MAX_LENGTH"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.handwritten:
        work, model, out, steps, length = args.handwritten
        return handwritten(Path(work), Path(model), Path(out), int(steps), int(length))

    base = Path(args.dir) if args.dir else None
    keep = args.keep or args.work
    with contextlib.nullcontext(args.work or tempfile.mkdtemp(dir=base)) if keep else \
            tempfile.TemporaryDirectory(dir=base) as tmp:
        work = Path(tmp)
        shared = base or work  # the model and data: reused from --dir by later invocations
        t0 = time.perf_counter()
        model = Path(json.loads((work / "walls.json").read_text())["model"]) if (work / "walls.json").is_file() \
            else build_model(shared, args.layers)
        params = json.loads((model / "config.json").read_text())
        print(f"model: {model.name} ({params['num_hidden_layers']} layers), ready in {time.perf_counter() - t0:.0f} s",
              flush=True)
        if not (work / "data").exists():
            data = shared / f"data-{args.sft_rows}-{args.pairs}-{args.held_out}"
            if not data.is_dir():
                write_data(data.with_suffix(".partial"), args.sft_rows, args.pairs, args.held_out)
                data.with_suffix(".partial").rename(data)
            (work / "data").symlink_to(data)
        overrides = alignctl_overrides(work, model, args.steps, args.max_length)
        cli = [sys.executable, "-m", "alignctl.cli"]
        walls_file = work / "walls.json"
        walls = json.loads(walls_file.read_text()) if walls_file.is_file() else {"model": str(model)}
        walls["order"] = ["run", "again", "script"]
        # the same run with both learning rates changed: both stages train again, on data prepared by the first
        again = [*[o for o in overrides if not o.startswith("hydra.run.dir=")], f"hydra.run.dir={work / 'run2'}",
                 f"stages.sft.learning_rate={SFT['learning_rate'] * 2}",
                 f"stages.dpo.learning_rate={DPO['learning_rate'] * 2}"]
        out = work / "trl"
        steps = [("plan", [*cli, "plan", *overrides], None), ("run", [*cli, "run", *overrides], None),
                 ("again", [*cli, "run", *again], None),
                 ("script", [sys.executable, __file__, "--handwritten", str(work), str(model), str(out),
                             str(args.steps), str(args.max_length)], {"HF_DATASETS_CACHE": str(work / "hf")})]
        for key, cmd, env in steps:
            if key not in walls:
                walls[key] = timed(cmd, env)
                walls_file.write_text(json.dumps(walls))
            print(f"{key}: {walls[key]:.1f} s", flush=True)
        first, second = (json.loads((work / d / "manifest.json").read_text()) for d in ("run", "run2"))
        sides = [("alignctl", alignctl_stages(first), first["phases"]),
                 ("again", alignctl_stages(second), second["phases"]),
                 ("TRL script", script_stages(json.loads((out / "phases.json").read_text())), None)]
        for line in summarise(sides, walls):
            print(line)
        inodes: set = set()
        ours = {"store": disk(work / "out" / ".store", inodes),
                "run folders beyond the store": disk(work / "run", inodes) + disk(work / "run2", inodes),
                "caches": disk(work / "out" / ".cache", inodes)}
        theirs = {"outputs": disk(out), "datasets cache": disk(work / "hf")}
        print("disk written: alignctl " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in ours.items())
              + "; TRL script " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in theirs.items()))


if __name__ == "__main__":
    main()
