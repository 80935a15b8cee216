"""The one lifecycle every stage kind goes through, written once:

* **prepare**: the kind's ``build(ctx)`` (alignctl.stages) turns the stage's pieces (:mod:`alignctl.train.context`)
  into a :class:`Trainable`: one of TRL's trainers as it is, alignctl's PPO (:mod:`alignctl.rl`) or the generate
  kind's job;
* **evaluate before**: the held-out policy evaluation (samples, KL, reward; language-model outputs), the trainer's
  own ``evaluate()`` and alignctl's preference accuracy (the kind's ``preference_eval``). Sharded weights (ZeRO-3,
  FSDP) are evaluated inside ``train()`` at step 0 instead;
* **train**, resuming from the spec's checkpoint;
* **health**: a NaN/inf training loss, metric or weight fails the stage (:mod:`alignctl.train.health`);
* **evaluate after**, the same measures on the trained weights;
* **save** (rank 0; sharded weights are gathered on every rank): ``final/`` as a plain HF model (with LoRA:
  ``adapter/``, and the adapter merged into the base weights in memory; over a 4-bit or gathered base, merged into
  a fresh load of it once the trainer's memory is released) or the data set the kind generated, each written beside
  it and renamed into place after the entry's lock is checked (``owner_guard``).

The kind's ``extra_metrics`` may add to the metrics. Placing ``final/`` into the run folder is alignctl.store's.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from typing import Any, Protocol

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from alignctl import console, models
from alignctl.config.types import StageSpec
from alignctl.evaluate import pref_settings, preference_accuracy
from alignctl.train import before_cache, monitors
from alignctl.train.context import StageContext, checked_context, freeze_live_objects, release_memory, train_dir
from alignctl.train.health import check_healthy, check_saved_finite, check_weights_finite, is_number
from alignctl.train.phases import PhaseClock

log = logging.getLogger("alignctl")


class Trainable(Protocol):
    """What the lifecycle needs of a stage's trainer; TRL's trainers have it as they are.

    ``args`` is its config (``per_device_eval_batch_size`` is read for language-model outputs), ``state.log_history``
    every logged entry (the last values become the stage's train metrics, all of them ``log_history.json``);
    ``train`` returns an object whose ``metrics`` are added to those, or None; ``evaluate`` the held-out metrics (an
    empty dict: none of its own); ``save_model`` writes what final/ holds. Optional: ``ref_model``, the reference the
    held-out KL is measured against (None: the adapter disabled, else loaded from its folder), and ``reward_model``,
    an in-memory reward model the held-out answers are scored with instead of loading one (``audit_model``, when set,
    instead of that: an independent reward model that never trained the policy)."""

    model: Any
    args: Any
    state: Any

    def train(self, resume_from_checkpoint: str | None = None) -> Any: ...

    def evaluate(self) -> dict[str, Any]: ...

    def is_world_process_zero(self) -> bool: ...

    def save_model(self, output_dir: str | None = None) -> None: ...


@dataclass
class Saved:
    """What the save left to do once the trainer's memory is released."""
    merge: dict[str, Any] | None = None  # an adapter to merge into the base weights (models.merge_adapter's arguments)
    unchecked: bool = False  # weights saved without the in-memory NaN/inf check (gathered from shards)


def run_stage(spec: StageSpec) -> dict[str, Any]:
    """Train one stage; returns its metrics, with the wall time and peak memory of each phase under ``phases``
    (alignctl.train.phases). The stage's final/ exists only if this returns."""
    freeze_live_objects()
    clock = PhaseClock()
    with clock.phase("context"):  # tokenizer, data (from the cache the pre-flight filled), model checks
        ctx = checked_context(spec)
    ctx.phases = clock
    try:
        metrics, saved = train_stage(ctx)
    finally:
        del ctx
        release_memory()
    with clock.phase("merge"):
        _merge(spec, saved)
    metrics["phases"] = clock.records
    return metrics


def train_stage(ctx: StageContext) -> tuple[dict[str, Any], Saved]:
    """Prepare, evaluate before, train, check, evaluate after and save one stage (on every rank)."""
    name, kind, clock = ctx.spec.name, ctx.kind, ctx.phases
    with clock.phase("prepare"):  # the trainer's set-up (TRL tokenizes here), less the model loads inside it
        trainer = kind.build(ctx)
        monitor = _prepare(ctx, trainer)
    pref = preference_eval(ctx)
    with clock.phase("evaluate before"):
        kept = before_cache.load(ctx.spec)
        pe, at_start, before = _evaluate_before(ctx, trainer, pref, kept)
    resume = ctx.spec.resume_from
    if resume:
        log.info("[%s] resuming from %s", name, resume)
    with clock.phase("train"):
        result = trainer.train(resume_from_checkpoint=resume)
    if at_start is not None:
        before = at_start.metrics or {}
    with clock.phase("evaluate after"):
        after = evaluate(ctx, trainer, pref)
    train = final_train_metrics(trainer.state.log_history)
    train.update({k: v for k, v in (result.metrics if result is not None else {}).items() if is_number(v)})
    check_healthy(name, {"train": train, "after": after})  # before anything is sampled or saved
    gathered = weights_sharded(trainer)  # ZeRO-3 / FSDP: every rank takes part in the save
    if not gathered and kind.output != "data":  # a diverged model fails here, not inside the held-out sampling
        check_weights_finite(unwrapped(trainer.model), name)
    with clock.phase("evaluate after"):
        judge = getattr(trainer, "audit_model", None) or getattr(trainer, "reward_model", None)
        generated = ctx.finish_policy_eval(pe, trainer.model, getattr(trainer, "ref_model", None), judge)
    with clock.phase("save"):
        saved = _save(ctx, trainer, gathered)
    if at_start is None:
        before_cache.save(ctx.spec, policy=pe.before_state() if pe is not None else None,
                          pref={k: v for k, v in before.items() if k.startswith(PREF_KEYS)},
                          trainer={k: v for k, v in before.items() if not k.startswith(PREF_KEYS)})
    metrics: dict[str, Any] = {"train": train} if train else {}
    if before or after:
        metrics.update(before=before, after=after, **before_resumed(at_start is not None, resume))
    metrics = merge_eval(metrics, generated)
    if monitor is not None:
        metrics["monitors"] = monitor.summary()
    if kind.extra_metrics is not None:
        metrics = kind.extra_metrics(trainer, metrics)
    check_healthy(name, metrics)
    return metrics, saved


def _prepare(ctx: StageContext, trainer: Trainable) -> monitors.Monitor | None:
    """TRL's trainers: their logs to the run log, a 4-bit model's trainable dtype. On-policy stages: the
    reward-hacking monitors (alignctl.train.monitors) on every update, a TrainerCallback for TRL's trainers."""
    if isinstance(trainer, Trainer):
        log_to_run_log(trainer, ctx.spec.name)
        models.match_trainable_dtype(trainer.model, trainer.args)
    if not ctx.spec.monitors:
        return None
    monitor = monitors.Monitor(ctx.spec.monitors, ctx.spec.name)
    if isinstance(trainer, Trainer):
        trainer.add_callback(monitors.callback(monitor))
    else:
        trainer.monitor = monitor  # alignctl's PPO calls monitor.observe after every update
    return monitor


def preference_eval(ctx: StageContext) -> bool:
    """Whether alignctl's preference accuracy is measured on the held-out split: as the kind declares, and for
    ``"if_paired"`` (KTO) when that split holds pairs."""
    wanted = ctx.kind.preference_eval
    if wanted == "if_paired":
        return ctx.eval is not None and {"chosen", "rejected"} <= set(ctx.eval.column_names)
    return bool(wanted)


# -- evaluation -----------------------------------------------------------------------------------------------------
PREF_KEYS = "eval_pref_"  # alignctl's preference accuracy and margins (alignctl.evaluate.preference_accuracy)


def evaluate(ctx: StageContext, trainer: Trainable, preference_eval: bool, kept: dict | None = None
             ) -> dict[str, float]:
    """The trainer's held-out metrics, with alignctl's preference accuracy when asked for (at the stage's eval batch
    size and max_length, each process scoring its share); ``kept``: what alignctl.train.before_cache read back of
    the same evaluation (``trainer``, ``pref``), used instead of measuring it; nothing without a held-out split."""
    kept = kept or {}
    if ctx.eval is None:
        return {}
    metrics = dict(kept.get("trainer") or {k: v for k, v in trainer.evaluate().items() if is_number(v)})
    if preference_eval:
        metrics.update(kept.get("pref") or preference_accuracy(trainer.model, ctx.tokenizer, ctx.eval,
                                                               **pref_settings(trainer.args)))
    return metrics


def _evaluate_before(ctx: StageContext, trainer: Trainable, pref: bool, kept: dict[str, Any]):
    """(policy evaluation, the step-0 callback of sharded weights or None, the before metrics). ``kept``: what
    alignctl.train.before_cache kept of the same evaluation, used instead of measuring it again."""
    sharded = weights_sharded(trainer)
    pe = ctx.policy_eval(trainer.args.per_device_eval_batch_size, sharded) if ctx.kind.output == "causal_lm" \
        else None
    if pe is not None and not (kept.get("policy") and pe.restore_before(kept["policy"])):
        pe.before(trainer.model)
    at_start = _evaluate_at_start(ctx, trainer, pref) if sharded and ctx.eval is not None else None
    return pe, at_start, evaluate(ctx, trainer, pref, kept) if at_start is None else {}


class _BeforeEval(TrainerCallback):
    """Keeps the first evaluation of train() (the one at step 0) as the "before" metrics."""

    def __init__(self, ctx: StageContext, preference_eval: bool):
        self.ctx, self.preference_eval = ctx, preference_eval
        self.metrics: dict[str, float] | None = None

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if self.metrics is None:
            self.metrics = {k: v for k, v in (metrics or {}).items() if is_number(v)}
            if self.preference_eval:
                self.metrics.update(preference_accuracy(model, self.ctx.tokenizer, self.ctx.eval,
                                                        **pref_settings(args)))


def _evaluate_at_start(ctx: StageContext, trainer, preference_eval: bool) -> _BeforeEval:
    """The "before" evaluation of sharded weights: the Trainer cannot evaluate them before train() has prepared
    model and optimizer together (transformers 5.23 / accelerate 1.15 fail in train() after such an evaluation),
    so it runs inside train(), at step 0 on the same initial weights (TrainingArguments.eval_on_start). Returns
    a callback whose ``metrics`` hold the result once train() has started."""
    callback = _BeforeEval(ctx, preference_eval)
    trainer.add_callback(callback)
    trainer.args.eval_on_start = True
    return callback


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


def final_train_metrics(history: list[dict]) -> dict[str, float]:
    """The last logged value of every training metric (TRL's names)."""
    out: dict[str, float] = {}
    for entry in history:
        if any(k.startswith("eval_") for k in entry):
            continue
        out.update({k: v for k, v in entry.items() if is_number(v)})
    return out


# -- saving ---------------------------------------------------------------------------------------------------------
def weights_sharded(trainer) -> bool:
    """True under DeepSpeed ZeRO-3 or FSDP: no rank holds the full weights, so saving must gather them."""
    state = getattr(getattr(trainer, "accelerator", None), "state", None)
    deepspeed = getattr(state, "deepspeed_plugin", None)
    return (deepspeed is not None and getattr(deepspeed, "zero_stage", 0) == 3) or \
        getattr(state, "fsdp_plugin", None) is not None


def unwrapped(model):
    """The model without a DDP / DeepSpeed wrapper around it."""
    return getattr(model, "module", model)


def _save(ctx: StageContext, trainer: Trainable, gathered: bool) -> Saved:
    saved = Saved(unchecked=gathered)  # gathered weights: their saved files are checked instead
    if gathered:
        saved.merge = save_gathered(ctx, trainer)
    if trainer.is_world_process_zero():
        write_history(ctx, trainer.state.log_history)
        if not gathered:
            saved.merge = save(ctx, trainer)
    return saved


def write_history(ctx: StageContext, history: list[dict]) -> None:
    """Every logged metric per step (the report's training curves); nothing for a kind that logged none."""
    from alignctl.fsutil import dumps

    if history:
        (ctx.dir / "log_history.json").write_text(dumps(history))  # strict JSON: a NaN loss is written as null


def save(ctx: StageContext, trainer: Trainable) -> dict[str, Any] | None:
    """Save final/: a plain HF model, or the data set of a data-producing kind. With an adapter, the adapter goes to
    adapter/ now and the merge into the stage's initial weights (de-quantised under qlora) is returned, to be done
    into final/ once the trainer's memory is released."""
    if ctx.kind.output == "data":
        return _save_data(ctx, trainer)
    model = unwrapped(trainer.model)
    check_weights_finite(model, ctx.spec.name)
    method = ctx.peft["method"]
    if method == "none" or not models.is_peft_model(model):
        if method != "none":
            raise RuntimeError(f"stage {ctx.spec.name}: peft {method} is set but the trained model carries no adapter")
        models.save_final(model, ctx.tokenizer, ctx.dir / "final", ctx.guard)
        return None
    models.save_adapter(model, ctx.tokenizer, ctx.dir / "adapter", ctx.guard)
    if method == "lora":  # the base weights are in memory as loaded: merged here (4-bit bases are loaded again)
        merged = models.merge_loaded(model, ctx.tokenizer)
        check_weights_finite(merged, ctx.spec.name, "merged weights")  # a merge into fp16 weights can overflow
        models.save_final(merged, ctx.tokenizer, ctx.dir / "final", ctx.guard)
        return None
    return _merge_plan(ctx, ctx.dir / "adapter")


def _save_data(ctx: StageContext, trainer: Trainable) -> None:
    """final/ = the files the trainer's save_model writes, into a folder of its own renamed into place."""
    out = ctx.dir / "final"
    tmp = models.partial_dir(out, ctx.spec.attempt)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        trainer.save_model(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    models.place_dir(tmp, out, ctx.guard)
    return None


def save_gathered(ctx: StageContext, trainer) -> dict[str, Any] | None:
    """Save weights sharded across ranks: called on every rank, because the Trainer's ``save_model`` gathers the
    full 16-bit weights (ZeRO-3 with zero3_save_16bit_model, FSDP with FULL_STATE_DICT; alignctl.launch checks
    both at plan time) and rank 0 writes them. Result as in :func:`save`: final/ as a plain HF model, or with an
    adapter, adapter/ now and the merge to do."""
    adapter = ctx.peft["method"] != "none"
    out = ctx.dir / ("adapter" if adapter else "final")
    tmp = models.partial_dir(out, ctx.spec.attempt or "gathered")  # one name on every rank
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))
    if not trainer.is_world_process_zero():
        return None
    try:
        if not any(tmp.glob("*.safetensors")):
            raise RuntimeError(f"stage {ctx.spec.name}: the gathered save wrote no safetensors weights to {tmp}")
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; final/ holds only the model and tokenizer
        ctx.tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    models.place_dir(tmp, out, ctx.guard)
    return _merge_plan(ctx, out) if adapter else None


