"""LoRA / QLoRA on every stage: plain merged final/ folders, adapters chained through merged models, the DPO
reference is the merged SFT model (adapter disabled, no second copy), and settings that cannot work are refused
before anything loads. Two architectures: tiny Llama (lora) and tiny Qwen2 (qlora)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignctl import models
from alignctl.cli import main
from alignctl.config import peft as peft_config
from alignctl.config.types import ModelSpec, RunSpec
from conftest import REPO, read_spec, stage_spec

pytestmark = pytest.mark.slow


def _final_is_plain(final: Path, classifier: bool = False):
    """final/ holds a plain model: no adapter files, no quantisation config; loads with transformers alone."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    names = {p.name for p in final.iterdir()}
    assert "model.safetensors" in names and not names & {"adapter_config.json", "adapter_model.safetensors"}, names
    config = json.loads((final / "config.json").read_text())
    assert "quantization_config" not in config
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    model = auto.from_pretrained(final)
    assert not hasattr(model, "peft_config") and not getattr(model, "is_loaded_in_4bit", False)
    return model


def _adapter(stage_dir: Path) -> dict:
    files = {p.name for p in (stage_dir / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
    return json.loads((stage_dir / "adapter" / "adapter_config.json").read_text())


# -- plan time ---------------------------------------------------------------------------------------------------
def _resolved(*overrides: str) -> RunSpec:
    from alignctl.config.compose import compose
    from alignctl.config.resolve import resolve

    return resolve(compose(list(overrides)), "/tmp/alignctl-plan")


def test_presets_and_per_stage_overrides_resolve_into_each_stage():
    sft, dpo = _resolved("peft=qlora", "peft.r=8", "stages.sft.peft=lora", "stages.dpo.peft.use_dora=true").stages
    assert sft.peft["method"] == "lora" and sft.peft["r"] == 16  # a preset name: that preset's fields
    assert "bnb_4bit_quant_type" not in sft.peft
    assert dpo.peft["method"] == "qlora" and dpo.peft["r"] == 8 and dpo.peft["use_dora"] is True
    assert dpo.peft["bnb_4bit_quant_type"] == "nf4" and dpo.peft["bnb_4bit_use_double_quant"] is True
    assert dpo.peft["target_modules"] == "all-linear"
    default = _resolved().stages
    assert [s.peft for s in default] == [{"method": "none"}, {"method": "none"}]
    # LoraConfig / BitsAndBytesConfig get exactly these settings.
    config = models.lora_config(dpo.peft)
    assert (config.r, config.lora_alpha, config.use_dora, config.target_modules) == (8, 32, True, "all-linear")
    assert models.lora_config(default[0].peft) is None
    q = models.quantization_kwargs(dpo.peft, "auto")["quantization_config"]
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant


def test_every_peft_field_is_a_peft_or_bitsandbytes_name():
    import inspect

    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    assert set(peft_config.LORA_FIELDS) <= set(LoraConfig.__dataclass_fields__)
    assert set(peft_config.QUANT_FIELDS) <= set(inspect.signature(BitsAndBytesConfig).parameters)
    for preset in ("lora", "qlora"):  # every preset field is documented and known
        lines = (REPO / "configs" / "peft" / f"{preset}.yaml").read_text().splitlines()
        keys = [line.split(":")[0] for line in lines if line and not line.startswith("#")]
        assert set(keys) <= set(peft_config.PEFT_FIELDS)
        for i, line in enumerate(lines):
            if line and not line.startswith("#"):
                assert lines[i - 1].startswith("#"), f"{preset}.yaml: {line} has no comment"


def test_bad_peft_settings_are_named_with_suggestions(capsys):
    rc = main(["plan", "peft=qlora", "peft.lora_alfa=8", "peft.lora_dropout=1.5", "stages.sft.peft=lorra",
               "stages.dpo.peft.bnb_4bit_quant_type=nf5"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "peft: unknown key 'lora_alfa'" in err and "did you mean 'lora_alpha'" in err
    assert "peft.lora_dropout: must be a number in [0, 1)" in err
    assert "stages.sft.peft.method: unknown peft method 'lorra'" in err and "did you mean 'lora'" in err
    assert "stages.dpo.peft.bnb_4bit_quant_type: must be one of nf4, fp4" in err
    rc = main(["plan", "peft=lora", "peft.bnb_4bit_compute_dtype=bf16", "stages.sft.peft.r=4",
               "stages.dpo.peft=none"])
    err = capsys.readouterr().err
    assert rc == 2 and "peft.bnb_4bit_compute_dtype: a 4-bit setting, only used with method qlora" in err
    rc = main(["plan", "stages.sft.peft.r=4"])  # run is full fine-tuning: a LoRA field there does nothing
    assert rc == 2 and "stages.sft.peft.r: has no effect with method none" in capsys.readouterr().err


def test_plan_shows_peft_mode_adapter_and_reference_per_stage(capsys):
    assert main(["plan", "peft=qlora", "stages.sft.peft=none"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    sft, dpo = out.split("[2] dpo")
    assert "none (full fine-tuning)" in sft and "adapter" not in sft
    assert "qlora: LoRA r=16 alpha=32" in dpo and "4-bit nf4 double-quant" in dpo
    assert "<run dir>/dpo/adapter" in dpo and "adapter disabled" in dpo


def test_flash_attention_not_installed_or_not_possible_is_refused_before_loading(capsys, run_recipe, tmp_path):
    from importlib.util import find_spec

    if find_spec("flash_attn") is None:
        assert main(["plan", "model.attn_implementation=flash_attention_2"]) == 2
        assert "flash_attention_2 is asked for but its package `flash_attn` is not installed" in \
            capsys.readouterr().err
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU-only checks below need a machine without CUDA")
    stage = stage_spec("dpo", "dpo", model=ModelSpec("tiny:llama", attn_implementation="flash_attention_2"),
                       precision="auto", peft={"method": "qlora", "bnb_4bit_compute_dtype": "fp16"})
    problems = models.device_problems(stage)
    assert any("flash_attention_2 needs a CUDA GPU" in p for p in problems)
    assert any("stages.dpo.peft.bnb_4bit_compute_dtype: fp16 4-bit kernels need a CUDA GPU" in p for p in problems)
    # At run time: refused before any model is loaded (no stage trained, no final/).
    from alignctl.errors import ConfigError

    with pytest.raises(ConfigError, match="fp16 4-bit kernels need a CUDA GPU"):
        run_recipe(["peft=qlora", "peft.bnb_4bit_compute_dtype=fp16"], tmp_path / "run")
    assert not list((tmp_path / "run").glob("*/final"))


def test_qlora_runs_on_this_machine_without_falling_back():
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert models._bnb_4bit_problem(device) is None  # bitsandbytes' 4-bit backend for this device works


# -- merging -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [{}, {"use_dora": True, "use_rslora": True}], ids=["lora", "dora+rslora"])
def test_qlora_merge_reproduces_the_trained_model_from_dequantised_weights(cache_root, tmp_path, extra):
    import torch
    from peft import get_peft_model

    base = models.materialize("tiny:llama", cache_root / ".cache")
    tok = models.load_tokenizer(base, ModelSpec("tiny:llama"))
    peft = {**_preset("qlora"), "r": 4, "init_lora_weights": False, **extra}  # non-zero adapter
    spec = ModelSpec("tiny:llama", attn_implementation="sdpa")
    torch.manual_seed(0)
    trained = get_peft_model(models.prepare_for_training(models.load_causal_lm(base, spec, "fp32", tok, peft=peft),
                                                         peft, False), models.lora_config(peft))
    assert trained.base_model.model.is_loaded_in_4bit
    ids = torch.tensor([tok("the river is cold .")["input_ids"]])
    trained.eval()
    with torch.no_grad():
        expected = trained(ids).logits
    models.save_adapter(trained, tok, tmp_path / "adapter")
    models.merge_adapter(base, tmp_path / "adapter", tmp_path / "final", spec, "fp32", tok, peft)
    merged = _final_is_plain(tmp_path / "final")
    with torch.no_grad():
        got = merged(ids).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    # Merging into the original full-precision weights instead would not give the model that was trained.
    models.merge_adapter(base, tmp_path / "adapter", tmp_path / "naive", spec, "fp32", tok, {**peft, "method": "lora"})
    with torch.no_grad():
        naive = models.load_causal_lm(str(tmp_path / "naive"), spec, "fp32")(ids).logits
    assert (naive - expected).abs().max() > 10 * (got - expected).abs().max()


def _preset(name: str) -> dict:
    from alignctl.config.peft import preset as _peft_preset

    return _peft_preset(name)


# -- end to end: the default recipe ------------------------------------------------------------------------------
def _run(cache_root: Path, overrides: list[str], run_dir: Path) -> dict:
    """Run a recipe in-process (as conftest's run_recipe, usable from module-scoped fixtures)."""
    from alignctl import pipeline
    from alignctl.config.compose import compose
    from alignctl.config.resolve import resolve

    overrides = [f"output_root={cache_root}", *overrides]
    return pipeline.run(resolve(compose(overrides), run_dir), overrides)


@pytest.fixture(scope="module")
def lora_run(cache_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    return run_dir, _run(cache_root, ["peft=lora"], run_dir)


@pytest.fixture(scope="module")
def qlora_run(cache_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("qlora") / "run"
    return run_dir, _run(cache_root, ["peft=qlora", "model=tiny-qwen2"], run_dir)


@pytest.mark.parametrize("which", ["lora_run", "qlora_run"])
def test_default_recipe_with_adapters_chains_merged_plain_models(which, request):
    import torch
    from safetensors.torch import load_file

    run_dir, m = request.getfixturevalue(which)
    method = which.split("_")[0]
    assert m["status"] == "completed"
    sft, dpo = m["stages"]
    for stage in ("sft", "dpo"):
        model = _final_is_plain(run_dir / stage / "final")
        assert model.config.model_type == ("qwen2" if method == "qlora" else "llama")
        assert next(model.parameters()).dtype == torch.float32  # CPU: fp32, de-quantised under qlora
        assert _adapter(run_dir / stage)["target_modules"]  # the adapter is kept beside final/
    spec = read_spec(run_dir / "dpo" / "spec.json")
    assert spec.peft["method"] == method
    assert spec.links["from"].path == spec.links["ref"].path == str(run_dir.absolute() / "sft" / "final")
    # The DPO adapter was trained on top of the merged SFT model, and was merged into it.
    assert _adapter(run_dir / "dpo")["base_model_name_or_path"] == str(run_dir.absolute() / "sft" / "final")
    sft_w = load_file(str(run_dir / "sft" / "final" / "model.safetensors"))
    dpo_w = load_file(str(run_dir / "dpo" / "final" / "model.safetensors"))
    changed = {k for k in sft_w if not torch.equal(sft_w[k], dpo_w[k])}
    assert changed and all("proj" in k for k in changed)  # LoRA on all linear layers; embeddings untouched
    # Learning still happens: SFT's held-out loss falls, DPO's held-out preference accuracy reaches >= 0.9.
    assert sft["metrics"]["after"]["eval_loss"] < sft["metrics"]["before"]["eval_loss"] - 0.3
    assert dpo["metrics"]["before"]["eval_pref_accuracy"] <= 0.7
    assert dpo["metrics"]["after"]["eval_pref_accuracy"] >= 0.9


def test_dpo_reference_after_lora_sft_is_the_merged_sft_model(lora_run, tmp_path):
    """TRL's reference view of the DPO policy (adapter disabled) gives the merged SFT model's log-probs exactly,
    not the base model's, while the policy itself has moved; no second model copy and no 'ref' adapter exist."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.utils import use_adapter

    from alignctl.evaluate import completion_logps
    from alignctl.train.context import StageContext

    run_dir, _ = lora_run
    spec = read_spec(run_dir / "dpo" / "spec.json")
    spec = spec.replace(entry_dir=str(tmp_path / "dpo"), resume_from=None,
                        args={**spec.args, "max_steps": 4, "learning_rate": 2e-2, "logging_steps": 1})
    ctx = StageContext(spec)
    trainer = DPOTrainer(model=ctx.load_policy(), ref_model=ctx.load_reference(), args=ctx.trl_config(DPOConfig),
                         processing_class=ctx.tokenizer, train_dataset=ctx.train, eval_dataset=ctx.eval,
                         peft_config=ctx.peft_config())
    assert trainer.ref_model is None and "ref" not in trainer.model.peft_config
    trainer.train()

    sft = AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "final")
    base = AutoModelForCausalLM.from_pretrained(models.materialize(spec.model.name_or_path, spec.cache_dir))
    # alignctl's completion log-probs of held-out pairs, with the adapter disabled the way TRL computes its reference
    # (TRL 1.16's compute_ref_log_probs takes only the trainer's own prepared model, so it cannot score `sft` itself).
    prompts, chosen = list(ctx.eval["prompt"][:16]), list(ctx.eval["chosen"][:16])
    with use_adapter(trainer.model, adapter_name=None):
        ref_lp = torch.tensor(completion_logps(trainer.model, ctx.tokenizer, prompts, chosen))
    policy_lp = torch.tensor(completion_logps(trainer.model, ctx.tokenizer, prompts, chosen))
    sft_lp = torch.tensor(completion_logps(sft, ctx.tokenizer, prompts, chosen))
    base_lp = torch.tensor(completion_logps(base, ctx.tokenizer, prompts, chosen))
    assert torch.allclose(ref_lp, sft_lp, atol=1e-3), (ref_lp - sft_lp).abs().max()
    assert (ref_lp - base_lp).abs().max() > 1.0
    assert (policy_lp - ref_lp).abs().max() > 0.05  # the policy did move: the comparison above is not trivial


# -- end to end: RLHF (reward model with a trained score head, PPO) ------------------------------------------------
@pytest.mark.skipif(not (REPO / "recipes" / "rlhf-ppo.yaml").is_file(), reason="recipes/rlhf-ppo.yaml not there yet")
@pytest.mark.parametrize("method,arch", [("lora", "tiny"), ("qlora", "tiny-qwen2")])
def test_rlhf_ppo_with_adapters(method, arch, run_recipe, tmp_path):
    import torch
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    m = run_recipe(["recipe=rlhf-ppo", f"peft={method}", f"model={arch}", "stages.sft.num_train_epochs=2",
                    "stages.ppo.total_episodes=32", "stages.ppo.num_ppo_epochs=2"], run_dir)
    assert m["status"] == "completed" and [s["status"] for s in m["stages"]] == ["completed"] * 5  # an RM ensemble
    _final_is_plain(run_dir / "sft" / "final")
    _final_is_plain(run_dir / "ppo" / "final")
    rm = _final_is_plain(run_dir / "rm" / "final", classifier=True)
    # The reward model's new score head was trained and saved with the adapter (PEFT modules_to_save), then merged.
    assert "score" in (_adapter(run_dir / "rm")["modules_to_save"] or [])
    saved = load_file(str(run_dir / "rm" / "adapter" / "adapter_model.safetensors"))
    head = next(v for k, v in saved.items() if "score" in k and k.endswith("weight"))
    assert torch.equal(rm.score.weight.detach().to(head.dtype), head)
    metrics = m["stages"][1]["metrics"]
    assert metrics["after"]["eval_accuracy"] > metrics["before"]["eval_accuracy"]
    ppo = read_spec(run_dir / "ppo" / "spec.json")
    assert ppo.peft["method"] == method and _adapter(run_dir / "ppo")["base_model_name_or_path"] == \
        str(run_dir.absolute() / "sft" / "final")
