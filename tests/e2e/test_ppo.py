"""alignctl's own PPO (alignctl.rl): the pieces of the algorithm on hand-checked numbers; the adaptive KL controller
holds KL near its target where a fixed small kl_coef lets it run past, target_kl cuts an update's epochs, kl_stop ends
the stage, the monitors flag a planted length-hacking reward while the audit falls, a reward ensemble trains on its
members' worst case; an interrupted PPO stage resumes from its newest checkpoint (step, optimiser, kl_coef and logs
carried over); PPO over torchrun x2 (DDP, gloo on CPU)."""

from __future__ import annotations

import json

import pytest

from alignctl import pipeline
from alignctl.config.compose import compose
from alignctl.config.resolve import resolve
from conftest import one_thread_collecting_log, read_spec

pytestmark = pytest.mark.slow

LOG: list[str] = []
RUNS: dict[str, tuple] = {}


@pytest.fixture(scope="module", autouse=True)
def single_thread_and_log():
    with one_thread_collecting_log(LOG):
        yield


def _run(cache_root, run_dir, *overrides: str) -> dict:
    """rlhf-ppo in-process; SFT and the reward model come from the session's store (test_rlhf trains them too)."""
    ov = ["recipe=rlhf-ppo", f"output_root={cache_root}", *overrides]
    return pipeline.run(resolve(compose(ov), run_dir), ov)


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_root):
    def _once(*overrides: str) -> tuple:
        key = " ".join(overrides)
        if key not in RUNS:
            run_dir = tmp_path_factory.mktemp("ppo") / "run"
            RUNS[key] = (run_dir, _run(cache_root, run_dir, *overrides))
        return RUNS[key]

    return _once


def _ppo(manifest: dict) -> dict:
    s = next(s for s in manifest["stages"] if s["name"] == "ppo")
    assert s["status"] == "completed"
    return s


# -- the algorithm's pieces --------------------------------------------------------------------------------------
def test_gae_kl_estimators_and_adaptive_controller_on_hand_computed_numbers():
    import torch

    from alignctl.rl import kl as klmod
    from alignctl.rl import ppo_core as core

    # One answer of 3 tokens (a 4th position is padding): score 1 at the last token, KL penalty per token.
    kl = torch.tensor([[0.5, -0.5, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 0.3, 7.0]])
    rewards, non_score, adv, ret = core.rewards_and_advantages(
        torch.tensor([1.0]), kl * mask, values, mask, torch.tensor([3]), kl_coef=0.1, gamma=0.9, lam=0.5,
        whiten_rewards=False)
    assert rewards.tolist()[0] == pytest.approx([-0.05, 0.05, 0.9, 0.0])
    # GAE by hand: delta_t = r_t + gamma v_{t+1} - v_t (v after the answer is 0), A_t = delta_t + gamma lam A_{t+1}
    d = [-0.05 + 0.9 * 0.2 - 0.1, 0.05 + 0.9 * 0.3 - 0.2, 0.9 - 0.3]
    a2 = d[2]
    a1 = d[1] + 0.45 * a2
    a0 = d[0] + 0.45 * a1
    assert (ret[0, :3] - values[0, :3]).tolist() == pytest.approx([a0, a1, a2])
    raw = torch.tensor([a0, a1, a2])
    assert adv[0, :3].tolist() == pytest.approx(((raw - raw.mean()) / raw.std(unbiased=False)).tolist(), abs=1e-4)
    assert adv[0, 3] == 0

    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert klmod.kl_per_token(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    r = (ref - logp).exp()
    assert klmod.kl_per_token(logp, ref, "k3").tolist() == pytest.approx((r - 1 - r.log()).tolist())
    assert (klmod.kl_per_token(logp, ref, "k3") >= 0).all()

    ctl = klmod.AdaptiveKL(0.1, target=2.0, horizon=100)
    ctl.update(8.0, n_steps=10)  # KL 4x the target: the error is clipped at +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl.update(1.8, n_steps=10)  # 10 % under: -0.1
    assert ctl.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 10 / 100))
    fixed = klmod.FixedKL(0.05)
    fixed.update(100.0, 16)
    assert fixed.value == 0.05


