"""Held-out evaluation of policy stages (alignctl.evaluate): win rate scored by a reward model, KL to the reference,
length-normalised preference accuracy; `alignctl eval` reproduces a run's after-metrics; `alignctl generate`."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from alignctl import evaluate, synthetic

pytestmark = pytest.mark.slow

# SFT -> reward model -> DPO on the built-in data: the DPO stage is scored by the recipe's reward model.
RM_DPO = """\
name: rm-dpo
description: "tiny SFT -> reward model -> DPO; DPO's answers scored by the reward model"
stages:
  sft: {trainer: sft, data: sft, learning_rate: 3.0e-3, num_train_epochs: 4, per_device_train_batch_size: 16,
        per_device_eval_batch_size: 32, lr_scheduler_type: cosine, warmup_steps: 0.05, save_strategy: "no",
        activation_checkpointing: false}
  rm: {trainer: reward, from: sft, data: prefs, learning_rate: 1.0e-3, num_train_epochs: 1,
       per_device_train_batch_size: 16, per_device_eval_batch_size: 32, save_strategy: "no",
       activation_checkpointing: false}
  dpo: {trainer: dpo, from: sft, data: prefs, beta: 0.1, learning_rate: 1.0e-3, num_train_epochs: 2,
        per_device_train_batch_size: 16, per_device_eval_batch_size: 32, save_strategy: "no",
        activation_checkpointing: false}
