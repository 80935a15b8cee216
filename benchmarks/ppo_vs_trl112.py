"""alignctl's PPO (alignctl.rl) against TRL 1.12's ``trl.experimental.ppo`` on the same tiny model, data, seeds and
hyperparameters (the rlhf-ppo recipe's PPO stage), printed side by side: reward lift, final KL, wall time.

    python benchmarks/ppo_vs_trl112.py [--seeds 1,2,3] [--work /tmp/ppo-bench] [--set kl_coef=0.05 ...]

1. SFT and reward model: the rlhf-ppo recipe's first two stages, trained once with alignctl (this interpreter).
2. TRL 1.12 runs in a throwaway virtual environment (``--trl-venv``, default /tmp/alignctl-trl112-venv): created on
   first use with ``pip install --no-deps trl==1.12.0``; everything else (torch, transformers, accelerate, datasets,
   alignctl's loaders) is this interpreter's, reached through a .pth file, so no second torch is downloaded.
3. Each PPO run is its own process (one torch thread): same SFT policy, reward model (also the value model's start),
   prompts, seed and PPO settings; wall time is the ``train()`` call alone.
4. Both final policies are then scored the same way here: ``eval_rm_score`` = mean reward-model score of 4 sampled
   answers (temperature 1, seed 0) to each held-out prompt; lift = after - before (the SFT policy). Final KL is the
   mean of the training log's ``objective/kl`` (KL to the reference per answer, k1) over the last quarter of updates.
"""

from __future__ import annotations

import argparse
import json
import os
import site
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONPATH": str(REPO)}


def trl112_python(venv: Path) -> str:
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pth = next((venv / "lib").glob("python3*/site-packages")) / "_alignctl_bench_parent.pth"
        pth.write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in site.getsitepackages()))
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "trl==1.12.0"], check=True)
    out = subprocess.run([str(py), "-c", "import trl, torch; print(trl.__version__, torch.__version__)"],
                         capture_output=True, text=True, env=ENV, check=True).stdout.split()
    assert out[0] == "1.12.0", f"{venv} has trl {out[0]}, not 1.12.0"
    return str(py)


