"""alignctl's own PPO (alignctl.rl): the pieces of the algorithm on hand-checked numbers; the adaptive KL controller
holds KL near its target where a fixed small kl_coef lets it run past; an interrupted PPO stage resumes from its
newest checkpoint (step, optimiser, kl_coef and logs carried over); PPO over torchrun x2 (DDP, gloo on CPU)."""

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


# -- adaptive KL --------------------------------------------------------------------------------------------------
# Seed 1 for both runs (PPO on a ~70k-parameter model is seed-sensitive): with the recipe's fixed kl_coef 0.05 the KL
# of the last quarter reaches ~6.7 nats per answer (4.1-7.9 over seeds 1, 2, 3 and the default).
TARGET = 3.0
FIXED = ("stages.ppo.seed=1",)
ADAPTIVE = (*FIXED, f"stages.ppo.kl_target={TARGET}", "stages.ppo.kl_horizon=16", "stages.ppo.kl_coef=0.3")


def test_adaptive_kl_holds_kl_near_the_target_where_a_fixed_small_coefficient_exceeds_it(run):
    _, fixed = run(*FIXED)
    run_dir, adaptive = run(*ADAPTIVE)
    fixed_r, adaptive_r = _ppo(fixed)["metrics"]["rollouts"], _ppo(adaptive)["metrics"]["rollouts"]
    assert fixed_r["kl_last_quarter"] > 1.5 * TARGET, fixed_r  # kl_coef 0.05 throughout: nothing holds KL
    assert abs(adaptive_r["kl_last_quarter"] - TARGET) <= 0.5 * TARGET, adaptive_r
    # kl_coef per step follows Ziegler et al.'s rule on the logged KL (16 episodes per update, horizon 16).
    coef, kls = [0.3] + adaptive_r["kl_coef"], adaptive_r["kl"]
    for i, k in enumerate(kls):
        assert coef[i + 1] == pytest.approx(coef[i] * (1 + min(max(k / TARGET - 1, -0.2), 0.2) * 16 / 16), rel=1e-3)
    assert max(coef) > 0.45  # it rose to hold KL down
    ppo = _ppo(adaptive)
    assert ppo["metrics"]["after"]["eval_rm_score"] > ppo["metrics"]["before"]["eval_rm_score"]
    # The run log shows KL and kl_coef per step; the report plots them.
    steps = [line for line in LOG if line.startswith("[ppo] step ") and "objective/kl_coef=" in line]
    assert len(steps) >= 25
    assert (run_dir / "ppo" / "curves.png").is_file() and "ppo/curves.png" in (run_dir / "report.md").read_text()


# -- resume after a kill ----------------------------------------------------------------------------------------
def test_ppo_resumes_from_its_newest_checkpoint_after_a_kill(cache_root, tmp_path, monkeypatch):
    from alignctl.rl.ppo_trainer import PPOTrainer

    overrides = (*ADAPTIVE, "stages.ppo.total_episodes=320", "stages.ppo.save_strategy=steps",
                 "stages.ppo.save_steps=4")
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
    # The controller's state was restored: update 9's kl_coef follows from update 8's, not from the initial 0.3.
    k8, k9 = history[7]["objective/kl_coef"], history[8]["objective/kl_coef"]
    assert k8 != pytest.approx(0.3)
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
