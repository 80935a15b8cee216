"""The RLHF recipes run end to end on the tiny model and synthetic data, and each stage learns what it should:
the reward model ranks warm answers over cold ones, PPO and GRPO/RLOO raise the reward model's score, KTO and
SimPO raise held-out preference accuracy; the outputs load with plain transformers."""

from __future__ import annotations

import json

import pytest

from alignctl import pipeline
from alignctl.config.compose import compose
from alignctl.config.resolve import resolve
from conftest import one_thread_collecting_log, read_spec

pytestmark = pytest.mark.slow

RUNS: dict[str, tuple] = {}
LOG: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def single_thread_and_log():
    with one_thread_collecting_log(LOG):
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_root):
    """Run a recipe once per module (stages shared between recipes, such as SFT, come from the stage store)."""

    def _run(recipe: str, *overrides: str) -> tuple:
        key = " ".join((recipe, *overrides))
        if key not in RUNS:
            run_dir = tmp_path_factory.mktemp(recipe) / "run"
            ov = [f"recipe={recipe}", f"output_root={cache_root}", *overrides]
            manifest = pipeline.run(resolve(compose(ov), run_dir), ov)
            RUNS[key] = (run_dir, manifest)
        return RUNS[key]

    return _run


def stage(manifest: dict, name: str) -> dict:
    s = next(s for s in manifest["stages"] if s["name"] == name)
    assert s["status"] == "completed"
    return s


def test_reward_model_learns_warm_over_cold_and_loads_as_plain_classifier(run):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir, m = run("rlhf-ppo")
    before, after = stage(m, "rm")["metrics"]["before"], stage(m, "rm")["metrics"]["after"]
    # A fresh score head does not separate the pairs (margin ~0); the trained one does.
    assert abs(before["eval_margin"]) < 0.05
    assert after["eval_accuracy"] >= 0.9 and after["eval_accuracy"] > before["eval_accuracy"]
    assert after["eval_margin"] > 1.0

    final = run_dir / "rm" / "final"
    tok = AutoTokenizer.from_pretrained(final)
    rm = AutoModelForSequenceClassification.from_pretrained(final)
    assert rm.config.num_labels == 1 and tok.pad_token is not None and rm.config.pad_token_id == tok.pad_token_id
    prompt = [{"role": "user", "content": "describe the harbor ."}]
    texts = [tok.apply_chat_template(prompt + [{"role": "assistant", "content": f"the harbor is {a} and {b} ."}],
                                     tokenize=False) for a, b in (("sunny", "gentle"), ("grim", "sour"))]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        warm, cold = rm(**batch).logits[:, 0].tolist()
    assert warm > cold


