"""Architectures x full / LoRA / QLoRA: six families built tiny and locally (random init, real architecture), each
SFT -> DPO on the synthetic data; chat-template checks; attention defaults and refusals; the QLoRA merge of Conv1D
(GPT-2) layers.

The families differ where pipelines break: llama (reference), qwen2 (tied embeddings), gpt2 (Conv1D layers, a
tokenizer without pad token and without chat template), phi3 (fused qkv / gate-up projections, a template without
{% generation %} markers), mistral (sliding-window attention, no pad token, a template that refuses system turns),
gemma2 (logit soft-capping: transformers refuses SDPA for it, so eager; a template that refuses system turns)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from alignctl import models
from alignctl.config import model_checks
from alignctl.config.types import ModelSpec
from alignctl.errors import ConfigError
from alignctl.templates import DEFAULT_CHAT_TEMPLATE

pytestmark = pytest.mark.slow

ARCHS = ("llama", "qwen2", "gpt2", "phi3", "mistral", "gemma2")
MODES = ("none", "lora", "qlora")
# Few steps, small held-out sets: the 18 runs of the matrix fit the suite's budget.
# The plain DPO loss: the default recipe's added NLL term (loss_type [sigmoid, sft]) learns the preference slower
# per step, and these 16 steps measure whether each architecture trains, not the default loss.
FAST = ["stages.sft.max_steps=16", "stages.dpo.max_steps=16", "stages.sft.per_device_train_batch_size=8",
        "stages.dpo.per_device_train_batch_size=8", "data.sft.eval_size=16", "data.prefs.eval_size=32",
        "stages.dpo.loss_type=sigmoid"]
# Adapters learn slower per step: higher learning rates (LoRA's usual practice) keep the step count as small.
ADAPTER_LR = ["stages.sft.learning_rate=1e-2", "stages.dpo.learning_rate=3e-3"]
CONV = [{"role": "user", "content": "describe the river ."}, {"role": "assistant", "content": "the river is calm ."}]
SYSTEM = [{"role": "system", "content": "answer kindly ."}]


def _final_loads(final: Path, arch: str):
    """final/ is a plain Hugging Face folder of the architecture: safetensors, no adapter, no quantisation config;
    model and tokenizer load with transformers alone and the model computes finite logits for a chat prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in final.iterdir()}
    assert "model.safetensors" in names and "adapter_config.json" not in names, names
    assert "quantization_config" not in json.loads((final / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.model_type == arch and tok.chat_template and tok.pad_token is not None
    ids = tok.apply_chat_template(CONV[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
    return model


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> list[str]:
    """The first rows of the built-in synthetic sets (the stages read and tokenise less): overrides of data paths."""
    from alignctl.synthetic import DATA_DIR

    folder = tmp_path_factory.mktemp("synthetic-small")
    for name, rows in (("sft", 176), ("prefs", 160)):
        lines = (DATA_DIR / f"{name}.jsonl").read_text().splitlines()[:rows]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return [f"data.sft.path={folder / 'sft.jsonl'}", f"data.prefs.path={folder / 'prefs.jsonl'}"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_sft_then_dpo_runs_learns_and_final_loads(arch, mode, run_recipe, small_data, tmp_path):
    run_dir = tmp_path / "run"
    faster = [] if mode == "none" else ADAPTER_LR
    m = run_recipe([f"model.name_or_path=tiny:{arch}", f"peft={mode}", *FAST, *faster, *small_data], run_dir)
    assert m["status"] == "completed"
    sft, dpo = (s["metrics"] for s in m["stages"])
    for stage in (sft, dpo):
        assert math.isfinite(stage["train"]["train_loss"])
    # It learns: held-out SFT loss falls (16 steps: full ~6.2 -> ~3.6-4.2, LoRA/QLoRA ~6.2 -> ~5.5-5.8) and DPO moves
    # held-out preference accuracy up (measured: from 0.19-0.66 to 0.9-1.0 in every cell).
    assert sft["after"]["eval_loss"] < sft["before"]["eval_loss"] - (0.3 if mode == "none" else 0.1), sft
    assert dpo["after"]["eval_pref_accuracy"] > dpo["before"]["eval_pref_accuracy"] + 0.1, dpo
    assert dpo["after"]["eval_pref_accuracy"] >= 0.75, dpo
    for stage in ("sft", "dpo"):
        _final_loads(run_dir / stage / "final", arch)
    if mode != "none":
        assert (run_dir / "dpo" / "adapter" / "adapter_config.json").exists()
    if arch == "gpt2":  # no chat template, no pad token: alignctl's default template and the eos/unk token as pad
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(run_dir / "dpo" / "final")
        assert tok.chat_template == DEFAULT_CHAT_TEMPLATE and tok.pad_token == "<|endoftext|>"


def test_qlora_merge_of_conv1d_layers_reproduces_the_trained_model(cache_root, tmp_path):
    """GPT-2's Conv1D layers become Linear4bit under 4 bits and nn.Linear when de-quantised: the merged final/ must
    hold them back in Conv1D layout (it used to save (out, in) weights under Conv1D names, which broke the next
    stage: `The size of tensor a (144) must match the size of tensor b (48)`)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from alignctl.config.peft import preset as _peft_preset

    base = models.materialize("tiny:gpt2", cache_root / ".cache")
    spec = ModelSpec("tiny:gpt2")
    tok = models.load_tokenizer(base, spec)
    peft = {**_peft_preset("qlora"), "r": 4, "init_lora_weights": False}  # a non-zero adapter
    torch.manual_seed(0)
    trained = get_peft_model(models.prepare_for_training(models.load_causal_lm(base, spec, "fp32", tok, peft=peft),
                                                         peft, False), models.lora_config(peft)).eval()
    ids = torch.tensor([tok("the river is cold .")["input_ids"]])
    with torch.no_grad():
        expected = trained(ids).logits
    models.save_adapter(trained, tok, tmp_path / "adapter")
    models.merge_adapter(base, tmp_path / "adapter", tmp_path / "final", spec, "fp32", tok, peft)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final")  # a plain load: shapes must match Conv1D
    assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)
    with torch.no_grad():
        got = merged(ids).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    # and it loads in 4 bits again for a next QLoRA stage with the same weights up to re-quantisation (relative
    # error ~0.2-0.35 here; a transposed layout would give ~1.4)
    again = models.load_causal_lm(str(tmp_path / "final"), spec, "fp32", tok, peft=peft).dequantize()
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"):
        w, v = merged.get_submodule(name).weight.T, again.get_submodule(name).weight
        assert w.shape == v.shape and (w - v).norm() / w.norm() < 0.5


# -- chat templates ----------------------------------------------------------------------------------------------
def _tokenizer(arch, cache_root):
    return models.load_tokenizer(models.materialize(f"tiny:{arch}", cache_root / ".cache"), ModelSpec(f"tiny:{arch}"))


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_template_refusing_system_turns_is_named_with_what_to_set(arch, cache_root):
    tok = _tokenizer(arch, cache_root)
    assert models.template_problems(tok, CONV, "data.sft", model=f"tiny:{arch}") == []
    problems = models.template_problems(tok, [CONV, SYSTEM + CONV], "data.sft", model=f"tiny:{arch}")
    assert len(problems) == 1 and "\n" not in problems[0]
    assert problems[0].startswith(f"model tiny:{arch}'s chat template refuses a system turn")
    assert "data.sft has system turns: set data.sft.system_turns=merge (or drop), or model.chat_template" in problems[0]
    # merged into the user turn (what system_turns=merge does), the same conversation renders
    merged = [{"role": "user", "content": SYSTEM[0]["content"] + "\n\n" + CONV[0]["content"]}, CONV[1]]
    assert models.template_problems(tok, merged, "data.sft") == []


def test_templates_accepting_system_turns_and_generation_markers(cache_root):
    for arch in ("llama", "phi3"):
        assert models.template_problems(_tokenizer(arch, cache_root), SYSTEM + CONV, "data.sft") == []
    # assistant-only loss needs {% generation %} markers: the default template has them, Phi-3's shape has not
    assert models.template_problems(_tokenizer("llama", cache_root), CONV, "data.sft", assistant_only_loss=True) == []
    problems = models.template_problems(_tokenizer("phi3", cache_root), CONV, "data.sft", model="tiny:phi3",
                                        assistant_only_loss=True)
    assert problems == ["model tiny:phi3's chat template has no {% generation %} markers, which assistant_only_loss "
                        "needs (data.sft): set assistant_only_loss=false, or a model.chat_template with them"]
    # a broken template is named too
    tok = _tokenizer("llama", cache_root)
    tok.chat_template = "{{ messages[0]['nope'].upper() }}"
    assert "cannot render data.sft's conversations" in models.template_problems(tok, CONV, "data.sft")[0]


def test_tokenizer_variants_of_the_families(cache_root):
    gpt2 = _tokenizer("gpt2", cache_root)  # no template, no pad: alignctl's default template, eos as pad
    assert gpt2.chat_template == DEFAULT_CHAT_TEMPLATE and gpt2.pad_token == gpt2.eos_token
    mistral = _tokenizer("mistral", cache_root)  # no pad: its unk token
    assert mistral.pad_token == "<unk>" and mistral.chat_template.startswith("{{ bos_token }}")
    rendered = _tokenizer("gemma2", cache_root).apply_chat_template(CONV, tokenize=False)
    assert rendered.startswith("<bos><start_of_turn>user\n") and "<start_of_turn>model\n" in rendered


# -- attention ---------------------------------------------------------------------------------------------------
def test_attention_defaults_to_transformers_choice_and_explicit_values_pass(cache_root):
    from alignctl.config.compose import compose

    assert compose([]).model.attn_implementation is None  # configs/model: null
    assert models.load_kwargs(ModelSpec("tiny:llama"), "fp32")["attn_implementation"] is None
    eager = ModelSpec("tiny:llama", attn_implementation="eager")
    assert models.load_kwargs(eager, "fp32")["attn_implementation"] == "eager"
    picked = {arch: models.load_causal_lm(models.materialize(f"tiny:{arch}", cache_root / ".cache"),
                                          ModelSpec(f"tiny:{arch}"), "fp32")
              .config._attn_implementation for arch in ("llama", "gemma2")}
    assert picked == {"llama": "sdpa", "gemma2": "eager"}


def test_attention_names_are_checked_cheaply_and_match_transformers():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert set(ALL_ATTENTION_FUNCTIONS.valid_keys()) | {"eager"} == set(model_checks.ATTN_IMPLEMENTATIONS)
    for ok in (None, "sdpa", "eager", "flash_attention_2", "kernels-community/flash-attn"):
        assert model_checks.attn_implementation_problems(ok) == []
    (problem,) = model_checks.attn_implementation_problems("flash_attn2")
    assert problem.startswith("model.attn_implementation: unknown attention implementation 'flash_attn2' (did you "
                              "mean 'flash_attention_2'")


def test_sdpa_refusal_read_without_importing_matches_transformers_classes():
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for model_type in ("gemma2", "vaultgemma", "gpt_oss", *ARCHS):
        cls = AutoModelForCausalLM._model_mapping[CONFIG_MAPPING[model_type]]
        assert model_checks.supports_attn(model_type, "sdpa") == cls._supports_sdpa, model_type
    assert not model_checks.supports_attn("gemma2", "sdpa") and model_checks.supports_attn("llama", "sdpa")


def test_sdpa_forced_on_gemma2_stops_before_loading_with_what_to_set(run_recipe, tmp_path):
    from alignctl.errors import ConfigError

    problems = model_checks.base_model_problems(ModelSpec("tiny:gemma2", attn_implementation="sdpa"))
    assert problems == ["model.attn_implementation: gemma2 models do not support sdpa in transformers; set "
                        "model.attn_implementation=null (transformers picks, e.g. eager) or eager"]
    assert model_checks.base_model_problems(ModelSpec("tiny:llama", attn_implementation="sdpa")) == []
    with pytest.raises(ConfigError, match="gemma2 models do not support sdpa"):
        run_recipe(["model.name_or_path=tiny:gemma2", "model.attn_implementation=sdpa"], tmp_path / "run")
    assert not list((tmp_path / "run").glob("*/final"))


def test_system_turns_merged_for_a_template_that_refuses_them(run_recipe, tmp_path):
    """Data with system turns on a Mistral-shaped template: data.<set>.system_turns=merge makes it train (the
    template itself refuses them, as test_template_refusing_system_turns_is_named_with_what_to_set shows)."""
    from alignctl.synthetic import DATA_DIR

    rows = [json.loads(line) for line in (DATA_DIR / "sft.jsonl").read_text().splitlines()[:96]]
    data = tmp_path / "sft-with-system.jsonl"
    data.write_text("".join(json.dumps({"messages": SYSTEM + r["messages"]}) + "\n" for r in rows))
    recipe = tmp_path / "sft-only.yaml"
    recipe.write_text("name: sft-only\nstages:\n  sft:\n    trainer: sft\n    data: sft\n    learning_rate: 3.0e-3\n"
                      "    max_steps: 6\n    per_device_train_batch_size: 8\n    save_strategy: 'no'\n")
    overrides = [f"recipe={recipe}", "model.name_or_path=tiny:mistral", f"data.sft.path={data}",
                 "data.sft.eval_size=16"]
    # Without the setting the run stops in its pre-flight, before anything trains, saying what to set.
    with pytest.raises(ConfigError) as e:
        run_recipe(overrides, tmp_path / "refused")
    assert len(e.value.problems) == 1 and "refuses a system turn" in e.value.problems[0]
    assert "data.sft.system_turns=merge" in e.value.problems[0]
    refused = json.loads((tmp_path / "refused" / "manifest.json").read_text())
    assert [s["status"] for s in refused["stages"]] == ["pending"]
    m = run_recipe([*overrides, "data.sft.system_turns=merge"], tmp_path / "run")
    assert m["status"] == "completed"
    assert m["stages"][0]["metrics"]["after"]["eval_loss"] < m["stages"][0]["metrics"]["before"]["eval_loss"]
