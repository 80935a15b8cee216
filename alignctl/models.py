"""The one place that builds, loads and saves models and tokenizers.

Everything about weights goes through here: the built-in tiny models, dtype and
attention choice per device, tokenizer fix-ups (chat template, pad token),
LoRA / QLoRA (peft settings, 4-bit loading, k-bit training preparation, merging an
adapter into de-quantised base weights) and writing a stage's ``final/`` folder as a
plain Hugging Face model.
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
# A conversation ends with its last EOS (turns are separated by a newline, none follows the last one), so
# a reward model trained on chat-formatted pairs scores the same last token that PPO scores: the EOS the
# policy stops on (TRL's PPO scores prompt + answer truncated at that EOS).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n<|assistant|>\n' }}{% endif %}"
)

_TINY_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
# Shapes of the built-in tiny models: real architectures, random init, ~70k parameters.
_TINY_SHAPE = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def is_tiny(name_or_path: str) -> bool:
    return str(name_or_path).startswith(TINY_PREFIX)


def tiny_arch(name_or_path: str) -> str:
    return str(name_or_path)[len(TINY_PREFIX):]


def tiny_key(name_or_path: str) -> str:
    """Identity of a built-in tiny model: changes whenever its recipe (shape, tokenizer) changes."""
    blob = json.dumps([tiny_arch(name_or_path), _TINY_SHAPE, _TINY_SPECIAL, 3])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def materialize(name_or_path: str, cache_root: str | os.PathLike) -> str:
    """Return a loadable path for ``name_or_path``; builds a built-in tiny model once per cache."""
    if not is_tiny(name_or_path):
        return name_or_path
    arch = tiny_arch(name_or_path)
    out = Path(cache_root) / f"tiny-{arch}-{tiny_key(name_or_path)}"
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


def _load_kwargs(model_spec: dict[str, Any], precision: str, peft: dict | None = None,
                 classifier: bool = False) -> dict[str, Any]:
    return dict(
        revision=model_spec.get("revision"),
        dtype=torch_dtype(precision),
        attn_implementation=model_spec.get("attn_implementation") or "sdpa",
        trust_remote_code=bool(model_spec.get("trust_remote_code")),
        use_safetensors=True,
        **quantization_kwargs(peft, precision, classifier),
    )


def load_causal_lm(path: str, model_spec: dict[str, Any], precision: str, tokenizer=None, peft: dict | None = None):
    """A causal LM; 4-bit quantised (frozen base for an adapter) when ``peft`` is a qlora setting."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **_load_kwargs(model_spec, precision, peft))
    _after_quantised_load(model)
    if tokenizer is not None:
        align_special_tokens(model, tokenizer)
    return model


def load_sequence_classifier(path: str, model_spec: dict[str, Any], precision: str, tokenizer=None,
                             peft: dict | None = None):
    """A one-output sequence classifier (reward/value model) on top of ``path``'s backbone (4-bit under qlora)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, **_load_kwargs(model_spec, precision, peft, classifier=True))
    _after_quantised_load(model)
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


# -- LoRA / QLoRA (the setting itself is validated in alignctl.peft_config) -------------------------------------
# Attention kernels that need a package besides torch: attn_implementation -> module to find.
ATTN_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "uint8": "uint8"}


def device_problems(stage: dict) -> list[str]:
    """Run-time checks of settings that cannot work on this machine; called before any model is loaded."""
    import torch

    where = f"stages.{stage['name']}"
    problems = []
    cuda = torch.cuda.is_available()
    precision = precision_for(stage.get("precision", "auto"))
    attn = (stage.get("model") or {}).get("attn_implementation") or "sdpa"
    if attn in ATTN_PACKAGES and not cuda:
        problems.append(f"model.attn_implementation: {attn} needs a CUDA GPU and none is available; use sdpa")
    elif attn in ATTN_PACKAGES and precision == "fp32":
        problems.append(f"model.attn_implementation: {attn} runs in fp16/bf16 only, but precision is fp32 here; "
                        "set precision=bf16 (or fp16), or use sdpa")
    peft = stage.get("peft") or {}
    if peft.get("method") == "qlora":
        compute = peft.get("bnb_4bit_compute_dtype", "auto")
        if compute == "bf16" and cuda and not torch.cuda.is_bf16_supported():
            problems.append(f"{where}.peft.bnb_4bit_compute_dtype: this GPU has no bf16; use auto (fp16 here)")
        if compute == "fp16" and not cuda:
            problems.append(f"{where}.peft.bnb_4bit_compute_dtype: fp16 4-bit kernels need a CUDA GPU; use auto "
                            "(fp32 on CPU)")
        problem = _bnb_4bit_problem("cuda" if cuda else "cpu")
        if problem:
            problems.append(f"{where}.peft.method: qlora cannot run here: {problem}; use peft=lora")
    return problems


def _bnb_4bit_problem(device: str) -> str | None:
    """None if bitsandbytes can quantise to 4 bits on ``device`` (CPU: its CPU backend, bitsandbytes >= 0.48)."""
    try:
        import bitsandbytes.functional as bnbf
        import torch

        bnbf.quantize_4bit(torch.zeros(64, 64, device=device), quant_type="nf4")
    except Exception as e:  # an import error, a missing backend, a broken CUDA setup
        from importlib import metadata

        try:
            version = metadata.version("bitsandbytes")
        except metadata.PackageNotFoundError:
            return "bitsandbytes is not installed"
        return f"bitsandbytes {version} cannot quantise to 4 bits on {device} ({type(e).__name__}: {e})"
    return None


def compute_dtype(peft: dict, precision: str):
    """The 4-bit compute dtype: the device's precision (bf16 / fp16 on CUDA, fp32 on CPU) unless set."""
    import torch

    chosen = peft.get("bnb_4bit_compute_dtype", "auto")
    return torch_dtype(precision) if chosen in (None, "auto") else getattr(torch, _DTYPES[chosen])