def test_ppo_raises_the_reward_model_score(run):
    run_dir, m = run("rlhf-ppo")
    ppo = stage(m, "ppo")
    assert ppo["from"] == "sft"
    rollouts = ppo["metrics"]["rollouts"]
    assert rollouts["updates"] == 50  # 800 episodes / 16 per batch
    assert rollouts["score_last_quarter"] - rollouts["score_first_quarter"] >= 0.5, rollouts
    before, after = ppo["metrics"]["before"]["eval_rm_score"], ppo["metrics"]["after"]["eval_rm_score"]
    assert after >= before + 1.0, (before, after)
    # Final per-step metrics in the manifest, every step's in the log, under TRL 1.12's names; KL and kl_coef of
    # every step in the manifest (kl_target 3: the coefficient adapts from 0.05); each ensemble member's score.
    train = ppo["metrics"]["train"]
    for key in ("objective/scores", "objective/kl", "objective/kl_coef", "objective/entropy", "loss/policy_avg",
                "loss/value_avg"):
        assert key in train, key
    assert len(rollouts["kl"]) == len(rollouts["kl_coef"]) == 50 and len(set(rollouts["kl_coef"])) > 10
    steps = [line for line in LOG if line.startswith("[ppo] step ")]
    assert len(steps) == 50 and all("objective/scores=" in s and "objective/kl=" in s for s in steps)
    history = json.loads((run_dir / "ppo" / "log_history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 51)) and all(h["objective/entropy"] > 0 for h in history)
    assert all({"ensemble/scores_1", "ensemble/scores_2", "ensemble/std", "audit/scores"} <= set(h) for h in history)
    # Sampled held-out completions with their reward-model scores, before and after.
    rows = [json.loads(line) for line in (run_dir / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert rows and all(r["after"] and set(r["scores"]) == {"before", "after"} for r in rows)
    assert sum(r["scores"]["after"] for r in rows) / len(rows) == pytest.approx(after)


def test_final_ppo_policy_loads_with_plain_transformers_and_generates(run):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, m = run("rlhf-ppo")
    final = m["final_model"]
    assert final == str(run_dir / "ppo" / "final")
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.generation_config.eos_token_id == tok.eos_token_id  # PPO's stop-token setting does not leak
    prompt = tok.apply_chat_template([{"role": "user", "content": "describe the garden ."}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.startswith("the "), text
    # The policy alone (no value head), with weights PPO changed.
    sft = load_file(str(run_dir / "sft" / "final" / "model.safetensors"))
    ppo = load_file(str(run_dir / "ppo" / "final" / "model.safetensors"))
    assert set(ppo) == set(sft)
    assert any(not torch.equal(sft[k], ppo[k]) for k in sft)


def test_kto_on_unpaired_pairs_raises_preference_accuracy(run):
    _, m = run("kto")
    kto = stage(m, "kto")
    before, after = kto["metrics"]["before"], kto["metrics"]["after"]
    assert after["eval_pref_accuracy"] > before["eval_pref_accuracy"] and after["eval_pref_accuracy"] >= 0.9
    assert "eval_rewards/chosen" in after  # TRL's own KTO metrics are kept


def test_simpo_raises_preference_accuracy_without_reference(run):
    run_dir, m = run("simpo")
    simpo = stage(m, "simpo")
    assert simpo["trainer"] == "cpo"
    before, after = simpo["metrics"]["before"], simpo["metrics"]["after"]
    assert after["eval_pref_accuracy"] > before["eval_pref_accuracy"] and after["eval_pref_accuracy"] >= 0.9
    args = read_spec(run_dir / "simpo" / "spec.json").args
    assert args["loss_type"] == "simpo" and args["cpo_alpha"] == 0.0


@pytest.mark.parametrize("trainer", ["grpo", "rloo"])
def test_grpo_and_rloo_raise_the_reward_model_score(run, trainer):
    _, m = run("rlhf-grpo", f"stages.grpo.trainer={trainer}")
    grpo = stage(m, "grpo")
    assert grpo["trainer"] == trainer
    before, after = grpo["metrics"]["before"], grpo["metrics"]["after"]
    # The reward stage's model is the only reward: eval_reward is its mean score, logged under the stage's name.
    assert after["eval_rewards/rm/mean"] == pytest.approx(after["eval_reward"])
    assert after["eval_reward"] > before["eval_reward"] + 0.5, (before["eval_reward"], after["eval_reward"])
    # The reward-hacking monitors read TRL's logs (every logging step: 40 steps / 5).
    mon = grpo["metrics"]["monitors"]
    assert {"reward_mean", "reward_std", "length", "truncated"} <= set(mon["series"])
    assert "length_corr" not in mon["series"]  # TRL logs no reward-length correlation
    assert [p[0] for p in mon["series"]["length"]] == [5, 10, 15, 20, 25, 30, 35, 40]


def test_a_grpo_audit_is_scored_with_weight_zero_and_judges_the_win_rates(run):
    """audit: a reward model outside the recipe (rlhf-ppo's rm_audit, another seed): TRL scores and logs it beside the
    reward with weight 0, so the training reward is rm's alone; the audit_drop monitor reads it; the held-out win
    rates are judged by it."""
    ppo_dir, _ = run("rlhf-ppo")
    audit = ppo_dir / "rm_audit" / "final"
    _, m = run("rlhf-grpo", f"+stages.grpo.audit={audit}", "stages.grpo.max_steps=10")
    grpo = stage(m, "grpo")
    after = grpo["metrics"]["after"]
    assert after["eval_reward"] == pytest.approx(after["eval_rewards/rm/mean"])  # weight 0: not in the reward
    assert "eval_rewards/audit/mean" in after and after["eval_rewards/audit/mean"] != after["eval_reward"]
    assert [p[0] for p in grpo["metrics"]["monitors"]["series"]["audit_mean"]] == [5, 10]
    assert str(grpo["metrics"]["eval"]["reward"]).endswith("rm_audit/final") and "eval_win_rate" in after


def test_grpo_kl_target_adapts_beta_at_every_logging_step(run):
    """kl_target 0.02 per token from beta 0.04: at each logging step (every 5 of 20 steps) beta follows Ziegler et al.'s
    rule on the interval's KL, with the default horizon of a twentieth of the run (1 step); TRL's loss reads it."""
    run_dir, _ = run("rlhf-grpo", "+stages.grpo.kl_target=0.02", "stages.grpo.max_steps=20")
    rows = [h for h in json.loads((run_dir / "grpo" / "log_history.json").read_text()) if "beta" in h]
    assert [h["step"] for h in rows] == [5, 10, 15, 20]
    beta = 0.04
    for h in rows:
        beta *= 1 + min(max(h["kl"] / 0.02 - 1, -0.2), 0.2) * 5 / 1.0
        assert h["beta"] == pytest.approx(beta, rel=1e-4)
    assert len({round(h["beta"], 8) for h in rows}) == 4 and rows[-1]["beta"] != 0.04


def test_a_stop_when_monitor_stops_a_trl_trainer(run):
    """GRPO with `truncated: 0` as a stop rule: at the first logging step where any answer hit
    max_completion_length, the TrainerCallback ends training; the stage completes with the weights of that step."""
    _, m = run("rlhf-grpo", "+stages.grpo.monitors.truncated=0", "+stages.grpo.monitors.stop_when=[truncated]",
               "stages.grpo.max_steps=20")
    grpo = stage(m, "grpo")
    mon = grpo["metrics"]["monitors"]
    step = mon["stopped"]["step"]
    assert mon["stopped"]["monitor"] == "truncated" and step < 20 and step % 5 == 0
    assert mon["events"][0] == {**mon["events"][0], "monitor": "truncated", "step": step}
    assert [p[0] for p in mon["series"]["truncated"]][-1] == step  # nothing trained after it
    assert any(f"[grpo] monitor truncated at update {step}" in line for line in LOG)


def test_kto_on_natively_unpaired_data_separates_desirable_from_undesirable(run):
    _, m = run("kto", "stages.kto.data=unpaired")
    kto = stage(m, "kto")
    before, after = kto["metrics"]["before"], kto["metrics"]["after"]
    # Held-out rows are unpaired: no preference accuracy, TRL's KTO metrics instead. Policy and reference coincide
    # before training (implicit rewards 0); after it, desirable answers get a higher implicit reward.
    assert "eval_pref_accuracy" not in after
    assert before["eval_rewards/chosen"] == pytest.approx(0, abs=1e-4)
    assert after["eval_rewards/chosen"] > after["eval_rewards/rejected"] + 0.5, after
