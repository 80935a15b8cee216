"""Model loading: default chat template for template-less bases, eos/pad travel, two architectures, secrets."""

from __future__ import annotations

from alignctl import models
from alignctl.config.redact import redact
from alignctl.templates import DEFAULT_CHAT_TEMPLATE


def test_base_without_chat_template_gets_default_at_sft_and_it_travels(run_recipe, tmp_path, cache_root):
    # A Qwen2-architecture base model whose tokenizer has no chat template and no pad token.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    built = models.materialize("tiny:qwen2", cache_root / ".cache")
    base = tmp_path / "bare-base"
    tok = AutoTokenizer.from_pretrained(built)
    tok.chat_template = None
    tok.pad_token = None
    tok.save_pretrained(base)
    AutoModelForCausalLM.from_pretrained(built).save_pretrained(base)
    assert not AutoTokenizer.from_pretrained(base).chat_template

    m = run_recipe([f"model.name_or_path={base}", "stages.sft.num_train_epochs=1", "stages.dpo.num_train_epochs=1"],
                   tmp_path / "run")
    assert m["status"] == "completed"
    for stage in ("sft", "dpo"):
        final = tmp_path / "run" / stage / "final"
        t = AutoTokenizer.from_pretrained(final)
        assert t.chat_template == DEFAULT_CHAT_TEMPLATE
        assert t.pad_token is not None
        cfg = AutoModelForCausalLM.from_pretrained(final).config
        assert cfg.model_type == "qwen2" and cfg.eos_token_id == t.eos_token_id and cfg.pad_token_id == t.pad_token_id
    text = t.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                 tokenize=False)
    assert text == f"<|user|>\nhi{t.eos_token}\n<|assistant|>\nyo{t.eos_token}"


def test_redaction_of_secrets():
    assert redact(["stages.sft.learning_rate=1", "+wandb_api_key=abc", "model.hub_token=xyz"]) == [
        "stages.sft.learning_rate=1", "+wandb_api_key=***", "model.hub_token=***"]
    assert redact({"a": {"token": "x", "n": 1}}) == {"a": {"token": "***", "n": 1}}
