"""The one place that builds, loads and saves models and tokenizers.

Everything about weights goes through here: the built-in tiny models (built in alignctl.tiny), dtype and
attention choice per device, tokenizer fix-ups (chat template, pad token),
LoRA / QLoRA (peft settings, 4-bit loading, k-bit training preparation, merging an
adapter into de-quantised base weights) and writing a stage's ``final/`` folder as a
plain Hugging Face model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from alignctl.config.model_checks import ATTN_PACKAGES, PKG_PREFIX, base_model_problems, pkg_dir, pkg_missing
from alignctl.config.types import ModelSpec, StageSpec
from alignctl.templates import DEFAULT_CHAT_TEMPLATE
from alignctl.tiny import build_tiny, is_tiny, tiny_arch, tiny_key

log = logging.getLogger("alignctl")


def materialize(name_or_path: str, cache_root: str | os.PathLike, model_spec: ModelSpec | None = None) -> str:
    """Return a loadable path for ``name_or_path``: builds a built-in tiny model once per cache; resolves ``pkg:``;
    and when ``name_or_path`` is the run's base model with ``model.gguf_file`` set, de-quantises that GGUF file once
    into the cache, so that every stage loads plain safetensors."""
    if is_tiny(name_or_path):
        arch = tiny_arch(name_or_path)
        out = Path(cache_root) / f"tiny-{arch}-{tiny_key(name_or_path)}"
        return _build_once(out, lambda tmp: build_tiny(arch, tmp))
    gguf_file = model_spec.gguf_file if model_spec is not None else None
    is_base = model_spec is not None and str(name_or_path) == str(model_spec.name_or_path)
    path = resolve_pkg(name_or_path) if str(name_or_path).startswith(PKG_PREFIX) else name_or_path
    if not (gguf_file and is_base):
        return path
    key = hashlib.sha256(json.dumps([_gguf_identity(path, gguf_file, model_spec.revision), 1]).encode())
    out = Path(cache_root) / f"gguf-{Path(gguf_file).stem}-{key.hexdigest()[:12]}"
    return _build_once(out, lambda tmp: dequantize_gguf(path, gguf_file, tmp, model_spec))


BUILT = ".alignctl-built.json"  # in a cached build: its files (sizes, hashes), sealed with the user's key


def _build_once(out: Path, build) -> str:
    """A cached build (built-in tiny model, de-quantised GGUF) under ``<output_root>/.cache``, which a recipe may
    choose: a folder is used only when its marker, sealed with this user's key (alignctl.trust), verifies and its
    files match the marker (names, sizes, sampled hashes; a full hash where a time moved); otherwise it is built
    again into a fresh temporary folder and swapped in. Ranks started by alignctl's launcher take the folder the
    orchestrator has just checked (their node may hold another key, or none)."""
    from alignctl.ranks import ATTEMPT_ENV

    if os.environ.get(ATTEMPT_ENV) and (out / BUILT).is_file():
        return str(out)
    why = _build_problem(out)
    if why is None:
        return str(out)
    if why != "missing":
        log.warning("cached model %s cannot be used (%s); building it again", out, why)
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp{os.getpid()}.", dir=out.parent))  # new, never a link
    tmp.chmod(0o755)  # as a folder made by mkdir (mkdtemp makes it 0700)
    try:
        build(tmp)
        _seal_build(tmp, out.name)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def _build_problem(out: Path) -> str | None:
    """Why a cached build cannot be used (None: it can)."""
    from alignctl import digests, fsutil, trust

    if out.is_symlink() or not out.is_dir():
        return "missing" if not out.is_symlink() else "a symbolic link"
    try:
        marker = json.loads((out / BUILT).read_text())
    except (OSError, ValueError):
        return "no build marker"
    ok, who = trust.check(marker)
    if not ok or marker.get("name") != out.name or not isinstance(marker.get("files"), dict):
        return f"build marker not sealed with your key ({who})"
    present = {str(f.relative_to(out)) for f in fsutil.tree_files(out)} - {BUILT}
    if present != set(marker["files"]):
        return "other files than when built"
    problems = digests.check_files(out, marker["files"])
    return problems[0] if problems else None


def _seal_build(tmp: Path, name: str) -> None:
    from alignctl import digests, fsutil, trust

    files = digests.record_files(tmp)
    fsutil.write_json(tmp / BUILT, trust.sealed({"name": name, "files": files}))


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the fresh build ``tmp`` at ``out``: a rename when there is nothing there; else, unless another process
    has meanwhile put a good build there, the old folder is renamed away first and deleted after."""
    try:
        tmp.rename(out)
        return
    except OSError:  # out exists: another process built it first, or it is the build that failed the check
        pass
    if _build_problem(out) is None:
        return
    old = out.with_name(f"{out.name}.old{os.getpid()}.{os.urandom(4).hex()}")
    out.rename(old)
    try:
        tmp.rename(out)
    finally:
        if old.is_symlink() or not old.is_dir():
            old.unlink(missing_ok=True)
        else:
            shutil.rmtree(old, ignore_errors=True)