def quantization_kwargs(peft: dict | None, precision: str, classifier: bool = False) -> dict[str, Any]:
    """``from_pretrained`` arguments that load the base in 4 bits under qlora (a BitsAndBytesConfig and the device)."""
    if not peft or peft.get("method") != "qlora":
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    storage = peft.get("bnb_4bit_quant_storage")
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=peft.get("bnb_4bit_quant_type", "nf4"),
        bnb_4bit_use_double_quant=peft.get("bnb_4bit_use_double_quant", True),
        bnb_4bit_compute_dtype=compute_dtype(peft, precision),
        bnb_4bit_quant_storage=getattr(torch, _DTYPES[storage]) if storage else None,
        # a classifier's score head stays in full precision: it is trained whole (peft modules_to_save)
        llm_int8_skip_modules=["score", "classifier"] if classifier else None,
    )
    if torch.cuda.is_available():
        device = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
    else:
        device = "cpu"
    return {"quantization_config": config, "device_map": {"": device}}


def _after_quantised_load(model) -> None:
    """Two fixes for a 4-bit model on CPU (bitsandbytes' CPU backend); nothing changes on GPUs.

    * bitsandbytes 0.50 on AVX512-BF16 CPUs repacks 4-bit weights the first time a layer runs in eval mode without
      gradients (e.g. the held-out evaluation before training). The repacked layout has no backward (training after
      it gets wrong gradients) and needs output sizes divisible by 32: layers keep the training layout instead.
    * The parameters left in full precision (embeddings, norms, head) are views of the memory-mapped checkpoint,
      which keeps the whole mapping alive, with the pages of every weight read for quantisation still resident:
      they get their own memory, so the mapping and those pages are released.
    """
    if not getattr(model, "is_loaded_in_4bit", False) or next(model.parameters()).device.type != "cpu":
        return
    import gc

    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    for param in model.parameters():
        if not isinstance(param, bnb.nn.Params4bit):
            param.data = param.data.clone()
    gc.collect()


def lora_config(peft: dict | None, task: str = "CAUSAL_LM"):
    """A peft.LoraConfig from a stage's peft setting (None under full fine-tuning). ``task`` SEQ_CLS (reward models)
    makes PEFT keep the classifier's score head trainable and save it with the adapter (modules_to_save)."""
    if not peft or peft.get("method", "none") == "none":
        return None
    from peft import LoraConfig

    from alignctl.peft_config import LORA_FIELDS

    fields = {k: v for k, v in peft.items() if k in LORA_FIELDS}
    fields.setdefault("target_modules", "all-linear")
    return LoraConfig(task_type=task, **fields)


def prepare_for_training(model, peft: dict | None, checkpointing: bool, checkpointing_kwargs: dict | None = None):
    """Ready a loaded model for adapter training: k-bit preparation of a 4-bit base (freeze it, upcast the
    non-quantised parameters, gradient checkpointing with input gradients) or input gradients for LoRA +
    checkpointing. Full fine-tuning: unchanged."""
    method = (peft or {}).get("method", "none")
    if getattr(model, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                               gradient_checkpointing_kwargs=checkpointing_kwargs)
    if method != "none" and checkpointing:
        model.enable_input_require_grads()
    return model


def match_trainable_dtype(model, args) -> None:
    """TRL's trainers cast the trainable parameters of a 4-bit model to bf16 (the QLoRA paper's choice) and rely on
    bf16/fp16 autocast to mix them with the rest. Without autocast (fp32 compute, on CPU) a trained module that is not
    a LoRA layer, such as a reward model's score head, would meet fp32 inputs with bf16 weights: there the trainable
    parameters go back to fp32, the stage's compute dtype."""
    if args.bf16 or args.fp16 or not getattr(model, "is_loaded_in_4bit", False):
        return
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def save_adapter(model, tokenizer, out: str | os.PathLike) -> str:
    """Write a trained adapter (PEFT's adapter_config.json and adapter_model.safetensors) and the tokenizer
    atomically."""
    return save_final(model, tokenizer, out)


def merge_adapter(base_path: str, adapter_dir: str | os.PathLike, out: str | os.PathLike, model_spec: dict[str, Any],
                  precision: str, tokenizer, peft: dict, classifier: bool = False) -> str:
    """Merge an adapter into the base weights it was trained on and save a plain HF model at ``out``.

    Under qlora the base is loaded in 4 bits exactly as for training, then de-quantised, so the merged weights are
    the ones the adapter was trained against (de-quantised base + LoRA delta), not the original full-precision
    weights. The result has no quantisation config and no adapter: it loads with plain transformers.
    """
    from peft import PeftModel

    load = load_sequence_classifier if classifier else load_causal_lm
    model = load(base_path, model_spec, precision, tokenizer, peft=peft)
    if getattr(model, "is_loaded_in_4bit", False):
        model = model.dequantize()
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    align_special_tokens(model, tokenizer)
    return save_final(model, tokenizer, out)
