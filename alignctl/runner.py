"""Run one stage from its resolved spec: what every stage kind shares.

A stage module's ``run(ctx)`` builds its TRL trainer from the pieces this context
hands out (tokenizer, data, policy/reference models, the TRL config) and calls
``ctx.train_and_save``. The spec is the JSON written by the pipeline into the
stage's directory; nothing here reads Hydra.
"""

from __future__ import annotations

import gc
import json
import logging
import math
from pathlib import Path
from typing import Any

from alignctl import data, models

log = logging.getLogger("alignctl")


class StageContext:
    def __init__(self, spec: dict[str, Any]):
        from alignctl.stages import STAGES

        self.spec = spec
        self.kind = STAGES[spec["trainer"]]
        self.dir = Path(spec["output_dir"])
        self.model_spec = spec["model"]
        self.precision = spec["precision"]
        self.init_path = models.materialize(spec["init_path"], spec["cache_dir"])
        self.tokenizer = models.load_tokenizer(self.init_path, self.model_spec)
        self.train, self.eval = data.load(spec["data"], self.kind.data_kind, f"stages.{spec['name']}")

    # -- pieces for the stage modules -------------------------------------------------
    def load_policy(self):
        return models.load_causal_lm(self.init_path, self.model_spec, self.precision, self.tokenizer)

    def load_reference(self):
        """The reference model, or None when it is the stage's own initial weights (TRL then copies them)."""
        ref = models.materialize(self.spec.get("ref_path") or self.spec["init_path"], self.spec["cache_dir"])
        if ref == self.init_path:
            return None
        return models.load_causal_lm(ref, self.model_spec, self.precision, self.tokenizer)

    def peft_config(self):
        return None

    @staticmethod
    def args_for(spec: dict[str, Any]) -> dict[str, Any]:
        """The stage's TRL config fields, plus what alignctl fills in (output_dir, bf16/fp16 from precision)."""
        args = dict(spec["args"])
        if "bf16" not in args and "fp16" not in args:
            args.update(models.mixed_precision_args(spec["precision"]))
        args.setdefault("disable_tqdm", True)  # progress goes to the run log, one line per logging step
        args["output_dir"] = str(Path(spec["output_dir"]) / "checkpoints")
        return args

    def trl_config(self, cls):
        return cls(**self.args_for(self.spec))

    # -- training ---------------------------------------------------------------------
    def evaluate(self, trainer, preference_eval: bool) -> dict[str, float]:
        if self.eval is None:
            return {}
        metrics = {k: v for k, v in trainer.evaluate().items() if _is_number(v)}
        if preference_eval:
            from alignctl.evaluate import preference_accuracy

            metrics.update(preference_accuracy(trainer.model, self.tokenizer, self.eval))
        return metrics

    def train_and_save(self, trainer, preference_eval: bool = False, save=None) -> dict[str, Any]:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # metrics go to the run log through _LogCallback instead
        trainer.add_callback(_LogCallback(self.spec["name"]))
        before = self.evaluate(trainer, preference_eval)
        result = trainer.train()
        after = self.evaluate(trainer, preference_eval)
        train = _final_train_metrics(trainer.state.log_history)
        train.update({k: v for k, v in result.metrics.items() if _is_number(v)})
        (save or self.save)(trainer)
        metrics = {"train": train}
        if self.eval is not None:
            metrics.update(before=before, after=after)
        return metrics

    def save(self, trainer) -> None:
        model = trainer.model
        models.save_final(getattr(model, "module", model), self.tokenizer, self.dir / "final")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _final_train_metrics(history: list[dict]) -> dict[str, float]:
    """The last logged value of every training metric (TRL's names)."""
    out: dict[str, float] = {}
    for entry in history:
        if any(k.startswith("eval_") for k in entry):
            continue
        out.update({k: v for k, v in entry.items() if _is_number(v)})
    return out


def _make_callback():
    from transformers import TrainerCallback

    class LogCallback(TrainerCallback):
        def __init__(self, stage: str):
            self.stage = stage

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
                log.info("[%s] step %d: %s", self.stage, state.global_step, shown)

    return LogCallback


def _LogCallback(stage: str):
    return _make_callback()(stage)


def run_stage(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one stage; returns its metrics. The stage's final/ exists only if this returns."""
    from alignctl.stages import module

    ctx = StageContext(spec)
    try:
        return module(spec["trainer"]).run(ctx)
    finally:
        del ctx
        _release_memory()


def _release_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def load_spec(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