def resolve_pkg(name_or_path: str) -> str:
    folder = pkg_dir(name_or_path)
    if folder is None:
        from alignctl.errors import ConfigError

        raise ConfigError([pkg_missing(name_or_path)])
    return str(folder)


def _gguf_identity(path: str, gguf_file: str, revision: str | None) -> list:
    f = Path(path).expanduser() / gguf_file
    if f.exists():
        st = f.stat()
        return [str(f.absolute()), st.st_size, int(st.st_mtime)]
    return [str(path), gguf_file, revision or "main"]


def dequantize_gguf(path: str, gguf_file: str, out: str | os.PathLike, model_spec: ModelSpec) -> None:
    """Load a GGUF checkpoint with transformers (which de-quantises it through the `gguf` package) and save it as a
    plain Hugging Face folder: fp32 safetensors, config, generation config and the tokenizer (with its template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("de-quantising %s from %s (once; cached as safetensors)", gguf_file, path)
    common = dict(gguf_file=gguf_file, revision=model_spec.revision,
                  trust_remote_code=model_spec.trust_remote_code is True)
    tok = AutoTokenizer.from_pretrained(path, **common)
    # dequantize=True: plain full-precision layers (transformers would otherwise keep packed GGUF layers where a
    # kernel is installed), and a model without a quantizer, which save_pretrained accepts
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=GgufConfig(gguf_file=gguf_file, dequantize=True), **common)
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


# Variables accelerate and transformers read that change how a stage trains without being part of its spec (and so
# of its fingerprint): mixed precision, the sharding engine (FSDP, DeepSpeed, Megatron), compilation, accumulation...
# A stage never inherits them; launcher.env (fingerprinted) and accelerate config files set them on purpose.
TRAINING_ENV = re.compile(r"^(ACCELERATE_|FSDP_|MEGATRON_LM_|PARALLELISM_CONFIG_)")
# ... except those that say where or how verbosely it runs
PLACEMENT_ENV = {"ACCELERATE_USE_CPU", "ACCELERATE_TORCH_DEVICE", "ACCELERATE_DEBUG_MODE", "ACCELERATE_LOG_LEVEL",
                 "ACCELERATE_ENABLE_RICH", "ACCELERATE_DEBUG_RDV_FILE", "ACCELERATE_CPU_AFFINITY",
                 "ACCELERATE_BYPASS_DEVICE_MAP"}


def training_env(spec: StageSpec, inherited: dict[str, str], explicit: dict[str, str] | None = None
                 ) -> tuple[dict[str, str], list[str]]:
    """The environment a stage trains under, and the given variables it does not see: ``inherited`` without the
    variables of TRAINING_ENV, plus ``explicit`` (launcher.env), plus ``ACCELERATE_MIXED_PRECISION`` matching the
    stage's bf16/fp16 flags (``no`` for fp32: transformers reads the variable when neither flag is set)."""
    # the bf16/fp16 flags the stage's TRL config gets (as alignctl.train.context.StageContext.args_for)
    args = spec.args
    flags = args if "bf16" in args or "fp16" in args else mixed_precision_args(spec.precision)
    env = {k: v for k, v in inherited.items() if not TRAINING_ENV.match(k) or k in PLACEMENT_ENV}
    env.update(explicit or {})
    env["ACCELERATE_MIXED_PRECISION"] = "fp16" if flags.get("fp16") else "bf16" if flags.get("bf16") else "no"
    given = {**inherited, **(explicit or {})}
    return env, sorted(k for k, v in given.items() if TRAINING_ENV.match(k) and env.get(k) != v)