# -- KL held: the adaptive controller, target_kl, kl_stop ----------------------------------------------------------
# Seed 1 for both runs (PPO on a ~70k-parameter model is seed-sensitive), 320 episodes = 20 updates of 16: with the
# recipe's fixed kl_coef 0.05 the KL of the last quarter reaches ~6.5 nats per answer (6.5, 5.4, 4.2 over seeds 1-3).
# The controller's horizon is left at its default, a twentieth of the run (16 episodes, one update).
TARGET = 2.0
# the settings these tests were calibrated on: one reward model, lr 3e-3, a fixed kl_coef 0.05, 20 updates (the shipped
# recipe trains on an ensemble at lr 1e-3 with kl_target 3 for 50 updates: benchmarks/ppo_seeds.py measures it)
FIXED = ("stages.ppo.seed=1", "stages.ppo.total_episodes=320", "stages.ppo.reward=rm", "stages.ppo.learning_rate=3e-3",
         "stages.ppo.kl_target=null")
ADAPTIVE = (*FIXED, f"stages.ppo.kl_target={TARGET}", "stages.ppo.kl_coef=0.3")


def test_adaptive_kl_holds_kl_near_the_target_where_a_fixed_small_coefficient_exceeds_it(run):
    _, fixed = run(*FIXED)
    run_dir, adaptive = run(*ADAPTIVE)
    fixed_r, adaptive_r = _ppo(fixed)["metrics"]["rollouts"], _ppo(adaptive)["metrics"]["rollouts"]
    assert fixed_r["updates"] == adaptive_r["updates"] == 20
    assert fixed_r["kl_last_quarter"] > 2 * TARGET, fixed_r  # kl_coef 0.05 throughout: nothing holds KL
    assert abs(adaptive_r["kl_last_quarter"] - TARGET) <= 0.5 * TARGET, adaptive_r
    # kl_coef per step follows Ziegler et al.'s rule on the logged KL (16 episodes per update, horizon 16).
    assert adaptive_r["kl_horizon_episodes"] == 16
    coef, kls = [0.3] + adaptive_r["kl_coef"], adaptive_r["kl"]
    for i, k in enumerate(kls):
        assert coef[i + 1] == pytest.approx(coef[i] * (1 + min(max(k / TARGET - 1, -0.2), 0.2) * 16 / 16), rel=1e-3)
    assert max(coef) > 0.6  # it rose to hold KL down
    ppo = _ppo(adaptive)
    assert ppo["metrics"]["after"]["eval_rm_score"] > ppo["metrics"]["before"]["eval_rm_score"]
    # The run log shows KL and kl_coef per step; the report plots them and shows the monitors.
    steps = [line for line in LOG if line.startswith("[ppo] step ") and "objective/kl_coef=" in line]
    assert len(steps) >= 20
    report = (run_dir / "report.md").read_text()
    assert (run_dir / "ppo" / "curves.png").is_file() and "ppo/curves.png" in report
    assert "## Reward-hacking monitors" in report and "| length_corr | length_corr |" in report
    assert "length-controlled win rate" in report
    mon = ppo["metrics"]["monitors"]
    assert mon["thresholds"]["length_corr"] == 0.7 and len(mon["series"]["audit_mean"]) == 20
    after = ppo["metrics"]["after"]
    assert after["eval_win_rate_lc_low"] <= after["eval_win_rate_lc"] <= after["eval_win_rate_lc_high"]
    assert ppo["metrics"]["eval"]["reward"] == "rm_audit"  # judged by the audit, not the optimised RM


def test_target_kl_stops_an_updates_epochs_early_and_logs_it(run):
    """target_kl 0.02: the first update's policy moves far from its rollouts after one step (approx KL ~3.6 with
    lr 3e-3), so it takes 1 of its 4 epochs; every update logs how many it took."""
    run_dir, m = run(*FIXED, "stages.ppo.target_kl=0.02")
    history = json.loads((run_dir / "ppo" / "log_history.json").read_text())
    epochs = [h["policy/epochs"] for h in history]
    assert len(epochs) == 20 and epochs[0] == 1.0 and all(1.0 <= e <= 4.0 for e in epochs)
    assert all((h["policy/early_stop"] == 1.0) == (h["policy/epochs"] < 4.0) for h in history)
    assert _ppo(m)["metrics"]["rollouts"]["early_stops"] == sum(e < 4 for e in epochs) >= 5
    fixed_dir, _ = run(*FIXED)
    assert {h["policy/epochs"] for h in json.loads((fixed_dir / "ppo" / "log_history.json").read_text())} == {4.0}


