"""The embedded default recipe, end to end through the real CLI: SFT -> DPO that really learns; the console of the
run (one line per stage's training, alignctl's own lines, the summary table last; per-step metrics, library warnings
and progress bars only in alignctl.log)."""

from __future__ import annotations

import re

import pytest

from conftest import read_manifest, read_spec, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("default")
    run_dir = work / "run"
    proc = run_cli(["run", f"hydra.run.dir={run_dir}", f"output_root={work}/outputs"], cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc


def test_both_stages_complete_and_dpo_learns(default_run):
    run_dir, proc = default_run
    m = read_manifest(run_dir)
    assert m["status"] == "completed"
    assert [(s["name"], s["trainer"], s["status"]) for s in m["stages"]] == [
        ("sft", "sft", "completed"), ("dpo", "dpo", "completed")]
    sft, dpo = m["stages"]
    # SFT: held-out loss falls.
    assert sft["metrics"]["after"]["eval_loss"] < sft["metrics"]["before"]["eval_loss"] - 1.0
    # DPO: held-out preference accuracy from about chance to >= 0.9; TRL's own metric names are there too.
    before, after = dpo["metrics"]["before"], dpo["metrics"]["after"]
    assert 0.3 <= before["eval_pref_accuracy"] <= 0.7
    assert after["eval_pref_accuracy"] >= 0.9
    assert after["eval_rewards/accuracies"] >= 0.9 and after["eval_rewards/margins"] > 0
    assert "train_loss" in dpo["metrics"]["train"]
    # The summary table is printed at the end.
    assert "eval_pref_accuracy" in proc.stdout and "completed" in proc.stdout


def test_manifest_fields_and_outputs(default_run):
    run_dir, _ = default_run
    m = read_manifest(run_dir)
    assert m["recipe"] == "default"
    assert m["final_model"] == str(run_dir.absolute() / "dpo" / "final")
    assert set(m["versions"]) >= {"python", "torch", "transformers", "trl", "peft", "alignctl"}
    assert all(m["versions"][k] for k in ("python", "torch", "transformers", "trl", "peft", "alignctl"))
    assert (run_dir / "config.yaml").is_file() and (run_dir / "alignctl.log").is_file()
    for stage in ("sft", "dpo"):
        spec = read_spec(run_dir / stage / "spec.json")
        # The stage trained in its store entry (named by its fingerprint); final/ is linked into the run dir.
        assert spec.name == stage and "/.store/" in spec.entry_dir and spec.fingerprint[:16] in spec.entry_dir
    # The DPO stage started from (and referenced) the SFT stage's final weights.
    dpo_spec = read_spec(run_dir / "dpo" / "spec.json")
    assert dpo_spec.links["from"].path == dpo_spec.links["ref"].path == str(run_dir.absolute() / "sft" / "final")
    # Per-step training metrics reach the run log.
    assert "[dpo] step" in (run_dir / "alignctl.log").read_text()
    # Where the time and memory went: the orchestrator's phases, each stage's lifecycle phases and store steps.
    assert {"pre-flight", "fingerprint"} <= set(m["phases"]) and m["phases"]["pre-flight"]["seconds"] > 0
    for s in m["stages"]:
        phases = s["metrics"]["phases"]
        assert {"context", "prepare", "model load", "evaluate before", "train", "evaluate after", "save"} <= set(phases)
        assert all(p["peak_rss_mb"] > 100 for p in phases.values())  # the process's own resident memory, in MiB
        assert 0 < sum(p["seconds"] for p in phases.values()) <= s["seconds"] + 0.05  # seconds: rounded to 0.1
        assert phases["train"]["seconds"] >= 0.5 * s["metrics"]["train"]["train_runtime"]
        assert set(s["store_seconds"]) == {"verify", "place"}


def test_final_model_loads_with_plain_transformers_and_generates(default_run):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = default_run
    final = read_manifest(run_dir)["final_model"]
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert tok.chat_template and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "describe the river ."}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    # The answer format SFT taught ("the <thing> is <adjective> and <adjective> ."). DPO gets no gradient on the
    # first token, shared by chosen and rejected, and it drifts: greedy decoding may drop the leading "the".
    assert re.fullmatch(r"(the )?\w+ is \w+ and \w+ \.", text.strip()), text
    # DPO changed the SFT weights.
    sft = load_file(str(run_dir / "sft" / "final" / "model.safetensors"))
    dpo = load_file(str(run_dir / "dpo" / "final" / "model.safetensors"))
    assert any(not torch.equal(sft[k], dpo[k]) for k in sft)


def test_files_holding_the_configuration_are_the_owners_only(default_run):
    """config.yaml, manifest.json (overrides) and every spec.json (resolved settings, paths) are 0600."""
    import stat

    run_dir, _ = default_run
    for f in [run_dir / "config.yaml", run_dir / "manifest.json", *run_dir.glob("*/spec.json")]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert len(list(run_dir.glob("*/spec.json"))) == 2


def test_default_run_fits_one_screen(default_run):
    run_dir, proc = default_run
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    text = "\n".join(lines)
    # No library progress bars or warnings, no per-step metric dictionaries.
    for noise in ("Map:", "it/s]", "UserWarning", "FutureWarning", "bitsandbytes", "[sft] step", "[dpo] step"):
        assert noise not in text, noise
    # One line per stage's training with its loss and key metric; the evaluation line; the summary table last.
    assert any(line.startswith("[sft] trained 144/144 steps") and "loss" in line for line in lines), text
    assert any(line.startswith("[dpo] trained 72/72 steps") and "rewards/accuracies" in line for line in lines), text
    assert any(line.startswith("[dpo] held-out answers (32 prompts") and "KL" in line for line in lines), text
    assert lines[-1].startswith("manifest: ") and any("eval_pref_accuracy_norm" in line for line in lines[-8:])


def test_the_run_log_keeps_what_the_console_leaves_out(default_run):
    run_dir, _ = default_run
    log = (run_dir / "alignctl.log").read_text()
    assert "[sft] step 10: loss=" in log and "[dpo] step 72: " in log  # every logging step's metrics
    assert "py.warnings" in log and "UserWarning" in log  # library warnings are kept


def test_default_run_manifest_shows_kl_and_both_accuracies(default_run):
    dpo = read_manifest(default_run[0])["stages"][1]["metrics"]
    assert dpo["before"]["eval_kl"] == 0 and dpo["after"]["eval_kl"] > 0
    for key in ("eval_pref_accuracy", "eval_pref_accuracy_norm", "eval_rewards/accuracies"):
        assert dpo["after"][key] >= 0.9, key
    assert "eval_win_rate" not in dpo["after"]  # no reward model in the default recipe
