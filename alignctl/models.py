"""The one place that builds, loads and saves models and tokenizers.

Everything about weights goes through here: the built-in tiny models, dtype and
attention choice per device, tokenizer fix-ups (chat template, pad token) and
writing a stage's ``final/`` folder as a plain Hugging Face model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger("alignctl")

TINY_PREFIX = "tiny:"
TINY_ARCHS = ("llama", "qwen2")

# Default chat template for base models that have none (documented in the README).
# Zephyr-style turns, each closed by the tokenizer's EOS token, so the EOS learnt at
# SFT is the one generation stops on in every later stage. The {% generation %}
# markers let TRL compute assistant-only losses.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_TINY_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
# Shapes of the built-in tiny models: real architectures, random init, ~70k parameters.
_TINY_SHAPE = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def is_tiny(name_or_path: str) -> bool:
    return str(name_or_path).startswith(TINY_PREFIX)


def tiny_arch(name_or_path: str) -> str:
    return str(name_or_path)[len(TINY_PREFIX):]


def materialize(name_or_path: str, cache_root: str | os.PathLike) -> str:
    """Return a loadable path for ``name_or_path``; builds a built-in tiny model once per cache."""
    if not is_tiny(name_or_path):
        return name_or_path
    arch = tiny_arch(name_or_path)
    key = hashlib.sha256(json.dumps([arch, _TINY_SHAPE, _TINY_SPECIAL, 2]).encode()).hexdigest()[:12]
    out = Path(cache_root) / f"tiny-{arch}-{key}"
    if (out / "config.json").exists():
        return str(out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny(arch, tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained on the synthetic world's text, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from alignctl.synthetic import corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=_TINY_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus() * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        chat_template=DEFAULT_CHAT_TEMPLATE, model_max_length=256,
    )


def build_tiny(arch: str, out: str | os.PathLike) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(TINY_ARCHS)}")
    tok = build_tiny_tokenizer()
    cfg = AutoConfig.for_model(arch, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **_TINY_SHAPE)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def precision_for(precision: str) -> str:
    """Resolve ``auto`` to bf16 (CUDA with bf16), fp16 (other CUDA) or fp32 (CPU)."""
    if precision != "auto":
        return precision
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def torch_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision_for(precision)]


def mixed_precision_args(precision: str) -> dict[str, bool]:
    """TRL/Trainer ``bf16``/``fp16`` flags for a precision setting."""
    p = precision_for(precision)
    return {"bf16": p == "bf16", "fp16": p == "fp16"}


def load_tokenizer(path: str, model_spec: dict[str, Any]):
    """Load a tokenizer and make it usable for chat training.

    A tokenizer without a chat template gets ``model.chat_template`` or the default
    one; a tokenizer without a pad token gets its unk token, else its eos token.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=model_spec.get("revision"),
                                        trust_remote_code=bool(model_spec.get("trust_remote_code")))
    if model_spec.get("chat_template"):
        tok.chat_template = model_spec["chat_template"]
    elif not tok.chat_template:
        log.info("tokenizer of %s has no chat template: using alignctl's default (Zephyr-style)", path)
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
        log.info("tokenizer has no pad token: using %r", tok.pad_token)
    return tok


def _load_kwargs(model_spec: dict[str, Any], precision: str) -> dict[str, Any]:
    return dict(
        revision=model_spec.get("revision"),
        dtype=torch_dtype(precision),
        attn_implementation=model_spec.get("attn_implementation") or "sdpa",
        trust_remote_code=bool(model_spec.get("trust_remote_code")),
        use_safetensors=True,
    )


def load_causal_lm(path: str, model_spec: dict[str, Any], precision: str, tokenizer=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **_load_kwargs(model_spec, precision))
    if tokenizer is not None:
        align_special_tokens(model, tokenizer)
    return model


def load_sequence_classifier(path: str, model_spec: dict[str, Any], precision: str, tokenizer=None):
    """A one-output sequence classifier (reward/value model) on top of ``path``'s backbone."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **_load_kwargs(model_spec, precision))
    if tokenizer is not None:
        align_special_tokens(model, tokenizer)
    return model


def align_special_tokens(model, tokenizer) -> None:
    """Make the model's config and generation config agree with the tokenizer (eos/pad travel together)."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def save_final(model, tokenizer, out: str | os.PathLike) -> str:
    """Write a plain HF folder (safetensors + tokenizer) atomically: write to a temp dir, then rename."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return str(out)