def test_kl_stop_ends_the_stage_with_the_last_policy_under_the_cap(run):
    """kl_stop 10: update 2's rollouts show ~16 nats per answer (seed 1), so the stage stops there and its output is
    the policy before update 1, whose rollouts (KL 0) stayed under the cap: the SFT weights themselves."""
    from safetensors.torch import load_file

    run_dir, m = run(*FIXED, "stages.ppo.kl_stop=10")
    ppo = _ppo(m)
    stopped = ppo["metrics"]["rollouts"]["stopped"]
    assert (stopped["update"], stopped["output_update"], stopped["restored"]) == (2, 0, True) and stopped["kl"] > 10
    assert any("> kl_stop 10 on the rollouts of update 2: stopping the stage" in line for line in LOG)
    history = json.loads((run_dir / "ppo" / "log_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2] and history[-1]["stopped"] == "kl_stop"
    final, sft = load_file(run_dir / "ppo" / "final" / "model.safetensors"), \
        load_file(run_dir / "sft" / "final" / "model.safetensors")
    assert final.keys() == sft.keys() and all((final[k] == sft[k]).all() for k in sft)


def _rambling_pairs(folder) -> str:
    """The built-in pairs plus, for each, a length-controlled comparison: the chosen answer alone beats the same
    answer run on with two more sentences. An audit trained on them has seen what the proxy below never did."""
    import random

    from alignctl.synthetic import DATA_DIR

    rows = [json.loads(line) for line in (DATA_DIR / "prefs.jsonl").read_text().splitlines()]
    rng, out = random.Random(0), []
    for r in rows:
        answer = r["chosen"][0]["content"]
        more = f"{rng.choice(rows)['chosen'][0]['content']} {rng.choice(rows)['rejected'][0]['content']}"
        out.append({"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": answer}],
                    "rejected": [{"role": "assistant", "content": f"{answer} {more}"}]})
    path = folder / "rambling.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows + out))
    return str(path)


def test_monitors_flag_a_planted_length_hacking_reward_and_the_audit_falls_as_the_proxy_rises(run, tmp_path_factory):
    """A proxy reward that pays 0.25 per token (what a reward model biased towards length does), in a TRL-style
    reward-model interface: the policy learns to answer longer; the monitors flag the reward-length correlation and
    the growth of the answers, and the audit reward model (trained on length-controlled comparisons too, never the
    training signal) falls while the proxy rises, which the audit_drop monitor reports."""
    import copy
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from alignctl.evaluate import encode_prompt
    from alignctl.rl.ppo_config import PPOConfig
    from alignctl.rl.ppo_trainer import PPOTrainer
    from alignctl.synthetic import DATA_DIR
    from alignctl.train import monitors

    class Body(torch.nn.Module):
        def forward(self, input_ids, attention_mask, position_ids, use_cache=False):
            return SimpleNamespace(last_hidden_state=position_ids.float().unsqueeze(-1))

    class LengthReward(torch.nn.Module):
        base_model_prefix = "body"

        def __init__(self):
            super().__init__()
            self.body, self.score = Body(), torch.nn.Linear(1, 1, bias=False)
            torch.nn.init.constant_(self.score.weight, 0.25)

    pairs = _rambling_pairs(tmp_path_factory.mktemp("audit"))
    base_dir, _ = run(FIXED[0], "stages.ppo.total_episodes=16", "stages.ppo.reward=rm",
                      f"stages.rm_audit.data={{path: '{pairs}'}}")
    tok = AutoTokenizer.from_pretrained(base_dir / "sft" / "final")
    tok.padding_side = "left"
    prompts = [json.loads(line)["prompt"] for line in (DATA_DIR / "prompts.jsonl").read_text().splitlines()]
    policy = AutoModelForCausalLM.from_pretrained(base_dir / "sft" / "final")
    audit = AutoModelForSequenceClassification.from_pretrained(base_dir / "rm_audit" / "final")
    value = AutoModelForSequenceClassification.from_pretrained(base_dir / "rm" / "final")
    config = PPOConfig(output_dir=str(tmp_path_factory.mktemp("ppo")), learning_rate=3e-3, total_episodes=320,
                       per_device_train_batch_size=16, response_length=32, stop_token="eos", temperature=1.0,
                       kl_coef=0.05, logging_steps=1, save_strategy="no", report_to="none", seed=1,
                       keep_best_audit=True)
    ref = copy.deepcopy(policy).requires_grad_(False)
    trainer = PPOTrainer(config, policy, value, LengthReward(), tok,
                         [encode_prompt(tok, p) for p in prompts], ref_policy=ref, stage="ppo", audit_model=audit)
    trainer.monitor = monitors.Monitor(monitors.defaults(), "ppo")
    LOG.clear()
    trainer.train()
    history = trainer.log_history
    q = len(history) // 4
    first, last = history[:q], history[-q:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "objective/scores") > mean(first, "objective/scores") + 1  # the proxy rises
    assert mean(last, "monitor/length") > 2 * history[0]["monitor/length"]  # by answering longer
    assert mean(last, "audit/scores") < history[0]["audit/scores"] - 0.3  # while the independent judge falls
    fired = {e["monitor"] for e in trainer.monitor.events}
    assert {"length_corr", "length_growth", "audit_drop"} <= fired, trainer.monitor.events
    assert any("monitor length_corr at update" in line and "the reward pays for length" in line for line in LOG)
    assert any("monitor audit_drop at update" in line and "the audit reward fell" in line for line in LOG)
    # keep_best_audit: the output is the policy whose rollouts the audit scored highest (update k's rollouts measure
    # the policy after k - 1 updates): here the SFT policy itself, before the length hacking began
    best = trainer.best_audit
    audits = [h["audit/scores"] for h in history]
    assert best["audit"] == pytest.approx(max(audits), abs=1e-5) and best["update"] == audits.index(max(audits))
    assert best["update"] == 0 and best["output_update"] == 0
    assert all(torch.equal(p, r) for p, r in zip(trainer.policy.parameters(), ref.parameters()))
    assert any("keep_best_audit: the output is the policy after update 0" in line for line in LOG)


