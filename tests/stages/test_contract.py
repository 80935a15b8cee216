"""The stage-kind contract, for every kind of the registry (alignctl.stages.STAGES), from what the kind declares:
a tiny recipe built from its fields plans, runs (1-2 steps, a small evaluation), yields its declared output (a
loadable final/ model, or its data files), reports its headline metric in the manifest, and, if it is resumable, is
reused by a second identical run. No kind is named here: a new kind is checked by registering it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from alignctl.cli import main
from alignctl.config import links, trl_fields
from alignctl.metrics import headline
from alignctl.stages import STAGES, StageKind
from conftest import one_thread_collecting_log

# The built-in synthetic data set holding each data kind (configs/data/synthetic.yaml).
DATA = {"sft": "sft", "preference": "prefs", "prompt": "prompts", "unpaired": "unpaired"}
# Tiny settings, by field name: each is set where the kind's config class has the field (1-2 steps, short answers).
TINY = {"max_steps": 2, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
        "gradient_accumulation_steps": 1, "max_length": 64, "max_completion_length": 8, "num_generations": 2,
        "response_length": 8, "total_episodes": 8, "num_ppo_epochs": 1, "local_rollout_forward_batch_size": 4,
        "save_strategy": "no", "logging_steps": 1, "activation_checkpointing": False,
        "k": 2, "num_prompts": 4, "max_new_tokens": 8}
EVAL = ["eval.max_prompts=2", "eval.max_new_tokens=4"]


def _policy_kind() -> StageKind:
    """The kind that trains a language model on plain conversations and links nothing (what other kinds start
    from and compare to)."""
    return next(k for k in STAGES.values() if k.data_kind == "sft" and k.output == links.CAUSAL_LM and not k.links)


def _classifier_kind() -> StageKind:
    return next(k for k in STAGES.values() if k.output == links.CLASSIFIER and not k.links)


def _stage(kind: StageKind, **linked) -> dict:
    fields = trl_fields.fields(kind.config_class)
    return {"trainer": kind.name, "data": DATA[kind.data_kind], **linked,
            **{k: v for k, v in TINY.items() if k in fields}}


def recipe(kind: StageKind) -> dict:
    """The kind as the last stage ("subject"), after the stages its links point at: a language-model stage
    ("policy": also its `from`) when a link takes a language model, a classifier stage ("scorer") for the first
    link that takes a classifier and another ("scorer2") for the others (an audit must be another model than the
    reward it audits)."""
    classifiers = [name for name in kind.links if links.BY_NAME[name].points_at == links.CLASSIFIER]
    stages, linked = {}, {}
    if len(classifiers) < len(kind.links):
        stages["policy"] = _stage(_policy_kind())
        linked["from"] = "policy"
    for n in range(min(2, len(classifiers))):
        stages["scorer" if n == 0 else "scorer2"] = _stage(_classifier_kind(), seed=n)
    for name in kind.links:
        linked[name] = "policy" if name not in classifiers else "scorer" if name == classifiers[0] else "scorer2"
    stages["subject"] = _stage(kind, **linked)
    return {"name": "contract", "description": f"the contract of {kind.name}", "stages": stages}


def _yields_its_output(kind: StageKind, final: Path) -> None:
    assert final.is_dir(), f"{kind.name}: no final/"
    if kind.output == "data":
        files = sorted(final.glob("*.jsonl"))
        rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
        assert files and rows and all(isinstance(r, dict) for r in rows), f"{kind.name}: no data rows in {final}"
        return
    import transformers

    auto = transformers.AutoModelForCausalLM if kind.output == links.CAUSAL_LM \
        else transformers.AutoModelForSequenceClassification
    model = auto.from_pretrained(str(final))
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.fixture(scope="module", autouse=True)
def _offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_stage_kind_keeps_the_contract(name, run_recipe, cache_root, tmp_path, capsys):
    kind = STAGES[name]
    path = tmp_path / "contract.yaml"
    path.write_text(yaml.safe_dump(recipe(kind), sort_keys=False))

    assert main(["plan", f"recipe={path}", f"output_root={cache_root}", *EVAL]) == 0, capsys.readouterr().err
    assert f"] subject  trainer: {name} (" in capsys.readouterr().out

    lines: list[str] = []
    with one_thread_collecting_log(lines):
        manifest = run_recipe([f"recipe={path}", *EVAL], tmp_path / "run")
    subject = next(s for s in manifest["stages"] if s["name"] == "subject")
    assert manifest["status"] == "completed" and subject["status"] == "completed"
    _yields_its_output(kind, tmp_path / "run" / "subject" / "final")

    if getattr(kind, "resumable", True):  # until StageKind declares it (the train helper adds the field)
        with one_thread_collecting_log(lines):
            again = run_recipe([f"recipe={path}", *EVAL], tmp_path / "again")
        assert all(s["reused_from"] for s in again["stages"]), [(s["name"], s["reused_from"]) for s in again["stages"]]
        _yields_its_output(kind, tmp_path / "again" / "subject" / "final")

    head = headline(subject)
    assert head in (subject.get("metrics") or {}).get("after", {}), f"{name}: headline {head} missing from the manifest"
