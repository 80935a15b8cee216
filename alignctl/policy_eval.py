"""The generation-based evaluation of one policy stage, before and after training (:class:`PolicyEval`): answers
to held-out prompts, their KL to the reference, reward scores and win rate. The measures it is built from
(sampling, log-probabilities, reward scores, statistics) and what they mean are alignctl.evaluate's.

Nothing at module level imports torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignctl.evaluate import (
    distributed,
    encode_prompt,
    gather,
    generate,
    mean,
    my_batches,
    reward_scores,
    std,
    token_logps,
    win_rate,
)
from alignctl.length_control import lc_win_rate

if TYPE_CHECKING:
    from alignctl.config.types import EvalSettings


def _last_user_turn(turns: list) -> str | None:
    users = [t.get("content") for t in turns if isinstance(t, dict) and t.get("role") == "user"]
    return str(users[-1]) if users and isinstance(users[-1], str) else None


class PolicyEval:
    """Before/after evaluation of a policy on held-out prompts. ``before(model)`` runs on the initial weights (before
    training), ``after(model, reference, reward)`` after it. ``reference``: a factory of a context manager yielding
    the reference model (when the reference is the initial weights, the before-pass needs none: the policy is its
    reference); ``reward``: a factory of a context manager yielding (reward model, its tokenizer), or None."""

    def __init__(self, settings: EvalSettings, tokenizer, prompts: list, batch_size: int,
                 ref_is_initial: bool = True):
        self.settings, self.tokenizer, self.prompts = settings, tokenizer, prompts
        self.batch_size = max(1, int(batch_size))
        self.ref_is_initial = ref_is_initial
        self.prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
        # Under torch.distributed (DDP) each process answers and scores whole batches of its own; after() gathers
        # them, so every process ends with the one-process results (the same seeds per batch: the same answers).
        self.batches = my_batches(len(prompts), self.batch_size)
        self.mine = [i for b in self.batches for i in range(b * self.batch_size,
                                                            min((b + 1) * self.batch_size, len(prompts)))]
        self.samples: dict[str, list[list[int]]] = {}
        self.logps: dict[str, list[tuple[float, int]]] = {}
        self.ref_logps: dict[str, list[tuple[float, int]]] = {}
        self.scores: dict[str, list[float]] = {}

    def _gen(self, model) -> list[list[int]]:
        s = self.settings
        return generate(model, self.tokenizer, self.prompt_ids, max_new_tokens=s.max_new_tokens,
                        temperature=s.temperature, seed=s.seed, batch_size=self.batch_size, batches=self.batches)

    def _ids(self) -> list[list[int]]:
        return [self.prompt_ids[i] for i in self.mine]

    def _lp(self, model, completions) -> list[tuple[float, int]]:
        return token_logps(model, self.tokenizer, self._ids(), completions, self.batch_size)

    seconds = 0.0  # time spent in this evaluation (generation, scoring, loading reference/reward models)

    def before(self, model) -> None:
        t0 = time.perf_counter()
        self._before(model)
        self.seconds += time.perf_counter() - t0

    def before_state(self) -> dict[str, Any] | None:
        """What :meth:`before` measured, for every prompt (call after :meth:`after`, which gathers the processes'
        shares), for alignctl.train.before_cache; None when it has not run."""
        if "before" not in self.samples or len(self.samples["before"]) != len(self.prompts):
            return None
        return {"prompts": len(self.prompts), "samples": self.samples["before"],
                "logps": [list(x) for x in self.logps["before"]]}

    def restore_before(self, state: dict[str, Any]) -> bool:
        """:meth:`before`'s results from :meth:`before_state` (this process's share); False if they do not fit."""
        if state.get("prompts") != len(self.prompts):
            return False
        self.samples["before"] = [list(state["samples"][i]) for i in self.mine]
        self.logps["before"] = [(float(state["logps"][i][0]), int(state["logps"][i][1])) for i in self.mine]
        if self.ref_is_initial:
            self.ref_logps["before"] = self.logps["before"]
        return True

    def after(self, model, reference: Callable | None, reward: Callable | None = None) -> None:
        t0 = time.perf_counter()
        self._after(model, reference, reward)
        self.seconds += time.perf_counter() - t0

    def _before(self, model) -> None:
        self.samples["before"] = self._gen(model)
        self.logps["before"] = self._lp(model, self.samples["before"])
        if self.ref_is_initial:  # the policy is its reference: KL exactly 0
            self.ref_logps["before"] = self.logps["before"]

    def _after(self, model, reference: Callable | None, reward: Callable | None = None) -> None:
        self.samples["after"] = self._gen(model)
        self.logps["after"] = self._lp(model, self.samples["after"])
        if reference is not None:
            with reference() as ref:
                self.ref_logps["after"] = self._lp(ref, self.samples["after"])
                if not self.ref_is_initial:
                    self.ref_logps["before"] = self._lp(ref, self.samples["before"])
                    self.samples["reference"] = self._gen(ref)
        if reward is not None:
            with reward() as (rm, rtok):
                for phase, comps in self.samples.items():
                    self.scores[phase] = reward_scores(rm, rtok, self.tokenizer, self._ids(), comps,
                                                       self.batch_size)
        self._gather()

    def _gather(self) -> None:
        """Every process's share of answers and scores, in prompt order (nothing to do on one process)."""
        if distributed() is None:
            return
        tables = (self.samples, self.logps, self.ref_logps, self.scores)
        mine = [{phase: dict(zip(self.mine, values)) for phase, values in t.items()} for t in tables]
        for t, parts in zip(tables, zip(*gather([mine]))):
            for phase in t:
                merged = {i: v for part in parts for i, v in part[phase].items()}
                t[phase] = [merged[i] for i in range(len(self.prompts))]
        self.mine = list(range(len(self.prompts)))

    def metrics(self) -> tuple[dict[str, float], dict[str, float]]:
        """(before, after) metrics under eval_* names."""
        phases = {}
        for phase in ("before", "after"):
            m: dict[str, float] = {}
            lp, ref = self.logps.get(phase), self.ref_logps.get(phase)
            if lp is not None and ref is not None:
                diffs = [a[0] - b[0] for a, b in zip(lp, ref)]
                tokens = sum(n for _, n in lp)
                m["eval_kl"] = sum(diffs) / max(tokens, 1)
                m["eval_kl_seq"] = mean(diffs)
            if lp is not None:
                m["eval_completion_tokens"] = mean([float(n) for _, n in lp])
            if phase in self.scores:
                m["eval_reward_mean"] = mean(self.scores[phase])
                m["eval_reward_std"] = std(self.scores[phase])
            phases[phase] = {k: v for k, v in m.items() if math.isfinite(v)}
        after = phases["after"]
        if "before" in self.scores and "after" in self.scores:
            w = win_rate(self.scores["after"], self.scores["before"])
            after.update(eval_win_rate=w["rate"], eval_win_rate_low=w["low"], eval_win_rate_high=w["high"])
            if "before" in self.logps and "after" in self.logps:  # the same at equal answer length
                lc = lc_win_rate(self.scores["after"], self.scores["before"], [n for _, n in self.logps["after"]],
                                 [n for _, n in self.logps["before"]])
                after.update({k: v for k, v in (("eval_win_rate_lc", lc["rate"]), ("eval_win_rate_lc_low", lc["low"]),
                                                ("eval_win_rate_lc_high", lc["high"]),
                                                ("eval_win_rate_length_coef", lc["length_coef"]))
                              if math.isfinite(v)})
            ref = self.scores.get("reference", self.scores["before"] if self.ref_is_initial else None)
            if ref is not None:
                after["eval_win_rate_ref"] = win_rate(self.scores["after"], ref)["rate"]
        return phases["before"], after

    def rows(self) -> list[dict]:
        dec = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        out = []
        for i, prompt in enumerate(self.prompts):
            row = {"prompt": prompt if isinstance(prompt, str) else _last_user_turn(prompt) or dec(self.prompt_ids[i])}
            for phase, comps in self.samples.items():
                row[phase] = dec(comps[i])
            row["scores"] = {phase: s[i] for phase, s in self.scores.items()}
            row["kl"] = {phase: self.logps[phase][i][0] - self.ref_logps[phase][i][0]
                         for phase in self.logps if phase in self.ref_logps}
            out.append(row)
        return out

    def write(self, path: Path) -> None:
        from alignctl.fsutil import dumps, write_text_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, "".join(dumps(r).replace("\n", " ") + "\n" for r in self.rows()))

    def info(self) -> dict:
        s = self.settings
        return {"prompts": len(self.prompts), "max_new_tokens": s.max_new_tokens, "temperature": s.temperature,
                "seed": s.seed, "reward": s.reward, "interval": "95% Wilson score, ties count half",
                "lc_interval": "95% percentile bootstrap over prompts (alignctl.length_control)",
                "seconds": round(self.seconds, 2)}