def test_an_ensemble_trains_on_its_members_worst_case_and_logs_each_member(run):
    """reward: [rm, rm_b] with reward_aggregate=min: every update logs both members' mean scores and their spread,
    and the training signal is the per-answer minimum (never above either member's mean); the held-out answers are
    still judged by the audit, outside the ensemble."""
    import torch

    from alignctl.rl.ppo_trainer import aggregate_scores

    member = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 0.5]])
    assert aggregate_scores(member, "mean").tolist() == [0.5, -0.5, 0.5]
    assert aggregate_scores(member, "min").tolist() == [0.0, -2.0, 0.5]
    assert aggregate_scores(member, "mean_minus_std", 2.0).tolist() == [-0.5, -3.5, 0.5]
    assert aggregate_scores(member[:1], "min").tolist() == [1.0, -2.0, 0.5]
    run_dir, m = run("stages.ppo.seed=1", "stages.ppo.total_episodes=48", "stages.ppo.reward=[rm,rm_b]",
                     "stages.ppo.reward_aggregate=min")
    ppo = _ppo(m)
    history = json.loads((run_dir / "ppo" / "log_history.json").read_text())
    assert len(history) == 3
    for h in history:
        assert h["objective/scores"] <= min(h["ensemble/scores_1"], h["ensemble/scores_2"]) + 1e-6
        assert h["ensemble/std"] > 0 and "audit/scores" in h
    assert ppo["metrics"]["eval"]["reward"] == "rm_audit"
    assert next(s for s in m["stages"] if s["name"] == "rm_b")["status"] in ("completed", "reused")