def note_dropped_env(stage: str, dropped: list[str]) -> None:
    if dropped:
        log.info("stage %s: training without %s from the environment (it would change how the stage trains without "
                 "changing its fingerprint; `precision` sets mixed precision); set others in launcher.env or an "
                 "accelerate config file", stage, ", ".join(dropped))


@contextlib.contextmanager
def training_environment(spec: StageSpec, note: bool = True):
    """This process's environment as :func:`training_env` makes it, for a stage trained (or its TRL config checked)
    in this process; restored afterwards. ``note``: log the variables left out."""
    before = dict(os.environ)
    env, dropped = training_env(spec, before)
    if note:
        note_dropped_env(spec.name, dropped)
    changed = {k for k in set(before) | set(env) if before.get(k) != env.get(k)}
    for k in changed:
        if k in env:
            os.environ[k] = env[k]
        else:
            os.environ.pop(k, None)
    try:
        yield
    finally:
        for k in changed:
            if k in before:
                os.environ[k] = before[k]
            else:
                os.environ.pop(k, None)


def link_model_spec(base: ModelSpec, load: dict[str, Any] | None, path: str) -> ModelSpec:
    """The model spec a link's model loads with (config/links.py). ``load`` None: a stage of the recipe or the base
    model, which loads with the base model's settings (its stages were trained with ``model.chat_template``, and a
    stage's final/ is a local folder, so the revision does not apply). Otherwise a model outside the recipe, with
    the settings recorded at plan time: its own revision, remote code only with the stage's consent, its own
    tokenizer's chat template (``model.chat_template`` is not applied) and the attention transformers picks for it
    (the base model's kernel may not support its architecture)."""
    if load is None:
        return base
    return ModelSpec(str(path), revision=load.get("revision"), trust_remote_code=load.get("trust_remote_code") is True)


def load_tokenizer(path: str, model_spec: ModelSpec, name: str | None = None):
    """Load a tokenizer and make it usable for chat training.

    A tokenizer without a chat template gets ``model.chat_template`` or the default one (``model_spec`` is the
    base model's, or a link's own from :func:`link_model_spec`, which sets no chat template: an outside reward or
    judge model keeps its tokenizer's template); a tokenizer without a pad token gets its unk token, else its eos
    token. ``name``: the name it goes by instead of ``path`` (its ``name_or_path``): an earlier stage's final/ in
    a run folder is named by the stage, so that two runs starting from the same stage hand TRL tokenizers that the
    datasets cache hashes alike (it hashes the tokenizer, name included, to key TRL's tokenization of the rows).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=model_spec.revision,
                                        trust_remote_code=model_spec.trust_remote_code is True)
    if name is not None:
        tok.name_or_path = tok.init_kwargs["name_or_path"] = name
    if model_spec.chat_template:
        tok.chat_template = model_spec.chat_template
    elif not tok.chat_template:
        log.info("tokenizer of %s has no chat template: using alignctl's default (Zephyr-style)", path)
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
        log.info("tokenizer has no pad token: using %r", tok.pad_token)
    return tok


def load_kwargs(model_spec: ModelSpec, precision: str, peft: dict | None = None,
                classifier: bool = False) -> dict[str, Any]:
    """``from_pretrained`` arguments of a model: revision, dtype, attention, remote code, 4-bit quantisation."""
    return dict(
        revision=model_spec.revision,
        dtype=torch_dtype(precision),
        # None: transformers picks for the architecture (SDPA where it supports it, else eager, e.g. Gemma2)
        attn_implementation=model_spec.attn_implementation or None,
        trust_remote_code=model_spec.trust_remote_code is True,
        use_safetensors=True,
        **quantization_kwargs(peft, precision, classifier),
    )


def load_causal_lm(path: str, model_spec: ModelSpec, precision: str, tokenizer=None, peft: dict | None = None):
    """A causal LM; 4-bit quantised (frozen base for an adapter) when ``peft`` is a qlora setting."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs(model_spec, precision, peft))
    _after_quantised_load(model)
    if tokenizer is not None:
        align_special_tokens(model, tokenizer)
    return model


