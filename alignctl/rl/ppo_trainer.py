"""The PPO training loop: rollout batches, minibatch epochs, gradient accumulation and DDP through accelerate's
Accelerator, logging, checkpoints and resume. The algorithm's pieces are in :mod:`alignctl.rl.ppo_core`.

One update = one rollout batch of per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches
prompts per process, then ``num_ppo_epochs`` passes over it in ``num_mini_batches`` minibatches, each the
accumulated gradient of ``gradient_accumulation_steps`` micro-batches. The prompts of update ``i`` depend only on
``seed`` and ``i``, so a resumed run sees the prompts the interrupted one would have seen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch

from alignctl.rl import kl as klmod
from alignctl.rl import ppo_core as core

log = logging.getLogger("alignctl")
SCHEDULER_FILE = "lr_scheduler.pt"  # the learning-rate schedule's state (plain numbers; loaded with weights_only)


class PolicyAndValue(torch.nn.Module):
    """Policy and value model as one module: one optimiser, one DDP wrapper, one checkpoint."""

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    def forward(self, ids, mask, positions):
        logits = self.policy(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        return logits, core.token_scores(self.value_model, ids, mask, positions)


def aggregate_scores(member, rule: str, std_coef: float = 1.0):
    """One score per answer from the reward models' (members x answers): their mean, their minimum (worst case), or
    mean - std_coef x std (uncertainty-weighted optimisation; Coste et al. 2023, "Reward model ensembles help mitigate
    overoptimization"). One reward model: its scores."""
    if len(member) == 1:
        return member[0]
    if rule == "min":
        return member.min(0).values
    if rule == "mean_minus_std":
        return member.mean(0) - std_coef * member.std(0, unbiased=False)
    return member.mean(0)


def _no_dropout(model) -> None:
    """Huang et al. 2024: dropout off, so rollout and training log-probabilities agree."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


class PPOTrainer:
    """A trainer as alignctl.train.lifecycle drives one (TRL's trainers' interface): ``model`` is the policy (what
    final/ holds, without the value model), ``args`` the config, ``state.log_history`` every logged update,
    ``train(resume_from_checkpoint=...)``, ``evaluate()`` (no held-out metrics of its own: the lifecycle's policy
    evaluation scores its answers with ``reward_model``, KL against ``ref_model``), ``save_model(dir)``."""

    def __init__(self, config, policy, value_model, reward_model, tokenizer, prompts: list[list[int]],
                 ref_policy=None, stage: str = "stage", audit_model=None):
        from accelerate import Accelerator
        from transformers import TrainerState, get_scheduler

        mixed = "bf16" if config.bf16 else "fp16" if config.fp16 else "no"
        self.acc = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps, mixed_precision=mixed)
        self.config, self.tokenizer, self.prompts, self.stage = config, tokenizer, prompts, stage
        self.args = config
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = [config.stop_token_id] if config.stop_token_id is not None else \
            [tokenizer.eos_token_id] if config.stop_token == "eos" else []
        c, world = config, self.acc.num_processes
        self.local_batch = c.per_device_train_batch_size * c.gradient_accumulation_steps * c.num_mini_batches
        self.batch = self.local_batch * world
        episodes = c.total_episodes or int(c.num_train_epochs * len(prompts))
        self.updates = max(1, math.ceil(episodes / self.batch))
        self.kl = klmod.controller(c, self.updates * self.batch)
        self.is_peft = ref_policy is None and hasattr(policy, "disable_adapter")
        for m in (policy, value_model):
            _no_dropout(m)
        model = PolicyAndValue(policy, value_model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2),
                                      eps=c.adam_epsilon, weight_decay=c.weight_decay)
        scheduler = get_scheduler(c.lr_scheduler_type, optimizer, num_warmup_steps=c.get_warmup_steps(self.updates),
                                  num_training_steps=self.updates, scheduler_specific_kwargs=c.lr_scheduler_kwargs)
        self.wrapped, self.optimizer = self.acc.prepare(model, optimizer)  # policy + value, DDP-wrapped
        # stepped once per update on every process (accelerate's prepared scheduler would step once per process);
        # saved by save_checkpoint itself: accelerate loads registered objects with weights_only=False (a pickle)
        self.scheduler = scheduler
        dev = self.acc.device
        # one reward model, or an ensemble (a list) whose scores combine by reward_aggregate (aggregate_scores)
        members = reward_model if isinstance(reward_model, (list, tuple)) else [reward_model]
        self.reward_models = [m.to(dev).eval() for m in members]
        self.reward_model = self.reward_models[0]
        # scores answers, never trains: per update beside the proxy, and the held-out answers (lifecycle)
        self.audit_model = None if audit_model is None else audit_model.to(dev).eval()
        self.ref = None if ref_policy is None else ref_policy.to(dev).eval()
        if self.ref is None and not self.is_peft:
            raise ValueError("PPO needs a reference model, or a policy with an adapter to disable")
        self.step, self.state = 0, TrainerState()
        self.stopped: dict | None = None  # set when kl_stop ended the stage: {update, kl, kl_stop, restored}
        self._snapshot: dict | None = None  # kl_stop: the policy's trainable weights before the latest update
        # keep_best_audit: {update, audit} of the best-scored policy so far (the policy after `update` updates) and
        # a CPU copy of its trainable weights
        self.best_audit: dict | None = None
        self._best: dict | None = None
        self.monitor = None  # alignctl.train.monitors.Monitor the lifecycle attaches: observe(step, metrics) per update

    @property
    def policy(self):
        return self.acc.unwrap_model(self.wrapped).policy

    model = policy  # the Trainable's model: the policy alone

    @property
    def ref_model(self):
        """The reference policy; None when it is the policy with its adapter disabled."""
        return self.ref

    @property
    def log_history(self) -> list[dict]:
        return self.state.log_history

    def is_world_process_zero(self) -> bool:
        return self.acc.is_main_process

    def evaluate(self) -> dict:
        return {}  # held-out answers are scored by the lifecycle's policy evaluation

    def save_model(self, output_dir: str | None = None) -> None:
        """The policy alone (not the value model) and its tokenizer."""
        out = output_dir or self.config.output_dir
        self.policy.save_pretrained(out)
        self.tokenizer.save_pretrained(out)

    # -- prompts of an update ------------------------------------------------------------------------------------
    def _prompt_indices(self, update: int) -> list[int]:
        """This process's prompts of ``update``: a stream of seeded permutations of all prompts, one per pass."""
        n, perms, out = len(self.prompts), {}, []
        first = update * self.batch + self.acc.process_index * self.local_batch
        for pos in range(first, first + self.local_batch):
            epoch, i = divmod(pos, n)
            if epoch not in perms:
                perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + epoch))
            out.append(int(perms[epoch][i]))
        return out

    # -- rollouts --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, rows: list[list[int]]) -> dict:
        c, dev, chunks = self.config, self.acc.device, []
        model = self.acc.unwrap_model(self.wrapped)
        model.eval()
        for i in range(0, len(rows), c.local_rollout_forward_batch_size):
            q, qm = core.left_pad(rows[i:i + c.local_rollout_forward_batch_size], self.pad, dev)
            with self.acc.autocast():
                resp = core.generate(model.policy, q, qm, max_new_tokens=c.response_length, temperature=c.temperature,
                                     stop_ids=self.stop_ids, pad=self.pad)
                lengths, stopped = core.answer_lengths(resp, self.stop_ids, self.pad)
                ids, mask, pos = core.sequence_inputs(q, qm, resp, lengths)
                logits, values = model(ids, mask, pos)
                logp, entropy = core.answer_logprobs(logits, resp, q.shape[1], c.temperature)
                with model.policy.disable_adapter() if self.ref is None else contextlib.nullcontext():
                    reference = model.policy if self.ref is None else self.ref
                    ref_logits = reference(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
                ref_logp, _ = core.answer_logprobs(ref_logits, resp, q.shape[1], c.temperature)
                member = [core.token_scores(rm, ids, mask, pos) for rm in self.reward_models]
                audit = None if self.audit_model is None else core.token_scores(self.audit_model, ids, mask, pos)
            w = q.shape[1]
            last = (torch.arange(len(resp), device=dev), w + lengths - 1)
            member = torch.stack([m.float()[last] for m in member])  # (reward models, answers)
            scores = aggregate_scores(member, c.reward_aggregate, c.reward_std_coef)
            if c.missing_eos_penalty is not None:
                scores = scores - c.missing_eos_penalty * (~stopped).float()
            amask = (torch.arange(resp.shape[1], device=dev)[None] < lengths[:, None]).float()
            if audit is not None:
                audit = audit.float()[last]
            chunks.append(dict(q=q, qm=qm, resp=resp, lengths=lengths, stopped=stopped, audit=audit, mask=amask,
                               members=member,
                               logp=logp * amask, ref_logp=ref_logp * amask, entropy=entropy * amask, scores=scores,
                               values=values.float()[:, w - 1:w - 1 + resp.shape[1]] * amask))
        model.train()
        return chunks

    # -- one update ----------------------------------------------------------------------------------------------
    def update(self) -> dict:
        c = self.config
        rows = [self.prompts[i] for i in self._prompt_indices(self.step)]
        t0 = time.perf_counter()
        chunks = self.rollout(rows)
        rollout_s, t0 = time.perf_counter() - t0, time.perf_counter()
        stats = {k: [] for k in ("pg", "vf", "clip", "vclip", "approxkl", "ent", "ratio")}
        seq_kl, scores, non_score, entropy = [], [], [], []
        for ch in chunks:
            kl_tok = klmod.kl_per_token(ch["logp"], ch["ref_logp"], c.kl_estimator) * ch["mask"]
            _, ns, ch["adv"], ch["ret"] = core.rewards_and_advantages(
                ch["scores"], kl_tok, ch["values"], ch["mask"], ch["lengths"], kl_coef=self.kl.value, gamma=c.gamma,
                lam=c.lam, whiten_rewards=c.whiten_rewards)
            seq_kl.append(kl_tok.sum(1)), scores.append(ch["scores"]), non_score.append(ns.sum(1))
            entropy.append(ch["entropy"].sum(1))
        kl_now = self._mean(torch.cat(seq_kl))
        if c.keep_best_audit and self.audit_model is not None:  # these rollouts measure the policy as it is now
            audit_now = self._mean(torch.cat([ch["audit"] for ch in chunks]))
            if self.best_audit is None or audit_now > self.best_audit["audit"]:
                self.best_audit = {"update": self.step, "audit": audit_now}
                self._best = self._trainable_copy()
        if c.kl_stop is not None and kl_now > c.kl_stop:  # the policy that sampled these crossed the cap
            return self._stop(kl_now)
        if c.kl_stop is not None:
            self._snapshot = self._trainable_copy()
        samples = [(ch, j) for ch in chunks for j in range(len(ch["resp"]))]
        mini = c.per_device_train_batch_size * c.gradient_accumulation_steps
        per_epoch, done, early = math.ceil(len(samples) / mini), 0, False
        for _ in range(c.num_ppo_epochs):
            order = torch.randperm(len(samples)).tolist()
            for m in range(0, len(order), mini):
                parts = [[samples[i] for i in order[k:k + c.per_device_train_batch_size]]
                         for k in range(m, min(m + mini, len(order)), c.per_device_train_batch_size)]
                # target_kl (Spinning Up's PPO): before each step, the approximate KL of the policy as it is now to
                # the rollouts' policy on the minibatch's first micro-batch, averaged over the processes (so every
                # one stops at the same minibatch); above 1.5 x target_kl the update takes no more steps
                if c.target_kl is not None and done and self._approx_kl(parts[0]) > 1.5 * c.target_kl:
                    early = True
                    break
                for part in parts:
                    with self.acc.accumulate(self.wrapped):
                        self._micro_step(part, stats)
                done += 1
            if early:
                break
        self.scheduler.step()
        update_s = time.perf_counter() - t0  # this process's; the answers' tokens are all processes'
        mine = torch.stack([ch["mask"].sum() for ch in chunks]).sum().float().reshape(1)
        answer_tokens = self.acc.gather(mine).sum().item()
        self.kl.update(kl_now, self.batch)
        self.step += 1
        mean = lambda xs: self._mean(torch.stack(xs)) if xs else float("nan")  # noqa: E731
        sc, kl_mean = self._mean(torch.cat(scores)), kl_now
        monitor = self._monitor_signals(chunks, torch.cat(scores), torch.cat(seq_kl), torch.cat(entropy))
        return {**monitor, "objective/kl": kl_mean, "objective/kl_coef": self.kl.value,
                "objective/entropy": self._mean(torch.cat(entropy)),
                "objective/non_score_reward": self._mean(torch.cat(non_score)), "objective/scores": sc,
                "objective/rlhf_reward": sc + self._mean(torch.cat(non_score)),
                "policy/approxkl_avg": mean(stats["approxkl"]), "policy/clipfrac_avg": mean(stats["clip"]),
                "loss/policy_avg": mean(stats["pg"]), "loss/value_avg": mean(stats["vf"]),
                "val/clipfrac_avg": mean(stats["vclip"]), "policy/entropy_avg": mean(stats["ent"]),
                "val/ratio": mean(stats["ratio"]), "lr": self.scheduler.get_last_lr()[0],
                "episode": self.step * self.batch, "time/rollout": rollout_s, "time/update": update_s,
                "tokens/answers": answer_tokens, "policy/epochs": done / per_epoch,
                "policy/early_stop": float(early)}

    def _monitor_signals(self, chunks, scores, seq_kl, entropy) -> dict:
        """The reward-hacking monitors' signals (alignctl.train.monitors) over all processes' answers of the update:
        reward std, answer length, reward-length correlation, share truncated, KL and entropy per token."""
        lengths = self.acc.gather(torch.cat([ch["lengths"] for ch in chunks]).float())
        sc, kl, ent = (self.acc.gather(x.detach().float()) for x in (scores, seq_kl, entropy))
        tokens = lengths.sum().clamp(min=1)
        out = {"monitor/reward_std": sc.std(unbiased=False).item(), "monitor/length": lengths.mean().item(),
               "monitor/kl_token": (kl.sum() / tokens).item(), "monitor/entropy_token": (ent.sum() / tokens).item()}
        if lengths.std() > 0 and sc.std() > 0:
            out["monitor/length_corr"] = torch.corrcoef(torch.stack([sc, lengths]))[0, 1].item()
        if self.audit_model is not None:
            out["audit/scores"] = self._mean(torch.cat([ch["audit"] for ch in chunks]))
        if len(self.reward_models) > 1:  # each member's mean score and their disagreement (std across members)
            member = torch.cat([ch["members"] for ch in chunks], dim=1)
            for i, row in enumerate(member):
                out[f"ensemble/scores_{i + 1}"] = self._mean(row)
            out["ensemble/std"] = self._mean(member.std(0, unbiased=False))
        if self.stop_ids:  # without a stop token every answer runs to response_length: nothing to measure
            stopped = self.acc.gather(torch.cat([ch["stopped"] for ch in chunks]).float())
            out["monitor/truncated"] = 1.0 - stopped.mean().item()
        return out

    def _trainable_copy(self) -> dict:
        return {n: p.detach().to("cpu", copy=True) for n, p in self.policy.named_parameters() if p.requires_grad}

    def _restore(self, weights: dict) -> None:
        with torch.no_grad():
            for n, p in self.policy.named_parameters():
                if n in weights:
                    p.copy_(weights[n].to(p.device))

    def _stop(self, kl_now: float) -> dict:
        """kl_stop crossed on this update's rollouts: back to the weights before the previous update (the last
        policy whose rollouts stayed under the cap), and no more updates."""
        c, restored = self.config, self._snapshot is not None
        if restored:
            self._restore(self._snapshot)
        self.stopped = {"update": self.step + 1, "kl": kl_now, "kl_stop": c.kl_stop, "restored": restored,
                        "output_update": self.step - 1 if restored else self.step}
        log.warning("[%s] KL to the reference %.3g > kl_stop %.3g on the rollouts of update %d: stopping the stage; "
                    "its output is the policy after update %d%s", self.stage, kl_now, c.kl_stop, self.step + 1,
                    self.stopped["output_update"], "" if restored else " (no earlier weights to go back to: the "
                    "stage resumed from a checkpoint at this update)")
        return {"objective/kl": kl_now, "objective/kl_coef": self.kl.value, "episode": self.step * self.batch}

    @torch.no_grad()
    def _approx_kl(self, part) -> float:
        """Approximate KL (old || now) of the policy on ``part``, as the loss measures it, without a gradient."""
        q, resp, mask, old_logp, _, _, _, ids, amask, pos = self._inputs(part)
        model = self.acc.unwrap_model(self.wrapped)
        with self.acc.autocast():
            logits = model.policy(input_ids=ids, attention_mask=amask, position_ids=pos, use_cache=False).logits
        logp, _ = core.answer_logprobs(logits, resp, q.shape[1], self.config.temperature)
        return self._mean(0.5 * core.masked_mean((logp - old_logp) ** 2, mask))

    def _inputs(self, part):
        dev = self.acc.device
        width = max(ch["resp"].shape[1] for ch, _ in part)
        qrows = [ch["q"][j][ch["qm"][j].bool()].tolist() for ch, j in part]
        q, qm = core.left_pad(qrows, self.pad, dev)

        def stack(key):
            fill = self.pad if key == "resp" else 0
            return torch.stack([torch.nn.functional.pad(ch[key][j], (0, width - ch[key].shape[1]), value=fill)
                                for ch, j in part])

        resp, mask, old_logp, old_v, adv, ret = (stack(k) for k in ("resp", "mask", "logp", "values", "adv", "ret"))
        lengths = torch.stack([ch["lengths"][j] for ch, j in part])
        return (q, resp, mask, old_logp, old_v, adv, ret, *core.sequence_inputs(q, qm, resp, lengths))

    def _micro_step(self, part, stats) -> None:
        c = self.config
        q, resp, mask, old_logp, old_v, adv, ret, ids, amask, pos = self._inputs(part)
        width = resp.shape[1]
        with self.acc.autocast():
            logits, values = self.wrapped(ids, amask, pos)
        logp, ent = core.answer_logprobs(logits, resp, q.shape[1], c.temperature)
        values = values.float()[:, q.shape[1] - 1:q.shape[1] - 1 + width]
        pg, clip, approxkl, ratio = core.policy_loss(logp, old_logp, adv, mask, c.cliprange)
        vf, vclip = core.value_loss(values, old_v, ret, mask, c.cliprange_value)
        self.acc.backward(pg + c.vf_coef * vf)
        if self.acc.sync_gradients and c.max_grad_norm:
            self.acc.clip_grad_norm_(self.wrapped.parameters(), c.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        for key, v in (("pg", pg), ("vf", vf), ("clip", clip), ("vclip", vclip), ("approxkl", approxkl),
                       ("ent", core.masked_mean(ent, mask)), ("ratio", ratio)):
            stats[key].append(v.detach())

    def _mean(self, x: torch.Tensor) -> float:
        return self.acc.gather(x.detach().float().reshape(-1)).mean().item()

    # -- the loop, checkpoints, resume -----------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | None = None) -> None:
        """Every update (after those of ``resume_from_checkpoint``); each logged one goes to the run log too."""
        from transformers import set_seed

        from alignctl.models import align_special_tokens

        c = self.config
        set_seed(c.seed + self.acc.process_index)  # each process samples its own answers; a resume restores the RNGs
        if resume_from_checkpoint:
            self._load(Path(resume_from_checkpoint))
        every = c.logging_steps if c.logging_steps >= 1 else max(1, math.ceil(c.logging_steps * self.updates))
        save_every = _save_every(c, self.updates)
        while self.step < self.updates:
            metrics = self.update()
            if self.stopped is not None:
                self.log_history.append({**{k: round(v, 6) for k, v in metrics.items()}, "step": self.step + 1,
                                         "stopped": "kl_stop"})
                break
            if self.monitor is not None and self.monitor.observe(self.step, metrics):
                self.stopped = {"update": self.step, "monitor": self.monitor.stopped["monitor"],
                                "output_update": self.step}
            if self.step % int(every) == 0 or self.step == self.updates or self.stopped is not None:
                entry = {**{k: round(v, 6) for k, v in metrics.items()}, "step": self.step}
                self.log_history.append(entry)
                if self.acc.is_main_process:  # the run log only (alignctl.console), unless -v
                    log.info("[%s] step %d: %s", self.stage, self.step,
                             " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), extra={"detail": True})
            if self.stopped is not None:  # a stop_when monitor fired: this update's weights are the output
                break
            if save_every and self.step % save_every == 0 and self.step < self.updates:
                self.save_checkpoint()
        self.state.global_step = self.step
        if self._best is not None and self.stopped is None:  # the output: the policy the audit scored highest
            self._restore(self._best)
            self.best_audit["output_update"] = self.best_audit["update"]
            if self.acc.is_main_process:
                log.info("[%s] keep_best_audit: the output is the policy after update %d (audit score %.4g; its "
                         "rollouts scored best of the %d measured)", self.stage, self.best_audit["update"],
                         self.best_audit["audit"], self.step)
        align_special_tokens(self.policy, self.tokenizer)  # the saved policy's config agrees with its tokenizer

    def save_checkpoint(self) -> Path:
        out = Path(self.config.output_dir) / f"checkpoint-{self.step}"
        tmp = out.with_name(out.name + ".partial")
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()
        # weights as safetensors; accelerate writes optimizer and RNG state with torch.save and reads them back with
        # weights_only=True (accelerate.utils.other.load)
        with _quiet("accelerate.utils.other"):  # "Removed shared tensor" of tied embeddings, at every checkpoint
            self.acc.save_state(str(tmp), safe_serialization=True)
        if self.acc.is_main_process:
            torch.save(self.scheduler.state_dict(), tmp / SCHEDULER_FILE)
            state = {"global_step": self.step, "log_history": self.log_history, "kl": self.kl.state(),
                     "updates": self.updates}
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
            _prune(out.parent, self.config.save_total_limit)
        self.acc.wait_for_everyone()
        return out

    def _load(self, ckpt: Path) -> None:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        self.acc.load_state(str(ckpt))
        self.scheduler.load_state_dict(torch.load(ckpt / SCHEDULER_FILE, map_location="cpu", weights_only=True))
        self.step = int(state["global_step"])
        self.state.log_history = list(state.get("log_history", []))
        self.kl.load(state.get("kl", {}))
        log.info("[%s] resumed at update %d of %d (kl_coef %.4g)", self.stage, self.step, self.updates, self.kl.value)


@contextlib.contextmanager
def _quiet(logger: str):
    lg = logging.getLogger(logger)
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


def _save_every(c, updates: int) -> int:
    strategy = getattr(c.save_strategy, "value", c.save_strategy)
    if strategy != "steps":
        return 0
    return int(c.save_steps) if c.save_steps >= 1 else max(1, math.ceil(c.save_steps * updates))


def _prune(folder: Path, limit: int | None) -> None:
    if not limit:
        return
    ckpts = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    for old in ckpts[:-limit]:
        shutil.rmtree(old, ignore_errors=True)
