"""The built-in tiny models: real architectures, random init, ~70k parameters, built locally (no download).

``tiny:llama`` and ``tiny:qwen2`` share a byte-level BPE tokenizer trained on the synthetic world's text with the
default chat template; the other families (``TINY_FAMILIES``) differ in what breaks pipelines: Conv1D layers, fused
projections, sliding windows, soft-capping, tokenizers without pad token or chat template, templates that refuse a
system turn. ``alignctl.models.materialize`` builds one once per cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from alignctl.templates import DEFAULT_CHAT_TEMPLATE, GEMMA_TEMPLATE, MISTRAL_TEMPLATE, PHI3_TEMPLATE

TINY_PREFIX = "tiny:"
TINY_ARCHS = ("llama", "qwen2", "gpt2", "phi3", "mistral", "gemma2")

_TINY_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
# Shapes of the built-in tiny models: real architectures, random init, ~70k parameters.
_TINY_SHAPE = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
_SHAPE = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256)
# The families added to llama / qwen2, each differing in what breaks pipelines: model config fields and a tokenizer
# shaped like the family's (special tokens, which of bos/eos/unk/pad exist, chat template or none).
TINY_FAMILIES: dict[str, dict[str, Any]] = {
    # Conv1D layers (fused c_attn), learnt positions; GPT-2 tokenizer: one <|endoftext|> as bos/eos/unk, no pad token
    # and no chat template.
    "gpt2": dict(config=dict(n_embd=48, n_inner=96, n_layer=2, n_head=4, n_positions=256),
                 special=["<|endoftext|>"],
                 tokens=dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"),
                 template=None),
    # Fused qkv_proj and gate_up_proj; template without {% generation %} markers.
    "phi3": dict(config=dict(_SHAPE, num_key_value_heads=2, tie_word_embeddings=False),
                 special=["<unk>", "<s>", "<|endoftext|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"],
                 tokens=dict(bos_token="<s>", eos_token="<|end|>", unk_token="<unk>", pad_token="<|endoftext|>"),
                 template=PHI3_TEMPLATE),
    # Sliding-window attention (a window shorter than the conversations); no pad token; refuses system turns.
    "mistral": dict(config=dict(_SHAPE, num_key_value_heads=2, sliding_window=8, tie_word_embeddings=False),
                    special=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                    tokens=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
                    template=MISTRAL_TEMPLATE),
    # Logit soft-capping (transformers refuses SDPA for it: eager), alternating sliding/global layers, tied
    # embeddings; refuses system turns.
    "gemma2": dict(config=dict(_SHAPE, num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=12,
                               sliding_window=8),
                   special=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
                   tokens=dict(bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"),
                   template=GEMMA_TEMPLATE),
}


def is_tiny(name_or_path: str) -> bool:
    return str(name_or_path).startswith(TINY_PREFIX)


def tiny_arch(name_or_path: str) -> str:
    return str(name_or_path)[len(TINY_PREFIX):]


def tiny_key(name_or_path: str) -> str:
    """Identity of a built-in tiny model: changes whenever its recipe (shape, tokenizer) changes."""
    arch = tiny_arch(name_or_path)
    if arch in TINY_FAMILIES:
        blob = json.dumps([arch, TINY_FAMILIES[arch], 1], sort_keys=True)
    else:
        blob = json.dumps([arch, _TINY_SHAPE, _TINY_SPECIAL, 3])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_tiny_tokenizer(family: dict[str, Any] | None = None):
    """A byte-level BPE tokenizer trained on the synthetic world's text, with a chat template (tiny:llama's and
    tiny:qwen2's), or with a family's special tokens and template (``TINY_FAMILIES``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from alignctl.synthetic import corpus

    special = family["special"] if family else _TINY_SPECIAL
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus() * 4, trainer=trainer)
    if family:
        named = set(family["tokens"].values())
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, **family["tokens"], additional_special_tokens=[t for t in special if t not in named],
            chat_template=family["template"], model_max_length=256,
        )
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
    family = TINY_FAMILIES.get(arch)
    tok = build_tiny_tokenizer(family)
    shape = family["config"] if family else _TINY_SHAPE
    cfg = AutoConfig.for_model(arch, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