"""


def _run(cache_root: Path, run_dir: Path, overrides: list[str]) -> dict:
    from alignctl import pipeline
    from alignctl.config.compose import compose
    from alignctl.config.resolve import resolve

    overrides = [f"output_root={cache_root}", f"store={run_dir.parent / 'store'}", *overrides]
    return pipeline.run(resolve(compose(overrides), run_dir), overrides)


@pytest.fixture(scope="module")
def rm_dpo(cache_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("rm-dpo")
    recipe = work / "rm-dpo.yaml"
    recipe.write_text(RM_DPO)
    run_dir = work / "run"
    return run_dir, _run(cache_root, run_dir, [f"recipe={recipe}"])


def _stage(m: dict, name: str) -> dict:
    return next(s for s in m["stages"] if s["name"] == name)


def test_dpo_is_scored_by_the_recipes_reward_model(rm_dpo):
    run_dir, m = rm_dpo
    dpo = _stage(m, "dpo")["metrics"]
    before, after, info = dpo["before"], dpo["after"], dpo["eval"]
    assert info["reward"] == "rm" and info["prompts"] == 32
    # KL to the reference (the SFT model): exactly 0 before training, positive after.
    assert before["eval_kl"] == 0.0 and before["eval_kl_seq"] == 0.0
    assert after["eval_kl"] > 0 and after["eval_kl_seq"] > 0
    # DPO learned warm > cold; the reward model (trained on the same preference) prefers its answers.
    assert after["eval_win_rate"] > 0.5, after
    assert after["eval_win_rate_low"] < after["eval_win_rate"] < after["eval_win_rate_high"]
    assert after["eval_reward_mean"] > before["eval_reward_mean"]
    assert after["eval_win_rate_ref"] == after["eval_win_rate"]  # the reference is DPO's initial weights
    # Both preference accuracies and TRL's implicit-reward accuracy.
    assert after["eval_pref_accuracy_norm"] >= 0.9 and after["eval_pref_accuracy"] >= 0.9
    assert after["eval_rewards/accuracies"] >= 0.9 and before["eval_rewards/accuracies"] == 0
    # Samples: one row per prompt, before and after answers, their scores and KL.
    rows = [json.loads(line) for line in (run_dir / "dpo" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and all(set(r) >= {"prompt", "before", "after", "scores", "kl"} for r in rows)
    assert sum(r["scores"]["after"] for r in rows) / 32 == pytest.approx(after["eval_reward_mean"])
    assert all(r["kl"]["before"] == 0 for r in rows)
    # The SFT stage: no reward model before it, so KL and samples only; the reward stage is not a policy.
    sft, rm = _stage(m, "sft")["metrics"], _stage(m, "rm")["metrics"]
    assert sft["before"]["eval_kl"] == 0 and sft["after"]["eval_kl"] > 0 and "eval_win_rate" not in sft["after"]
    assert "eval_kl" not in rm["after"]


def test_report_shows_histograms_kl_win_rate_and_answers(rm_dpo):
    from alignctl.metrics import headline, objective

    run_dir, m = rm_dpo
    text = (run_dir / "report.md").read_text()
    assert "## Held-out evaluation" in text and "![dpo rewards](dpo/rewards.png)" in text
    assert (run_dir / "dpo" / "rewards.png").stat().st_size > 1000
    assert "win rate after vs before" in text and "KL to reference per token" in text
    section = text.split("### dpo (dpo)")[1]
    assert len([line for line in section.splitlines() if line.startswith("| ") and " → " in line]) == 4  # head + 3
    # With a reward model the headline is the win rate; sweep.objective picks any metric.
    assert headline(_stage(m, "dpo")) == "eval_win_rate"
    assert objective(m) == _stage(m, "dpo")["metrics"]["after"]["eval_win_rate"]
    assert objective(m, "eval_kl") == _stage(m, "dpo")["metrics"]["after"]["eval_kl"]
    assert objective(m, "sft:eval_loss") == _stage(m, "sft")["metrics"]["after"]["eval_loss"]


def test_alignctl_eval_reproduces_the_runs_after_metrics(rm_dpo, tmp_path):
    from alignctl.cli import main

    run_dir, m = rm_dpo
    out = tmp_path / "eval"
    assert main(["eval", str(run_dir), "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert set(result["stages"]) == {"sft", "dpo"}
    for name in ("sft", "dpo"):
        run_after = _stage(m, name)["metrics"]["after"]
        again = result["stages"][name]["after"]
        keys = [k for k in again if k in run_after]
        assert {"eval_kl", "eval_kl_seq"} <= set(keys)
        for k in keys:
            assert again[k] == pytest.approx(run_after[k], rel=1e-4, abs=1e-5), k
    assert {"eval_win_rate", "eval_reward_mean", "eval_pref_accuracy_norm"} <= set(result["stages"]["dpo"]["after"])
    assert (out / "dpo.rewards.png").is_file() and (out / "dpo.samples.jsonl").is_file()


def test_alignctl_generate_prints_an_answer(rm_dpo, capsys):
    from alignctl.cli import main

    run_dir, _ = rm_dpo
    assert main(["generate", str(run_dir / "sft" / "final"), "--prompt", "describe the river .",
                 "--max-new-tokens", "16"]) == 0
    answer = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"the \w+ is \w+ and \w+ \.", answer), answer


def _hh_style_pairs(path: Path, n: int) -> None:
    """Pairs from the synthetic world where the chosen answer is long (two warm clauses) and the rejected one short
    (one cold word), as in Anthropic HH: summed log-probabilities favour the short rejected answer."""
    rng = random.Random("hh-style")
    with open(path, "w") as f:
        for _ in range(n):
            thing = rng.choice(synthetic.THINGS)
            ask = rng.choice(synthetic.ASKS).format(t=thing)
            a, b, c, d = rng.sample(synthetic.WARM, 4)
            chosen = f"the {thing} is {a} and {b} . the {thing} is {c} and {d} ."
            rejected = f"the {thing} is {rng.choice(synthetic.COLD)} ."
            f.write(json.dumps({"prompt": [{"role": "user", "content": ask}],
                                "chosen": [{"role": "assistant", "content": chosen}],
                                "rejected": [{"role": "assistant", "content": rejected}]}) + "\n")


def test_length_normalised_accuracy_moves_with_trls_accuracy_when_rejected_is_shorter(cache_root, tmp_path):
    pairs = tmp_path / "hh-style.jsonl"
    _hh_style_pairs(pairs, 352)
    m = _run(cache_root, tmp_path / "run", [
        "stages.sft.num_train_epochs=1", "stages.sft.max_steps=1", "data.prefs.eval_size=32",
        f"data.prefs.path={pairs}", "stages.dpo.num_train_epochs=1", "stages.dpo.learning_rate=2e-3",
        "eval.enabled=false"])
    dpo = _stage(m, "dpo")["metrics"]
    before, after = dpo["before"], dpo["after"]
    # TRL's implicit reward learns the preference; the length-normalised accuracy follows it ...
    assert after["eval_rewards/accuracies"] >= 0.9, after
    assert after["eval_pref_accuracy_norm"] >= 0.9 and after["eval_pref_accuracy_norm"] > \
        before["eval_pref_accuracy_norm"] + 0.3, (before, after)
    # ... while the summed accuracy starts far below it: the long chosen answers cost more log-probability.
    assert before["eval_pref_accuracy"] < before["eval_pref_accuracy_norm"]
    assert after["eval_pref_accuracy"] < after["eval_pref_accuracy_norm"]  # and stays there: the headline is norm
    assert "eval_kl" not in after  # eval.enabled=false: no samples
    assert not (tmp_path / "run" / "dpo" / "samples.jsonl").exists()


def test_wilson_interval_and_win_rate_ties_count_half():
    lo, hi = evaluate.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    w = evaluate.win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 1.0, 1.0])  # win, tie, win, loss
    assert w["rate"] == pytest.approx(2.5 / 4) and w["low"] < 2.5 / 4 < w["high"]


@pytest.mark.parametrize("override, message", [
    ("eval.max_promts=8", "eval: unknown key 'max_promts' (did you mean 'max_prompts'"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens: must be a whole number from 1"),
    ("eval.temperature=-1", "eval.temperature: must be a number from 0"),
    ("eval.prompts=promts", "eval.prompts: no data set named 'promts' (did you mean 'prompts'?)"),
    ("eval.reward=sft", "eval.reward: 'sft' is a sft stage, not a reward stage"),
    ("sweep.objective=3", "sweep.objective: must be a metric name"),
])
def test_eval_settings_are_checked_before_anything_runs(override, message, capsys):
    from alignctl.cli import main

    assert main(["plan", override]) == 2
    assert message in capsys.readouterr().err


def test_sweep_report_plots_win_rate_and_kl_against_the_swept_value(rm_dpo, tmp_path):
    from alignctl import report

    _, m = rm_dpo
    for i, beta in enumerate(("0.05", "0.5", "5.0")):  # the run's manifest as three points of a beta sweep
        point = json.loads(json.dumps(m))
        point["run_dir"], point["overrides"] = str(tmp_path / str(i)), [f"stages.dpo.beta={beta}"]
        dpo = _stage(point, "dpo")["metrics"]["after"]
        dpo["eval_win_rate"], dpo["eval_kl"] = 0.5 + 0.1 * i, 0.01 * 10 ** i
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "manifest.json").write_text(json.dumps(point))
    out, plot, rows = report.sweep_report(tmp_path)
    assert [r["dpo:eval_win_rate"] for r in rows] == pytest.approx([0.5, 0.6, 0.7])
    assert [r["dpo:eval_kl"] for r in rows] == pytest.approx([0.01, 0.1, 1.0])
    text = out.read_text()
    assert "dpo:eval_win_rate" in text and "dpo:eval_kl" in text and "![sweep](sweep.png)" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
