"""The job of a ``critique`` stage (alignctl.stages.critique declares the kind): the policy answers each prompt, the
critic critiques the answer against a principle and rewrites it, ``revisions`` times, and the stage writes SFT rows of
the final revisions and pairs of revision over original (kept only where a scorer, if any, prefers the revision).
:class:`CritiqueJob` is the trainer alignctl.train.lifecycle drives for the kind; rank 0 does all the work."""

from __future__ import annotations

import logging
import random
import time

from alignctl.generation import GenerateJob, as_answer, jsonl

log = logging.getLogger("alignctl")

# Requests appended as the next user turn after the answer (then after the critique). Written for this project.
DEFAULT_CRITIQUE = ("Look again at your last answer with this principle in mind: {principle} "
                    "In one or two sentences, say where the answer falls short of it.")
DEFAULT_REVISION = ("Rewrite your last answer so that it follows the principle: {principle} "
                    "Reply with the rewritten answer only.")


def turns_of(prompt) -> list[dict]:
    """A prompt as chat turns (a plain string is one user turn)."""
    return [dict(t) for t in prompt] if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]


def render(tokenizer, turns: list[dict], room: int) -> list[int]:
    """Token ids of a conversation ending where the assistant speaks next: the chat template with its generation
    prompt, or "role: text" lines for a tokenizer without one; cut from the left to at most ``room`` tokens."""
    if tokenizer.chat_template:
        ids = list(tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True,
                                                 add_generation_prompt=True)["input_ids"])
    else:
        text = "\n".join(f"{t['role']}: {t['content']}" for t in turns) + "\nassistant:"
        ids = list(tokenizer(text)["input_ids"])
    return ids[-room:] if room > 0 else ids


