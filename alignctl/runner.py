"""Run one stage from its resolved spec: what every stage kind shares.

A stage module's ``run(ctx)`` builds its TRL trainer from the pieces this context
hands out (tokenizer, data, policy/reference models, the TRL config) and calls
``ctx.train_and_save``. The spec is the JSON written by the pipeline into the
stage's directory; nothing here reads Hydra.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
from pathlib import Path
from typing import Any

from alignctl import console, data, models

log = logging.getLogger("alignctl")


class StageContext:
    def __init__(self, spec: dict[str, Any]):
        from alignctl.stages import STAGES

        self.spec = spec
        self.kind = STAGES[spec["trainer"]]
        self.dir = Path(spec["output_dir"])
        self.model_spec = spec["model"]
        self.precision = spec["precision"]
        self.init_path = models.materialize(spec["init_path"], spec["cache_dir"], self.model_spec)
        self.tokenizer = models.load_tokenizer(self.init_path, self.model_spec)
        self.train, self.eval = data.load(spec["data"], self.kind.data_kind, f"stages.{spec['name']}")
        self.guard = owner_guard(spec)

    # -- pieces for the stage modules -------------------------------------------------
    @property
    def peft(self) -> dict[str, Any]:
        """The stage's resolved peft setting: method none | lora | qlora and its fields (configs/peft)."""
        return self.spec.get("peft") or {"method": "none"}

    def load_policy(self):
        """The stage's initial weights as the model to train: under qlora a 4-bit base prepared for k-bit training;
        under lora/qlora the trainer adds the adapter (``peft_config()``)."""
        model = models.load_causal_lm(self.init_path, self.model_spec, self.precision, self.tokenizer, peft=self.peft)
        return models.prepare_for_training(model, self.peft, *self._checkpointing())

    def load_reference(self):
        """The reference model, or None when it is the stage's own initial weights: then TRL copies them under full
        fine-tuning, and with an adapter (lora/qlora) it computes the reference by disabling the adapter, i.e. on
        these very weights, without a second copy. Another reference (``ref:`` naming another stage) is loaded,
        in 4 bits under qlora."""
        ref = models.materialize(self.spec.get("ref_path") or self.spec["init_path"], self.spec["cache_dir"],
                                 self.model_spec)
        if ref == self.init_path:
            return None
        return models.load_causal_lm(ref, self.model_spec, self.precision, self.tokenizer, peft=self.peft)

    def load_classifier(self, path: str | None = None, model_spec: dict[str, Any] | None = None):
        """A one-output sequence classifier from ``path`` (default: the stage's initial weights), e.g. a reward model.
        The stage's own classifier (no ``path``) follows the stage's peft setting; linked reward/value models load
        in the compute dtype, with ``model_spec`` (a link's own, :meth:`link_model`; default the base model's)."""
        if path is None:
            model = models.load_sequence_classifier(self.init_path, self.model_spec, self.precision, self.tokenizer,
                                                    peft=self.peft)
            return models.prepare_for_training(model, self.peft, *self._checkpointing())
        spec = model_spec or self.model_spec
        path = models.materialize(path, self.spec["cache_dir"], spec)
        return models.load_sequence_classifier(path, spec, self.precision, self.tokenizer)

    def link_model(self, name: str) -> tuple[str, dict[str, Any]]:
        """(loadable path, model spec) of the model of link ``name`` (reward, value, judge; alignctl.config.links): a stage
        of the recipe loads with the base model's settings, a model outside it with its own (revision, remote code
        only with the stage's consent, its own chat template)."""
        from alignctl.config import links

        path = self.spec[links.BY_NAME[name].path_key]
        spec = models.link_model_spec(self.model_spec, links.load_settings(self.spec, name), path)
        return models.materialize(path, self.spec["cache_dir"], spec), spec

    def link_tokenizer(self, name: str):
        """The tokenizer of link ``name``'s model (with its own chat template when it is outside the recipe)."""
        return models.load_tokenizer(*self.link_model(name))

    def load_reward_model(self):
        """The model of the stage's `reward` link (a reward stage's final/ or a model outside the recipe)."""
        return self.load_classifier(*self.link_model("reward"))

    def load_value_model(self):
        """The value model of the stage's `value` link; by default initialised from the reward model."""
        return self.load_classifier(*self.link_model("value" if self.spec.get("value_path") else "reward"))

    def peft_config(self):
        """The peft.LoraConfig for the trainer's ``peft_config`` (None under full fine-tuning). A classifier stage
        (reward) gets task SEQ_CLS, which keeps its score head trainable and saves it with the adapter."""
        return models.lora_config(self.peft, "SEQ_CLS" if self.kind.output == "classifier" else "CAUSAL_LM")

    def _checkpointing(self) -> tuple[bool, dict | None]:
        """The stage's effective activation (gradient) checkpointing setting: its TRL config's, defaults included."""
        import importlib

        module, _, cls = self.kind.config_class.rpartition(".")
        config = getattr(importlib.import_module(module), cls)(**self.args_for(self.spec))
        return bool(config.activation_checkpointing), config.activation_checkpointing_kwargs

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
        if preference_eval:  # at the stage's eval batch size and max_length, each process scoring its share
            from alignctl.evaluate import pref_settings, preference_accuracy

            metrics.update(preference_accuracy(trainer.model, self.tokenizer, self.eval, **pref_settings(trainer.args)))
        return metrics

    # -- generation-based evaluation of a policy (alignctl.evaluate.PolicyEval) -------------------------------------
    def policy_eval(self, batch_size: int | None = None):
        """The stage's before/after evaluation on held-out prompts, or None: switched off (``eval.enabled``), not a
        language-model stage, no held-out prompts, or several processes (then ``alignctl eval <run dir>`` does it
        afterwards on one process; the reason is kept in the manifest under ``metrics.eval.skipped``)."""
        from alignctl import evaluate
        from alignctl.ranks import rank_env

        settings = self.spec.get("eval")
        self.eval_skipped = None
        if not settings or not settings.get("enabled") or self.kind.output != "causal_lm":
            return None
        if rank_env()[2] > 1:
            self.eval_skipped = "several processes: run `alignctl eval <run dir>` for samples, KL and win rate"
            return None
        if settings.get("prompts_data"):
            train, held = data.load(settings["prompts_data"], "prompt", "eval.prompts")
            prompts = evaluate.held_out_prompts(held if held is not None else train, settings["max_prompts"])
        else:
            prompts = evaluate.held_out_prompts(self.eval, settings["max_prompts"])
        if not prompts:
            self.eval_skipped = "no held-out prompts (set eval.prompts=<data name>)"
            return None
        ref = self.spec.get("ref_path") or self.spec["init_path"]
        batch = batch_size or self.spec["args"].get("per_device_eval_batch_size", 8)
        return evaluate.PolicyEval(settings, self.tokenizer, prompts, batch,
                                   ref_is_initial=ref == self.spec["init_path"])

    eval_skipped: str | None = None

    def finish_policy_eval(self, pe, model, ref_model=None, reward_model=None, samples_to: Path | None | str = "stage"
                           ) -> dict[str, Any]:
        """After training: the policy's samples, KL to its reference (``ref_model``, else the adapter disabled, else
        the reference loaded from its folder) and reward scores; writes the samples (default <stage>/samples.jsonl);
        returns {before, after, eval}."""
        if pe is None:
            if self.eval_skipped:
                log.info("[%s] held-out answers not evaluated: %s", self.spec["name"], self.eval_skipped)
            return {"eval": {"skipped": self.eval_skipped}} if self.eval_skipped else {}
        pe.after(model, lambda: self._reference(model, ref_model, pe.ref_is_initial),
                 self._reward(reward_model, model) if pe.settings.get("reward_path") or reward_model is not None
                 else None)
        if samples_to is not None:
            pe.write(self.dir / "samples.jsonl" if samples_to == "stage" else Path(samples_to))
        before, after = pe.metrics()
        out = {"before": before, "after": after, "eval": pe.info()}
        line = console.eval_line(self.spec["name"], out)
        if line:
            log.info("%s", line)
        return out

    @contextlib.contextmanager
    def _reference(self, model, ref_model, ref_is_initial: bool):
        if ref_model is not None:
            yield ref_model
        elif ref_is_initial and models.is_peft_model(model):  # the initial weights = the adapter disabled
            with model.disable_adapter():
                yield model
        else:
            path = models.materialize(self.spec.get("ref_path") or self.spec["init_path"], self.spec["cache_dir"],
                                      self.model_spec)
            ref = _to_device(models.load_causal_lm(path, self.model_spec, self.precision, self.tokenizer,
                                                   peft=self.peft), model)
            try:
                yield ref
            finally:
                del ref
                _release_memory()

    def _reward(self, reward_model, like):
        @contextlib.contextmanager
        def factory():
            if reward_model is not None:
                yield reward_model, self.tokenizer
                return
            settings = self.spec["eval"]  # eval.reward outside the recipe: its own settings, never remote code
            spec = models.link_model_spec(self.model_spec, settings.get("reward_load"), settings["reward_path"])
            path = models.materialize(settings["reward_path"], self.spec["cache_dir"], spec)
            rtok = models.load_tokenizer(path, spec)
            rm = _to_device(self.load_classifier(path, spec), like)
            try:
                yield rm, rtok
            finally:
                del rm
                _release_memory()
        return factory

    def train_and_save(self, trainer, preference_eval: bool = False, save=None) -> dict[str, Any]:
        log_to_run_log(trainer, self.spec["name"])
        models.match_trainable_dtype(trainer.model, trainer.args)
        pe = self.policy_eval(trainer.args.per_device_eval_batch_size)
        if pe is not None:
            pe.before(trainer.model)
        # ZeRO-3 / FSDP (issue 6): the "before" evaluation runs inside train(), at step 0
        at_start = self._evaluate_at_start(trainer, preference_eval) if self.eval is not None and \
            _weights_sharded(trainer) else None
        before = self.evaluate(trainer, preference_eval) if at_start is None else {}
        resume = self.spec.get("resume_from")
        if resume:
            log.info("[%s] resuming from %s", self.spec["name"], resume)
        result = trainer.train(resume_from_checkpoint=resume)
        if at_start is not None:
            before = at_start.metrics or {}
        after = self.evaluate(trainer, preference_eval)
        train = _final_train_metrics(trainer.state.log_history)
        train.update({k: v for k, v in result.metrics.items() if _is_number(v)})
        check_healthy(self.spec["name"], {"train": train, "after": after})  # before anything is sampled or saved
        gathered = save is None and _weights_sharded(trainer)  # ZeRO-3 / FSDP (issue 6): every rank saves
        self.saved_unchecked = gathered  # its saved files are checked instead (check_saved_finite)
        if not gathered:  # a diverged model fails here, not inside the sampling of the held-out evaluation
            check_weights_finite(getattr(trainer.model, "module", trainer.model), self.spec["name"])
        generated = self.finish_policy_eval(pe, trainer.model, getattr(trainer, "ref_model", None))
        if gathered:
            self.save_gathered(trainer)
        if trainer.is_world_process_zero():
            self.write_history(trainer.state.log_history)
            if not gathered:
                (save or self.save)(trainer)
        metrics = {"train": train}
        if self.eval is not None:
            metrics.update(before=before, after=after, **before_resumed(at_start is not None, resume))
        return merge_eval(metrics, generated)

    def write_history(self, history: list[dict]) -> None:
        """Every logged metric per step (the report's training curves)."""
        from alignctl.fsutil import dumps

        (self.dir / "log_history.json").write_text(dumps(history))  # strict JSON: a NaN loss is written as null

    def save(self, trainer) -> None:
        """Save the trained model: final/ as a plain HF model. With an adapter, the adapter goes to adapter/ now and
        is merged into the stage's initial weights (de-quantised under qlora) into final/ once the trainer's memory
        is released (``run_stage`` calls ``merge``)."""
        model = trainer.model
        model = getattr(model, "module", model)
        check_weights_finite(model, self.spec["name"])
        if self.peft["method"] == "none" or not models.is_peft_model(model):
            if self.peft["method"] != "none":
                raise RuntimeError(f"stage {self.spec['name']}: peft {self.peft['method']} is set but the trained "
                                   "model carries no adapter")
            models.save_final(model, self.tokenizer, self.dir / "final", self.guard)
            return
        models.save_adapter(model, self.tokenizer, self.dir / "adapter", self.guard)
        self.pending_merge = dict(base_path=self.init_path, adapter_dir=str(self.dir / "adapter"),
                                  out=str(self.dir / "final"), model_spec=self.model_spec, precision=self.precision,
                                  tokenizer=self.tokenizer, peft=self.peft, classifier=self.kind.output == "classifier",
                                  guard=self.guard)

    pending_merge: dict[str, Any] | None = None
    saved_unchecked = False  # weights saved without the in-memory NaN/inf check (gathered from shards)

    # -- sharded weights (DeepSpeed ZeRO-3, FSDP; issue 6) ----------------------------------------------------------
    def _evaluate_at_start(self, trainer, preference_eval: bool):
        """The "before" evaluation of sharded weights: the Trainer cannot evaluate them before train() has prepared
        model and optimizer together (transformers 5.23 / accelerate 1.15 fail in train() after such an evaluation),
        so it runs inside train(), at step 0 on the same initial weights (TrainingArguments.eval_on_start). Returns
        a callback whose ``metrics`` hold the result once train() has started."""
        from transformers import TrainerCallback

        ctx = self

        class BeforeEval(TrainerCallback):
            metrics: dict[str, float] | None = None

            def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
                if self.metrics is None:  # the first evaluation of train() is the one at step 0
                    self.metrics = {k: v for k, v in (metrics or {}).items() if _is_number(v)}
                    if preference_eval:
                        from alignctl.evaluate import pref_settings, preference_accuracy

                        self.metrics.update(preference_accuracy(model, ctx.tokenizer, ctx.eval, **pref_settings(args)))

        callback = BeforeEval()
        trainer.add_callback(callback)
        trainer.args.eval_on_start = True
        return callback

    def save_gathered(self, trainer) -> None:
        """Save weights sharded across ranks: called on every rank, because the Trainer's ``save_model`` gathers the
        full 16-bit weights (ZeRO-3 with zero3_save_16bit_model, FSDP with FULL_STATE_DICT; alignctl.launch checks
        both at plan time) and rank 0 writes them. Result as in :meth:`save`: final/ as a plain HF model, or with an
        adapter, adapter/ now and final/ by the merge once memory is released."""
        import shutil

        adapter = self.peft["method"] != "none"
        out = self.dir / ("adapter" if adapter else "final")
        tmp = models.partial_dir(out, self.spec.get("attempt") or "gathered")  # one name on every rank
        if trainer.is_world_process_zero():
            shutil.rmtree(tmp, ignore_errors=True)
        trainer.save_model(str(tmp))
        if not trainer.is_world_process_zero():
            return
        try:
            if not any(tmp.glob("*.safetensors")):
                raise RuntimeError(f"stage {self.spec['name']}: the gathered save wrote no safetensors weights to "
                                   f"{tmp}")
            (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; final/ holds only the model and tokenizer
            self.tokenizer.save_pretrained(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        models.place_dir(tmp, out, self.guard)
        if adapter:  # the same merge as save() sets up
            self.pending_merge = dict(base_path=self.init_path, adapter_dir=str(out), out=str(self.dir / "final"),
                                      model_spec=self.model_spec, precision=self.precision, tokenizer=self.tokenizer,
                                      peft=self.peft, classifier=self.kind.output == "classifier", guard=self.guard)


def owner_guard(spec: dict[str, Any]):
    """What rank 0 (or the local process) calls right before it replaces the entry's final/ or adapter/: raises
    :class:`alignctl.errors.LockLost` unless the entry's lock file still holds the orchestrator's token (the spec's
    ``lock_token``); None for a spec without one (alignctl eval/generate, tests)."""
    from alignctl import fsutil

    token = spec.get("lock_token")
    if not token:
        return None
    path = Path(spec["output_dir"]) / ".lock"
    return lambda: fsutil.check_owner(path, token, f"stage {spec.get('name')}")


def before_resumed(sharded_before: bool, resume: str | None) -> dict[str, bool]:
    """Under ZeRO-3 / FSDP the "before" evaluation runs inside train(), after a resume has loaded the checkpoint's
    weights: then it measured those, not the initial weights, and the metrics say so (the report shows it)."""
    return {"before_resumed": True} if sharded_before and resume else {}


def merge_eval(metrics: dict[str, Any], generated: dict[str, Any]) -> dict[str, Any]:
    """Stage metrics with the policy evaluation's before/after metrics added (and its settings under ``eval``)."""
    for key in ("before", "after"):
        if key in generated:
            metrics[key] = {**metrics.get(key, {}), **generated[key]}
    if "eval" in generated:
        metrics["eval"] = generated["eval"]
    return metrics


def _to_device(model, like):
    """``model`` on the device of ``like`` (4-bit models stay where bitsandbytes placed them)."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return model
    return model.to(next(like.parameters()).device)


def _weights_sharded(trainer) -> bool:
    """True under DeepSpeed ZeRO-3 or FSDP: no rank holds the full weights, so saving must gather them."""
    state = getattr(getattr(trainer, "accelerator", None), "state", None)
    deepspeed = getattr(state, "deepspeed_plugin", None)
    return (deepspeed is not None and getattr(deepspeed, "zero_stage", 0) == 3) or \
        getattr(state, "fsdp_plugin", None) is not None


def _is_number(v) -> bool:
    """A numeric metric, NaN and inf included: :func:`check_healthy` must see them (JSON writers map them to null)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _non_finite(metrics: Any, path: str = "") -> list[str]:
    if isinstance(metrics, dict):
        return [p for k, v in metrics.items() for p in _non_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(metrics, float) and not math.isfinite(metrics):
        return [f"{path}={metrics}"]
    return []


def _diverged(stage: str, what: list[str]):
    from alignctl.errors import StageFailed

    shown = ", ".join(what[:4]) + (f" and {len(what) - 4} more" if len(what) > 4 else "")
    return StageFailed(stage, "(training diverged)", f"non-finite {shown}; nothing was stored as complete. Lower "
                       f"stages.{stage}.learning_rate (or use bf16/fp32 instead of fp16) and run again")


def check_healthy(stage: str, metrics: dict) -> None:
    """Fail the stage when a training loss or a metric after training is NaN/inf (a diverged stage must never be
    stored as complete, hence reused). Only losses count among training metrics: under fp16 a grad_norm of inf is a
    step the loss scaler skipped, not a failure."""
    train = {k: v for k, v in (metrics.get("train") or {}).items() if "loss" in k}
    bad = _non_finite({"train": train, **{k: v for k, v in metrics.items() if k not in ("train", "before")}})
    if bad:
        raise _diverged(stage, bad)


def check_saved_finite(folder: str | Path, stage: str) -> None:
    """Fail the stage when a saved weight in ``folder``'s safetensors files is NaN/inf: for weights that never went
    through :func:`check_weights_finite` (an adapter merged into the base, weights gathered from ZeRO-3/FSDP shards).
    Streams one tensor at a time (memory-mapped), in chunks."""
    import torch
    from safetensors import safe_open

    bad = []
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                t = h.get_tensor(name)
                if t.is_floating_point() and t.numel() and \
                        not all(bool(torch.isfinite(c).all()) for c in t.reshape(-1).split(1 << 24)):
                    bad.append(name)
                del t
    if bad:
        raise _diverged(stage, [f"saved weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"])


def check_weights_finite(model, stage: str) -> None:
    """Fail the stage when a weight is NaN/inf (the Trainer's logging_nan_inf_filter can hide a NaN loss)."""
    import torch

    with torch.no_grad():
        bad = [n for n, p in model.named_parameters() if p.numel() and not bool(torch.isfinite(p).all())]
    if bad:
        raise _diverged(stage, [f"weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"])


def _final_train_metrics(history: list[dict]) -> dict[str, float]:
    """The last logged value of every training metric (TRL's names)."""
    out: dict[str, float] = {}
    for entry in history:
        if any(k.startswith("eval_") for k in entry):
            continue
        out.update({k: v for k, v in entry.items() if _is_number(v)})
    return out


def log_to_run_log(trainer, stage: str) -> None:
    """Send the trainer's logged metrics to the run log, one line per logging step, instead of printing dicts."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    class LogCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
                log.info("[%s] step %d: %s", stage, state.global_step, shown, extra={"detail": True})  # log only

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(LogCallback())
    trainer.add_callback(console.progress_callback(trainer, stage))  # the console's one bar (or line) per stage


def run_stage(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one stage; returns its metrics. The stage's final/ exists only if this returns."""
    from alignctl.ranks import rank_env
    from alignctl.stages import module

    ctx = _checked_context(spec)
    try:
        metrics = module(spec["trainer"]).run(ctx)
        check_healthy(spec["name"], metrics)
        merge, unchecked = ctx.pending_merge, ctx.saved_unchecked
    finally:
        del ctx
        _release_memory()
    if merge:  # an adapter was trained: final/ = it merged into the base weights, with the trainer's memory freed
        log.info("stage %s: merging the adapter into %s -> final/", spec["name"], merge["base_path"])
        models.merge_adapter(**merge)
        _release_memory()
    if (merge or unchecked) and rank_env()[0] == 0:  # a merge can overflow (fp16); gathered shards were unchecked
        check_saved_finite(Path(spec["output_dir"]) / "final", spec["name"])
    return metrics


def _checked_context(spec: dict[str, Any]) -> StageContext:
    """The stage's context, its models and data being the ones fingerprinted at the start of the run: local model
    folders are compared before anything loads them (rank 0), the data by its load (data.load) and again after it
    (rank 0); a difference stops the stage before it trains."""
    from alignctl import store
    from alignctl.errors import DataChanged, ModelChanged, StageFailed
    from alignctl.ranks import rank_env

    try:
        if rank_env()[0] == 0:
            store.check_models_unchanged(spec)
        ctx = StageContext(spec)
        if rank_env()[0] == 0:
            store.check_data_unchanged(spec)
    except DataChanged as e:
        what = "(its model changed)" if isinstance(e, ModelChanged) else "(its data changed)"
        raise StageFailed(spec["name"], what, str(e)) from None
    return ctx


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