def _merge_plan(ctx: StageContext, adapter_dir) -> dict[str, Any]:
    return dict(base_path=ctx.init_path, adapter_dir=str(adapter_dir), out=str(ctx.dir / "final"),
                model_spec=ctx.model_spec, precision=ctx.precision, tokenizer=ctx.tokenizer, peft=ctx.peft,
                classifier=ctx.kind.output == "classifier", guard=ctx.guard)


def _merge(spec: StageSpec, saved: Saved) -> None:
    """An adapter merged into its base weights (the trainer's memory released); merged or gathered weights, which
    no in-memory check saw, checked in their files (a merge can overflow under fp16)."""
    from alignctl.ranks import rank_env

    if saved.merge:
        log.info("stage %s: merging the adapter into %s -> final/", spec.name, saved.merge["base_path"])
        models.merge_adapter(**saved.merge)
        release_memory()
    if (saved.merge or saved.unchecked) and rank_env()[0] == 0:
        check_saved_finite(train_dir(spec) / "final", spec.name)


# -- the run log ------------------------------------------------------------------------------------------------
class _LogToRunLog(TrainerCallback):
    """The trainer's logged metrics to the run log, one line per logging step (the log file only, unless -v)."""

    def __init__(self, stage: str):
        self.stage = stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
            log.info("[%s] step %d: %s", self.stage, state.global_step, shown, extra={"detail": True})


def log_to_run_log(trainer, stage: str) -> None:
    """Send the trainer's logged metrics to the run log, one line per logging step, instead of printing dicts."""
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_LogToRunLog(stage))
    trainer.add_callback(console.progress_callback(trainer, stage))  # the console's one bar (or line) per stage