def load_sequence_classifier(path: str, model_spec: ModelSpec, precision: str, tokenizer=None,
                             peft: dict | None = None):
    """A one-output sequence classifier (reward/value model) on top of ``path``'s backbone (4-bit under qlora)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, **load_kwargs(model_spec, precision, peft, classifier=True))
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


def partial_dir(out: str | os.PathLike, tag: str | None = None) -> Path:
    """Where ``out`` is written before it is renamed into place: ``<out>.<tag>.partial``, a name of this writer's
    own (``tag``: e.g. the attempt id every rank shares; default random), so that two writers never share one
    (``store gc`` removes ``*.partial`` leftovers)."""
    out = Path(out)
    return out.with_name(f"{out.name}.{tag or uuid.uuid4().hex[:8]}.partial")


def place_dir(tmp: Path, out: str | os.PathLike, guard=None) -> str:
    """Replace ``out`` with the finished folder ``tmp``; ``guard`` (a callable that raises when this process no
    longer owns ``out``, e.g. lost its store lock: alignctl.fsutil.check_owner) is called first, and on failure
    ``tmp`` is removed and ``out`` left alone."""
    out = Path(out)
    try:
        if guard is not None:
            guard()
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)


def save_final(model, tokenizer, out: str | os.PathLike, guard=None) -> str:
    """Write a plain HF folder (safetensors + tokenizer) atomically: write to a folder of this writer's own, then
    (``guard`` permitting: :func:`place_dir`) rename it over ``out``."""
    tmp = partial_dir(out)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return place_dir(tmp, out, guard)


# -- LoRA / QLoRA (the setting itself is validated in alignctl.config.peft) -------------------------------------
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "uint8": "uint8"}


def device_problems(stage: StageSpec) -> list[str]:
    """Run-time checks of settings that cannot work on this machine; called before any model is loaded."""
    import torch

    where = f"stages.{stage.name}"
    problems = []
    cuda = torch.cuda.is_available()
    precision = precision_for(stage.precision)
    attn = stage.model.attn_implementation
    if attn in ATTN_PACKAGES and not cuda:
        problems.append(f"model.attn_implementation: {attn} needs a CUDA GPU and none is available; use null "
                        "(transformers' choice) or sdpa")
    elif attn in ATTN_PACKAGES and precision == "fp32":
        problems.append(f"model.attn_implementation: {attn} runs in fp16/bf16 only, but precision is fp32 here; "
                        "set precision=bf16 (or fp16), or use sdpa")
    problems += base_model_problems(stage.model)
    peft = stage.peft or {}
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


def template_problems(tokenizer, sample_messages, where: str, model: str | None = None,
                      assistant_only_loss: bool = False) -> list[str]:
    """Render sample conversations of data set ``where`` (e.g. "data.sft") with the tokenizer's chat template.

    Returns one-line messages naming what to set: a template that refuses system turns when the data has them,
    a template that fails on the data otherwise, and (``assistant_only_loss``) a template without
    ``{% generation %}`` markers. ``sample_messages`` is one conversation (a list of ``{role, content}``) or a list
    of them."""
    convs = [sample_messages] if sample_messages and isinstance(sample_messages[0], dict) else list(sample_messages)
    model = model or getattr(tokenizer, "name_or_path", "") or "the model"
    name = where.split(".", 1)[1] if where.startswith("data.") else where
    problems = []
    for conv in convs:
        try:
            tokenizer.apply_chat_template(conv, tokenize=False)
            continue
        except Exception as e:  # jinja's TemplateError (raise_exception), or a template bug
            error = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        without = [m for m in conv if m.get("role") != "system"]
        if len(without) < len(conv) and _renders(tokenizer, without):
            problems.append(f"model {model}'s chat template refuses a system turn ({error}), and {where} has system "
                            f"turns: set data.{name}.system_turns=merge (or drop), or model.chat_template")
        else:
            problems.append(f"model {model}'s chat template cannot render {where}'s conversations ({error}): set "
                            "model.chat_template")
        break
    if assistant_only_loss and not re.search(r"\{%-?\s*generation\s*-?%\}", tokenizer.chat_template or ""):
        problems.append(f"model {model}'s chat template has no {{% generation %}} markers, which assistant_only_loss "
                        f"needs ({where}): set assistant_only_loss=false, or a model.chat_template with them")
    return problems


def _renders(tokenizer, conv) -> bool:
    try:
        tokenizer.apply_chat_template(conv, tokenize=False)
        return True
    except Exception:
        return False


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

    from alignctl.config.peft import LORA_FIELDS

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


def save_adapter(model, tokenizer, out: str | os.PathLike, guard=None) -> str:
    """Write a trained adapter (PEFT's adapter_config.json and adapter_model.safetensors) and the tokenizer
    atomically (``guard``: see :func:`save_final`)."""
    return save_final(model, tokenizer, out, guard)


def merge_loaded(model, tokenizer):
    """A LoRA-wrapped model merged into the base weights it holds, in memory: what :func:`merge_adapter` gives from
    the saved adapter and the base's files, without loading the base again (not for 4-bit bases, which are
    de-quantised from a fresh load)."""
    merged = model.merge_and_unload()
    align_special_tokens(merged, tokenizer)
    return merged


def merge_adapter(base_path: str, adapter_dir: str | os.PathLike, out: str | os.PathLike, model_spec: ModelSpec,
                  precision: str, tokenizer, peft: dict, classifier: bool = False, guard=None) -> str:
    """Merge an adapter into the base weights it was trained on and save a plain HF model at ``out``.

    Under qlora the base is loaded in 4 bits exactly as for training, then de-quantised, so the merged weights are
    the ones the adapter was trained against (de-quantised base + LoRA delta), not the original full-precision
    weights. The result has no quantisation config and no adapter: it loads with plain transformers.
    """
    from peft import PeftModel

    load = load_sequence_classifier if classifier else load_causal_lm
    model = load(base_path, model_spec, precision, tokenizer, peft=peft)
    conv1d = None
    if getattr(model, "is_loaded_in_4bit", False):
        conv1d = _conv1d_names(model)
        model = model.dequantize()
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    if conv1d:
        _restore_conv1d(model, conv1d)
    align_special_tokens(model, tokenizer)
    return save_final(model, tokenizer, out, guard)


def _conv1d_names(model) -> list[str]:
    """Names of the architecture's Conv1D layers (GPT-2 style: weight stored (in, out)), from an empty copy of the
    model: 4-bit loading replaced them with Linear4bit, and de-quantising gives nn.Linear (weight (out, in))."""
    import torch
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        skeleton = type(model)(model.config)
    return [name for name, module in skeleton.named_modules() if isinstance(module, Conv1D)]


def _restore_conv1d(model, names: list[str]) -> None:
    """Turn the de-quantised nn.Linear layers that are Conv1D in the architecture back into Conv1D (transposed
    weight), so that final/ holds the layout the architecture loads (otherwise (out, in) weights are saved under
    Conv1D names: a plain load fails on their shapes and a 4-bit load silently scrambles them)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if isinstance(linear, Conv1D) or not isinstance(linear, torch.nn.Linear):
            continue
        conv = Conv1D(linear.out_features, linear.in_features).to(linear.weight.device, linear.weight.dtype)
        conv.weight.data = linear.weight.data.t().contiguous()
        if linear.bias is not None:
            conv.bias.data = linear.bias.data.clone()
        setattr(parent, child, conv)
