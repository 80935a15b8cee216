"""model.gguf_file: a GGUF checkpoint is de-quantised once into the cache (plain safetensors), trained, and saved
as a plain Hugging Face model. No download: the test writes a tiny Llama to a GGUF file itself (the gguf package's
GGUFWriter, weights in Q8_0), with its byte-level BPE tokenizer and chat template in the file's metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignctl import models
from alignctl.config.model_checks import base_model_problems
from alignctl.config.types import ModelSpec
from alignctl.tiny import build_tiny_tokenizer

pytest.importorskip("gguf")  # in the `test` extra

GGUF_NAME = "tiny-llama.Q8_0.gguf"
# Llama, shaped so that every matrix row holds whole Q8_0 blocks of 32 values (hidden 64, intermediate 128).
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-6)


def _permute(w, heads: int):
    """GGUF stores Llama's q/k rows interleaved per rotary pair (llama.cpp's layout; transformers undoes it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(folder: Path):
    """A random tiny Llama + alignctl's tiny tokenizer, written as one GGUF file; returns (model, tokenizer)."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = build_tiny_tokenizer()
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SHAPE)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(folder / GGUF_NAME), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(len(tok))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    data = json.loads(tok.backend_tokenizer.to_str())
    vocab = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = set(tok.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_unk_token_id(tok.unk_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)

    def q8(name, t):
        w.add_tensor(name, gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    q8("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        q8(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        q8(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        q8(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        q8(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        q8(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        q8(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        q8(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, tok


@pytest.fixture(scope="module")
def gguf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf") / "tiny-llama-gguf"
    model, tok = write_tiny_llama_gguf(folder)
    return folder, model, tok


def test_gguf_is_dequantised_once_into_plain_safetensors(gguf_folder, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, original, tok = gguf_folder
    spec = ModelSpec(str(folder), gguf_file=GGUF_NAME)
    assert base_model_problems(spec) == []
    path = models.materialize(str(folder), tmp_path / "cache", spec)
    assert models.materialize(str(folder), tmp_path / "cache", spec) == path  # cached: built once
    names = {p.name for p in Path(path).iterdir()}
    assert "model.safetensors" in names and not any(n.endswith(".gguf") for n in names), names
    assert "quantization_config" not in json.loads((Path(path) / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    loaded = AutoTokenizer.from_pretrained(path)
    text = "describe the river ."
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]  # the same tokenizer, from the file's metadata
    assert loaded.chat_template == tok.chat_template and loaded.eos_token == tok.eos_token
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        want, got = original(ids).logits, model(ids).logits
    assert (got - want).abs().max() < 0.05 * want.abs().max(), (got - want).abs().max()
    # every weight is the original's up to Q8_0 rounding, q/k in transformers' layout (GGUF interleaves their rows)
    mine = model.state_dict()
    for name, value in original.state_dict().items():
        assert (mine[name] - value).norm() <= 0.01 * value.norm(), name
    # a later stage (a final/ folder) is never treated as the GGUF base
    assert models.materialize(str(tmp_path), tmp_path / "cache", spec) == str(tmp_path)


def test_sft_stage_from_a_gguf_file_saves_plain_safetensors(gguf_folder, run_recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, _, _ = gguf_folder
    recipe = tmp_path / "gguf-sft.yaml"
    recipe.write_text(
        "name: gguf-sft\nstages:\n  sft:\n    trainer: sft\n    data: sft\n    learning_rate: 3.0e-3\n"
        "    max_steps: 8\n    per_device_train_batch_size: 8\n    save_strategy: 'no'\n")
    run_dir = tmp_path / "run"
    m = run_recipe([f"recipe={recipe}", f"model.name_or_path={folder}", f"model.gguf_file={GGUF_NAME}",
                    "data.sft.eval_size=16"], run_dir)
    assert m["status"] == "completed"
    metrics = m["stages"][0]["metrics"]
    assert metrics["after"]["eval_loss"] < metrics["before"]["eval_loss"]
    final = run_dir / "sft" / "final"
    names = {p.name for p in final.iterdir()}
    assert "model.safetensors" in names and not any(n.endswith(".gguf") for n in names)
    assert "quantization_config" not in json.loads((final / "config.json").read_text())
    assert AutoModelForCausalLM.from_pretrained(final).config.model_type == "llama"


def test_gguf_settings_that_cannot_work_are_named(gguf_folder):
    folder, _, _ = gguf_folder
    (problem,) = base_model_problems(ModelSpec(str(folder), gguf_file="other.gguf"))
    assert problem == f"model.gguf_file: other.gguf is not in {folder} (GGUF files there: {GGUF_NAME})"
    (problem,) = base_model_problems(ModelSpec("tiny:llama", gguf_file=GGUF_NAME))
    assert problem.startswith("model.gguf_file: set, but tiny:llama is a built-in tiny model")
    missing = ModelSpec("pkg:surely_not_an_installed_package", gguf_file=GGUF_NAME)
    assert base_model_problems(missing, run=False) == []  # plan: fine anywhere
    (problem,) = base_model_problems(missing)  # run: says what to install
    assert "pip install surely-not-an-installed-package" in problem