class CritiqueJob(GenerateJob):
    """``train()`` answers, critiques and revises every prompt; ``save_model(dir)`` writes sft.jsonl, pairs.jsonl and
    triples.jsonl (and the *_test.jsonl files with ``eval_size`` > 0). ``rows``: (train pairs, test pairs or None)
    once done; ``info``: what the manifest and report show."""

    def train(self, resume_from_checkpoint: str | None = None) -> None:
        from alignctl.evaluate import encode_prompt

        if not self.is_world_process_zero():
            return None
        ctx, cfg = self.ctx, self.args
        prompts = list(ctx.train["prompt"])  # the training split only: held-out prompts stay unseen
        prompts = prompts[:cfg.num_prompts] if cfg.num_prompts else prompts
        principles = list(ctx.spec.options["principles"])
        t0 = time.perf_counter()
        original = self._answers(prompts, [encode_prompt(ctx.tokenizer, p) for p in prompts])
        log.info("[%s] %d prompts answered in %.0f s", ctx.spec.name, len(prompts), time.perf_counter() - t0)
        triples = self._revise(prompts, original, principles)
        scores, self.info = self._score(prompts, [[t["original"], t["final"]] for t in triples])
        self.rows, self.files = self._rows(prompts, triples, scores)
        revised = [t for t in triples if t["changed"]]
        preferred = sum(t["kept"] for t in revised) if self.info["scorers"] else None
        self.info.update(prompts=len(prompts), revisions=cfg.revisions, principles=len(principles),
                         revised=len(revised), pairs=len(self.rows[0]), sft_rows=len(self.files["sft"]),
                         eval_pairs=len(self.rows[1] or []), preferred=preferred,
                         preferred_share=preferred / len(revised) if preferred is not None and revised else None,
                         examples=[_example(t) for t in revised[:3]])
        log.info("[%s] %d prompts: %d answers revised, %d pairs kept", ctx.spec.name, len(prompts), len(revised),
                 len(self.rows[0]))
        return None

    # -- the three generations: answer (policy), critique and revision (critic) ------------------------------------
    def _answers(self, prompts: list, prompt_ids: list[list[int]]) -> list[str]:
        from alignctl import evaluate, models
        from alignctl.train.context import release_memory

        ctx, cfg = self.ctx, self.args
        policy = models.load_causal_lm(ctx.init_path, ctx.model_spec, ctx.precision, ctx.tokenizer)
        ids = evaluate.generate(policy, ctx.tokenizer, prompt_ids, max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                                batch_size=cfg.batch_size)
        del policy
        release_memory()
        return [ctx.tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]

    def _critic(self):
        """(model, tokenizer) of the ``critic`` link, or of the policy when it is unset (Bai et al.: the model
        critiques and revises its own answers)."""
        from alignctl import models

        ctx = self.ctx
        link = ctx.spec.link("critic")
        if link is None or not link.path:
            return models.load_causal_lm(ctx.init_path, ctx.model_spec, ctx.precision, ctx.tokenizer), ctx.tokenizer
        path, spec = ctx.link_model("critic")  # an outside critic: its own revision, chat template and consent
        tok = models.load_tokenizer(path, spec)
        return models.load_causal_lm(path, spec, ctx.precision, tok), tok

    def _revise(self, prompts: list, original: list[str], principles: list[str]) -> list[dict]:
        """Each prompt's conversation grown by (critique request, critique, revision request, revision) per round;
        the principle of each round is drawn with the stage's seed."""
        from alignctl import evaluate
        from alignctl.train.context import release_memory

        cfg = self.args
        model, tok = self._critic()
        room = int(getattr(model.config, "max_position_embeddings", 0) or 0) - cfg.max_new_tokens
        ask = {"critique": cfg.critique_template or DEFAULT_CRITIQUE, "revision": cfg.revision_template or
               DEFAULT_REVISION}
        convs = [turns_of(p) + [{"role": "assistant", "content": a}] for p, a in zip(prompts, original)]
        triples = [{"prompt": p, "original": a, "rounds": [], "final": a} for p, a in zip(prompts, original)]
        rng = random.Random(cfg.seed)
        for r in range(cfg.revisions):
            t0 = time.perf_counter()
            picked = [principles[rng.randrange(len(principles))] for _ in prompts]
            said = {}
            for step, what in enumerate(("critique", "revision")):
                for conv, principle in zip(convs, picked):
                    conv.append({"role": "user", "content": ask[what].format(principle=principle)})
                ids = evaluate.generate(model, tok, [render(tok, c, room) for c in convs],
                                        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                        top_p=cfg.top_p, seed=cfg.seed + 1000 * (2 * r + step + 1),
                                        batch_size=cfg.batch_size)
                said[what] = [tok.decode(x, skip_special_tokens=True).strip() for x in ids]
                for conv, text in zip(convs, said[what]):
                    conv.append({"role": "assistant", "content": text})
            log.info("[%s] round %d of %d: critiques and revisions of %d answers in %.0f s", self.ctx.spec.name,
                     r + 1, cfg.revisions, len(prompts), time.perf_counter() - t0)
            for t, principle, critique, revision in zip(triples, picked, said["critique"], said["revision"]):
                t["rounds"].append({"principle": principle, "critique": critique, "revision": revision})
                t["final"] = revision or t["final"]  # an empty revision keeps the answer it revised
        del model
        release_memory()
        for t in triples:
            t["changed"] = bool(t["final"]) and t["final"] != t["original"]
        return triples

    # -- which revisions are better: the scorers of a generate stage, on (original, final) --------------------------
    def _score(self, prompts: list, answers: list[list[str]]) -> tuple[list[list[float]] | None, dict]:
        from alignctl.evaluate import encode_prompt
        from alignctl.generation import judge_wins, reward_scores

        ctx, cfg = self.ctx, self.args
        reward, judge_link, audit = ctx.spec.link("reward"), ctx.spec.link("judge"), ctx.spec.link("audit")
        info: dict = {"scorers": []}
        tok, eos = ctx.tokenizer, [ctx.tokenizer.eos_token_id] if ctx.tokenizer.eos_token_id is not None else []
        prompt_ids = [encode_prompt(tok, p) for p in prompts for _ in range(2)]
        flat = [tok(a, add_special_tokens=False)["input_ids"] + eos for pair in answers for a in pair]  # alike
        if audit is not None and audit.path:  # measures only: never decides which revisions are kept
            got = reward_scores(ctx, prompt_ids, flat, cfg.batch_size, link="audit")
            revised = [n for n, (a, b) in enumerate(answers) if b and a != b]
            better = sum(got[2 * n + 1] > got[2 * n] for n in revised)
            info["audit"] = {"model": audit.stage or audit.path, "revised": len(revised), "preferred": better,
                             "preferred_share": better / len(revised) if revised else None,
                             "score_original": _mean([got[2 * n] for n in revised]),
                             "score_revision": _mean([got[2 * n + 1] for n in revised])}
        if not (reward is not None and reward.path) and not (judge_link is not None and judge_link.path):
            return None, info
        scores = [[0.0, 0.0] for _ in prompts]
        if reward is not None and reward.path:
            for n, v in enumerate(reward_scores(ctx, prompt_ids, flat, cfg.batch_size)):
                scores[n // 2][n % 2] += v
            info["scorers"].append(reward.stage or reward.path)
        if judge_link is not None and judge_link.path:
            wins, info["judge"] = judge_wins(ctx, prompts, answers, ctx.spec.options["principles"],
                                             cfg.judge_template, cfg.batch_size)
            for row, w in zip(scores, wins):
                row[0], row[1] = row[0] + w[0], row[1] + w[1]
            info["scorers"].append(f"judge {judge_link.stage or judge_link.path}")
        return scores, info

    def _rows(self, prompts: list, triples: list[dict], scores: list[list[float]] | None
              ) -> tuple[tuple[list[dict], list[dict] | None], dict[str, list[dict]]]:
        """The kept revisions as SFT rows and pairs, split by prompt (``eval_size``); fails the stage when none is
        kept."""
        cfg = self.args
        order = list(range(len(prompts)))
        random.Random(cfg.seed).shuffle(order)
        held = set(order[:int(round(cfg.eval_size * len(prompts)))])
        files: dict[str, list[dict]] = {"sft": [], "pairs": [], "sft_test": [], "pairs_test": [], "triples": []}
        for i, (p, t) in enumerate(zip(prompts, triples)):
            if scores is not None:
                t["score_original"], t["score_final"] = scores[i]
            t["kept"] = t["changed"] and (scores is None or scores[i][1] - scores[i][0] > cfg.margin)
            files["triples"].append(dict(t))
            if not t["kept"]:
                continue
            suffix = "_test" if i in held else ""
            pair = {"prompt": p, "chosen": as_answer(p, t["final"]), "rejected": as_answer(p, t["original"])}
            if scores is not None:
                pair.update(score_chosen=scores[i][1], score_rejected=scores[i][0])
            files["pairs" + suffix].append(pair)
            files["sft" + suffix].append({"messages": turns_of(p) + [{"role": "assistant", "content": t["final"]}]}
                                         if isinstance(p, list) else {"prompt": p, "completion": t["final"]})
        if not files["pairs"] or (held and not files["pairs_test"]):
            from alignctl.errors import StageFailed

            changed, kept = sum(t["changed"] for t in triples), sum(t["kept"] for t in triples)
            scored = f", {kept} preferred by the scorer" if scores is not None else ""
            raise StageFailed(self.ctx.spec.name, "(no revisions kept)",
                              f"no {'held-out ' if files['pairs'] else ''}revisions kept ({len(prompts)} prompts, "
                              f"{changed} revised{scored}, {len(held)} held out): raise num_prompts or revisions, "
                              "lower margin or eval_size, or use a stronger critic")
        return (files["pairs"], files["pairs_test"] if held else None), files

    def save_model(self, output_dir: str | None = None) -> None:
        from pathlib import Path

        from alignctl.fsutil import write_text_atomic

        out = Path(output_dir or self.ctx.dir / "final")
        out.mkdir(parents=True, exist_ok=True)
        held = self.rows[1] is not None
        for name, rows in self.files.items():
            if held or not name.endswith("_test"):
                write_text_atomic(out / f"{name}.jsonl", jsonl(rows))


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _example(t: dict) -> dict:
    last = t["rounds"][-1]
    text = t["prompt"][-1]["content"] if isinstance(t["prompt"], list) else str(t["prompt"])
    return {"prompt": text, "original": t["original"], "principle": last["principle"], "critique": last["critique"],
            "revision": t["final"]}