# -- one PPO run (a worker process) --------------------------------------------------------------------------------
def worker(impl: str, spec_path: str, seed: int, out: str) -> None:
    import copy

    import torch

    torch.set_num_threads(1)
    from alignctl.config.types import StageSpec
    from alignctl.evaluate import encode_prompt
    from alignctl.train.context import StageContext

    spec = StageSpec.from_json(Path(spec_path).read_text())
    spec = spec.replace(entry_dir=out, resume_from=None, args={**spec.args, "seed": seed})
    ctx = StageContext(spec)
    tokenizer = copy.deepcopy(ctx.tokenizer)
    tokenizer.padding_side = "left"
    policy, reward, value = ctx.load_policy(), ctx.load_reward_model(), ctx.load_value_model()
    if impl == "trl-1.12":
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        args = {**ctx.args_for(spec), "num_sample_generations": 0}
        data = ctx.train.map(lambda ex: {"input_ids": encode_prompt(tokenizer, ex["prompt"])},
                             remove_columns=ctx.train.column_names)
        trainer = PPOTrainer(args=PPOConfig(**args), processing_class=tokenizer, model=policy, ref_model=None,
                             reward_model=reward, value_model=value, train_dataset=data, eval_dataset=data)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        history, final = trainer.state.log_history, trainer.accelerator.unwrap_model(trainer.model).policy
    else:
        from alignctl.rl.ppo_config import PPOConfig
        from alignctl.rl.ppo_trainer import PPOTrainer

        trainer = PPOTrainer(ctx.trl_config(PPOConfig), policy, value, reward, tokenizer,
                             [encode_prompt(tokenizer, p) for p in ctx.train["prompt"]],
                             ref_policy=copy.deepcopy(policy).requires_grad_(False))
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        history, final = trainer.log_history, trainer.policy
    final.generation_config.eos_token_id = ctx.tokenizer.eos_token_id
    final.save_pretrained(Path(out) / "policy")
    ctx.tokenizer.save_pretrained(Path(out) / "policy")
    kl = [h["objective/kl"] for h in history if "objective/kl" in h]
    q = max(1, len(kl) // 4)
    Path(out, "result.json").write_text(json.dumps({"wall_s": wall, "updates": len(kl), "kl_last_quarter":
                                                    sum(kl[-q:]) / q}))


# -- the common evaluation -----------------------------------------------------------------------------------------
def rm_score(policy_dir: str, rm_dir: str, prompts: list, max_new_tokens: int, samples: int = 4) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from alignctl.evaluate import encode_prompt
    from alignctl.rl import ppo_core as core

    tok = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    pad, stop = tok.pad_token_id, [tok.eos_token_id]
    rows = [encode_prompt(tok, p) for p in prompts for _ in range(samples)]
    torch.manual_seed(0)
    q, qm = core.left_pad(rows, pad, "cpu")
    resp = core.generate(policy, q, qm, max_new_tokens=max_new_tokens, temperature=1.0, stop_ids=stop, pad=pad)
    lengths, _ = core.answer_lengths(resp, stop, pad)
    ids, mask, pos = core.sequence_inputs(q, qm, resp, lengths)
    with torch.no_grad():
        scores = core.token_scores(rm, ids, mask, pos)[torch.arange(len(rows)), q.shape[1] + lengths - 1]
    return scores.mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--work", default="/tmp/ppo-bench")
    p.add_argument("--trl-venv", default="/tmp/alignctl-trl112-venv")
    p.add_argument("--set", nargs="*", default=[], help="extra overrides of the PPO stage, e.g. kl_coef=0.1")
    p.add_argument("--worker", nargs=4, metavar=("IMPL", "SPEC", "SEED", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker[0], a.worker[1], int(a.worker[2]), a.worker[3])

    import torch

    torch.set_num_threads(1)
    from alignctl import pipeline
    from alignctl.config.compose import compose
    from alignctl.config.resolve import resolve
    from alignctl.config.types import StageSpec
    from alignctl.data import load

    work = Path(a.work)
    ov = ["recipe=rlhf-ppo", f"output_root={work / 'outputs'}", *[f"stages.ppo.{s}" for s in a.set]]
    run_dir = work / f"recipe-{int(time.time())}"
    pipeline.run(resolve(compose(ov), run_dir), ov)  # SFT, RM (and alignctl's PPO once, as a smoke test)
    stage_spec = run_dir / "ppo" / "spec.json"
    s = StageSpec.from_json(stage_spec.read_text())
    _, held = load(s.data, "prompt", "stages.ppo")
    prompts, length = list(held["prompt"]), s.args["response_length"]
    pythons = {"alignctl": sys.executable, "trl-1.12": trl112_python(Path(a.trl_venv))}
    sft, rm = str(run_dir / "sft" / "final"), str(run_dir / "rm" / "final")
    before = rm_score(sft, rm, prompts, length)
    rows: dict[str, list[dict]] = {k: [] for k in pythons}
    for seed in [int(x) for x in a.seeds.split(",")]:
        for impl, py in pythons.items():
            out = work / f"{impl}-seed{seed}"
            subprocess.run([py, __file__, "--worker", impl, str(stage_spec), str(seed), str(out)], env=ENV,
                           check=True, capture_output=True)
            r = json.loads((out / "result.json").read_text())
            r["lift"] = rm_score(str(out / "policy"), rm, prompts, length) - before
            rows[impl].append(r)
            print(f"seed {seed} {impl:9s} lift {r['lift']:+.3f}  KL(last quarter) {r['kl_last_quarter']:6.2f}  "
                  f"train {r['wall_s']:6.1f} s  ({r['updates']} updates)", flush=True)
    measures = ("lift", "kl_last_quarter", "wall_s")
    mean = {k: {m: sum(r[m] for r in v) / len(v) for m in measures} for k, v in rows.items()}
    a_, t_ = mean["alignctl"], mean["trl-1.12"]
    print(f"\nheld-out eval_rm_score of the SFT policy: {before:.3f}; {len(prompts)} prompts x 4 answers; "
          f"means over seeds {a.seeds}")
    print(f"{'':22s}{'alignctl':>10s}{'TRL 1.12':>10s}{'ratio':>8s}")
    for label, key in (("reward lift", "lift"), ("final KL (nats/answer)", "kl_last_quarter"),
                       ("wall time train (s)", "wall_s")):
        print(f"{label:22s}{a_[key]:10.3f}{t_[key]:10.3f}{a_[key] / t_[key]:8.2f}")


if __name__ == "__main__":
    main()