# -- resume after a kill ----------------------------------------------------------------------------------------
def test_ppo_resumes_from_its_newest_checkpoint_after_a_kill(cache_root, tmp_path, monkeypatch):
    from alignctl.rl.ppo_trainer import PPOTrainer

    # kl_coef 0.25 (not the 0.3 of the test above): another fingerprint, so this stage trains instead of being reused
    overrides = (*[o for o in ADAPTIVE if not o.startswith("stages.ppo.kl_coef=")], "stages.ppo.kl_coef=0.25",
                 "stages.ppo.save_strategy=steps", "stages.ppo.save_steps=4")
    save = PPOTrainer.save_checkpoint
    saved: list[set[str]] = []

    def save_then_die(self):
        out = save(self)
        saved.append({p.name for p in out.iterdir()})
        if self.step == 8:
            raise RuntimeError("killed after the checkpoint of update 8")
        return out

    monkeypatch.setattr(PPOTrainer, "save_checkpoint", save_then_die)
    LOG.clear()
    with pytest.raises(Exception, match="killed after the checkpoint"):
        _run(cache_root, tmp_path / "first", *overrides)
    assert sum(line.startswith("[ppo] step ") for line in LOG) == 8
    # F25: weights as safetensors, no pickled custom objects (accelerate loads those with weights_only=False)
    assert "model.safetensors" in saved[-1] and "lr_scheduler.pt" in saved[-1], saved[-1]
    assert not any(n.startswith("custom_checkpoint") or n == "pytorch_model.bin" for n in saved[-1]), saved[-1]
    monkeypatch.setattr(PPOTrainer, "save_checkpoint", save)

    LOG.clear()
    m = _run(cache_root, tmp_path / "second", *overrides)
    ppo = _ppo(m)
    assert any("resuming from checkpoint-8 (step 8)" in line for line in LOG), LOG[:20]
    assert any(line.startswith("[ppo] resumed at update 8 of 20") for line in LOG)
    trained = [int(line.split()[2].rstrip(":")) for line in LOG if line.startswith("[ppo] step ")]
    assert trained == list(range(9, 21))  # only the updates after the checkpoint were trained again
    history = json.loads((tmp_path / "second" / "ppo" / "log_history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 21))  # the first 8 come from the checkpoint
    # The controller's state was restored: update 9's kl_coef follows from update 8's, not from the initial 0.25.
    k8, k9 = history[7]["objective/kl_coef"], history[8]["objective/kl_coef"]
    assert k8 != pytest.approx(0.25)
    assert k9 == pytest.approx(k8 * (1 + min(max(history[8]["objective/kl"] / TARGET - 1, -0.2), 0.2) * 1.0),
                               rel=1e-3)
    assert ppo["metrics"]["after"]["eval_rm_score"] > ppo["metrics"]["before"]["eval_rm_score"]


# -- DDP over torchrun ------------------------------------------------------------------------------------------
def test_ppo_under_torchrun_two_processes(run, tmp_path):
    from conftest import read_manifest, run_cli

    base_dir, _ = run(*FIXED)
    recipe = tmp_path / "ppo-only.yaml"
    stage = dict(read_spec(base_dir / "ppo" / "spec.json").args)
    stage = {k: v for k, v in stage.items() if k not in ("output_dir", "disable_tqdm", "seed", "bf16", "fp16")}
    stage.update(trainer="ppo", reward=str(base_dir / "rm" / "final"), data="prompts", total_episodes=64,
                 per_device_train_batch_size=8)
    recipe.write_text(json.dumps({"name": "ppo-only", "stages": {"ppo": stage}}))
    run_dir = tmp_path / "run"
    proc = run_cli(["run", f"recipe={recipe}", f"model.name_or_path={base_dir / 'sft' / 'final'}",
                    f"hydra.run.dir={run_dir}", f"output_root={tmp_path / 'out'}", "launcher=torchrun",
                    "launcher.nproc_per_node=2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = read_manifest(run_dir)
    (ppo,) = m["stages"]
    assert (ppo["status"], ppo["world_size"], ppo["distributed"]) == ("completed", 2, "ddp")
    ranks = [json.loads((run_dir / "ppo" / "launch" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert {(r["rank"], r["world_size"]) for r in ranks} == {(0, 2), (1, 2)}
    # 64 episodes, 8 prompts per process per update, 2 processes: 4 updates of 16 answers each.
    history = json.loads((run_dir / "ppo" / "log_history.json").read_text())
    assert [h["episode"] for h in history] == [16, 32, 48, 64]
    # The learning rate decays linearly over the 4 updates, once per update (not once per process).
    assert [h["lr"] for h in history] == pytest.approx([3e-3 * 3 / 4, 3e-3 / 2, 3e-3 / 4, 0.0])
    log = (run_dir / "alignctl.log").read_text()
    assert log.count("[ppo] step 4:") == 1 and "Traceback" not in proc.stdout + proc.stderr
