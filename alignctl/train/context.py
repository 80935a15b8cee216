"""The pieces a stage kind builds its trainer from: :class:`StageContext` (tokenizer, data, policy / reference /
classifier / link models, the TRL config, the peft config, the held-out policy evaluation), read from the stage's
:class:`~alignctl.config.types.StageSpec` (what ``spec.json`` holds; nothing here reads Hydra).

A stage kind's ``build(ctx)`` (alignctl.stages) takes these pieces and returns its trainer; the lifecycle that
trains, evaluates and saves it is :mod:`alignctl.train.lifecycle`, the same for every kind.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
from pathlib import Path
from typing import Any

from alignctl import console, data, models
from alignctl.config.types import StageSpec
from alignctl.ranks import rank_env
from alignctl.train.phases import NO_CLOCK

log = logging.getLogger("alignctl")


def train_dir(spec: StageSpec) -> Path:
    """Where the stage trains and saves: its store entry (or, outside a run, its stage folder)."""
    return Path(spec.entry_dir or spec.stage_dir)


def owner_guard(spec: StageSpec):
    """What rank 0 (or the local process) calls right before it replaces the entry's final/ or adapter/: raises
    :class:`alignctl.errors.LockLost` unless the entry's lock file still holds the orchestrator's token (the spec's
    ``lock_token``); None for a spec without one (alignctl eval/generate, tests)."""
    from alignctl import fsutil

    token = spec.lock_token
    if not token:
        return None
    path = train_dir(spec) / ".lock"
    return lambda: fsutil.check_owner(path, token, f"stage {spec.name}")


def freeze_live_objects() -> None:
    """Move every object alive now (at a stage's start: mostly the imported libraries, ~500k objects once torch,
    transformers and TRL are loaded) to the garbage collector's permanent generation, after a collection. The full
    collections that free a stage's dropped models (:func:`release_memory`) then scan only what came after: ~0.2 s
    each on 2 CPU cores before, milliseconds after. What is frozen is never collected, so only what is alive when a
    stage starts is frozen (the previous stage's models were collected when it ended)."""
    gc.collect()
    gc.freeze()


def release_memory() -> None:
    """Free what Python and the accelerator's caching allocator still hold after a model was dropped."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def to_device(model, like):
    """``model`` on the device of ``like`` (4-bit models stay where bitsandbytes placed them)."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return model
    return model.to(next(like.parameters()).device)


def checked_context(spec: StageSpec) -> StageContext:
    """The stage's context, its models and data being the ones fingerprinted at the start of the run: local model
    folders are compared before anything loads them (rank 0), the data by its load (data.load) and again after it
    (rank 0); a difference stops the stage before it trains."""
    from alignctl import fingerprint
    from alignctl.errors import DataChanged, ModelChanged, StageFailed

    try:
        if rank_env()[0] == 0:
            fingerprint.check_models_unchanged(spec)
        ctx = StageContext(spec)
        if rank_env()[0] == 0:
            fingerprint.check_data_unchanged(spec)
    except DataChanged as e:
        what = "(its model changed)" if isinstance(e, ModelChanged) else "(its data changed)"
        raise StageFailed(spec.name, what, str(e)) from None
    return ctx


class StageContext:
    phases = NO_CLOCK  # the lifecycle's PhaseClock (alignctl.train.phases): model loads are a phase of their own

    def __init__(self, spec: StageSpec):
        from alignctl.stages import STAGES

        self.spec = spec
        self.kind = STAGES[spec.kind]
        self.dir = train_dir(spec)
        self.model_spec = spec.model
        self.precision = spec.precision
        self.init_path = models.materialize(spec.source.path, spec.cache_dir, self.model_spec)
        source = spec.source  # an earlier stage's final/ in the run folder: named by the stage (models.load_tokenizer)
        self.tokenizer = models.load_tokenizer(self.init_path, self.model_spec,
                                               f"{source.stage}/final" if source.stage else None)
        self.train, self.eval = data.load(spec.data, self.kind.data_kind, f"stages.{spec.name}")
        self.guard = owner_guard(spec)

    # -- pieces for the stage kinds ---------------------------------------------------------------------------------
    @property
    def peft(self) -> dict[str, Any]:
        """The stage's resolved peft setting: method none | lora | qlora and its fields (configs/peft)."""
        return self.spec.peft or {"method": "none"}

    def load_policy(self):
        """The stage's initial weights as the model to train: under qlora a 4-bit base prepared for k-bit training;
        under lora/qlora the trainer adds the adapter (``peft_config()``)."""
        with self.phases.phase("model load"):
            model = models.load_causal_lm(self.init_path, self.model_spec, self.precision, self.tokenizer,
                                          peft=self.peft)
            return models.prepare_for_training(model, self.peft, *self._checkpointing())

    def reference_path(self) -> str:
        """The reference model's path as the spec names it: the ``ref`` link's, by default the initial weights'."""
        ref = self.spec.link("ref")
        return ref.path if ref is not None and ref.path else self.spec.source.path

    def load_reference(self):
        """The reference model, or None when it is the stage's own initial weights: then TRL copies them under full
        fine-tuning, and with an adapter (lora/qlora) it computes the reference by disabling the adapter, i.e. on
        these very weights, without a second copy. Another reference (``ref:`` naming another stage) is loaded,
        in 4 bits under qlora."""
        ref = models.materialize(self.reference_path(), self.spec.cache_dir, self.model_spec)
        if ref == self.init_path:
            return None
        with self.phases.phase("model load"):
            return models.load_causal_lm(ref, self.model_spec, self.precision, self.tokenizer, peft=self.peft)

    def load_classifier(self, path: str | None = None, model_spec: Any = None):
        """A one-output sequence classifier from ``path`` (default: the stage's initial weights), e.g. a reward model.
        The stage's own classifier (no ``path``) follows the stage's peft setting; linked reward/value models load
        in the compute dtype, with ``model_spec`` (a link's own, :meth:`link_model`; default the base model's)."""
        with self.phases.phase("model load"):
            if path is None:
                model = models.load_sequence_classifier(self.init_path, self.model_spec, self.precision,
                                                        self.tokenizer, peft=self.peft)
                return models.prepare_for_training(model, self.peft, *self._checkpointing())
            spec = model_spec or self.model_spec
            path = models.materialize(path, self.spec.cache_dir, spec)
            return models.load_sequence_classifier(path, spec, self.precision, self.tokenizer)

    def link_model(self, name: str) -> tuple[str, Any]:
        """(loadable path, model spec) of the model of link ``name`` (reward, value, judge; alignctl.links): a stage
        of the recipe loads with the base model's settings, a model outside it with its own (revision, remote code
        only with the stage's consent, its own chat template)."""
        link = self.spec.links[name]
        load = {"revision": link.revision, "trust_remote_code": link.trust_remote_code} if link.external else None
        spec = models.link_model_spec(self.model_spec, load, link.path)
        return models.materialize(link.path, self.spec.cache_dir, spec), spec

    def link_tokenizer(self, name: str):
        """The tokenizer of link ``name``'s model (with its own chat template when it is outside the recipe)."""
        return models.load_tokenizer(*self.link_model(name))

    def load_reward_model(self):
        """The model of the stage's `reward` link (a reward stage's final/ or a model outside the recipe)."""
        return self.load_classifier(*self.link_model("reward"))

    def load_value_model(self):
        """The value model of the stage's `value` link; by default initialised from the reward model."""
        value = self.spec.link("value")
        return self.load_classifier(*self.link_model("value" if value is not None and value.path else "reward"))

    def peft_config(self):
        """The peft.LoraConfig for the trainer's ``peft_config`` (None under full fine-tuning). A classifier stage
        (reward) gets task SEQ_CLS, which keeps its score head trainable and saves it with the adapter."""
        return models.lora_config(self.peft, "SEQ_CLS" if self.kind.output == "classifier" else "CAUSAL_LM")

    def _checkpointing(self) -> tuple[bool, dict | None]:
        """The stage's effective activation (gradient) checkpointing setting: its TRL config's, defaults included."""
        module, _, cls = self.kind.config_class.rpartition(".")
        config = getattr(importlib.import_module(module), cls)(**self.args_for(self.spec))
        return bool(config.activation_checkpointing), config.activation_checkpointing_kwargs

    @staticmethod
    def args_for(spec: StageSpec) -> dict[str, Any]:
        """The stage's TRL config fields, plus what alignctl fills in (output_dir, bf16/fp16 from precision)."""
        args = dict(spec.args)
        if "bf16" not in args and "fp16" not in args:
            args.update(models.mixed_precision_args(spec.precision))
        args.setdefault("disable_tqdm", True)  # progress goes to the run log, one line per logging step
        args["output_dir"] = str(train_dir(spec) / "checkpoints")
        return args

    def trl_config(self, cls):
        """The kind's TRL config of this stage; a ``dataset_num_proc`` left unset becomes
        :func:`alignctl.data.tokenize_procs`'s (run time only: the tokenized rows are the same whatever it is, so it
        is no part of the fingerprint)."""
        args = self.args_for(self.spec)
        if args.get("dataset_num_proc") is None and "dataset_num_proc" in getattr(cls, "__dataclass_fields__", {}):
            procs = data.tokenize_procs(len(self.train) + (len(self.eval) if self.eval is not None else 0))
            if procs > 1:
                args["dataset_num_proc"] = procs
                log.info("[%s] tokenizing with %d processes (dataset_num_proc; set it to choose)", self.spec.name,
                         procs)
        return cls(**args)

    # -- generation-based evaluation of a policy (alignctl.policy_eval.PolicyEval) -------------------------------------
    eval_skipped: str | None = None

    def policy_eval(self, batch_size: int | None = None, sharded: bool = False):
        """The stage's before/after evaluation on held-out prompts, or None: switched off (``eval.enabled``), not a
        language-model stage, no held-out prompts, or weights sharded across processes (ZeRO-3 / FSDP: then
        ``alignctl eval <run dir>`` does it afterwards on one process; the reason is kept in the manifest under
        ``metrics.eval.skipped``). Under several processes holding whole weights (DDP) each answers its share of
        the prompts (alignctl.policy_eval.PolicyEval)."""
        from alignctl import evaluate
        from alignctl.policy_eval import PolicyEval

        settings = self.spec.eval
        self.eval_skipped = None
        if not settings or not settings.enabled or self.kind.output != "causal_lm":
            return None
        if sharded:
            self.eval_skipped = ("weights sharded across processes (ZeRO-3 / FSDP): run `alignctl eval <run dir>` "
                                 "for samples, KL and win rate")
            return None
        if settings.prompts_data:
            train, held = data.load(settings.prompts_data, "prompt", "eval.prompts")
            prompts = evaluate.held_out_prompts(held if held is not None else train, settings.max_prompts)
        else:
            prompts = evaluate.held_out_prompts(self.eval, settings.max_prompts)
        if not prompts:
            self.eval_skipped = "no held-out prompts (set eval.prompts=<data name>)"
            return None
        batch = batch_size or self.spec.args.get("per_device_eval_batch_size", 8)
        return PolicyEval(settings, self.tokenizer, prompts, batch,
                                   ref_is_initial=self.reference_path() == self.spec.source.path)

    def finish_policy_eval(self, pe, model, ref_model=None, reward_model=None, samples_to: Path | None | str = "stage"
                           ) -> dict[str, Any]:
        """After training: the policy's samples, KL to its reference (``ref_model``, else the adapter disabled, else
        the reference loaded from its folder) and reward scores; writes the samples (default <stage>/samples.jsonl);
        returns {before, after, eval}."""
        if pe is None:
            if self.eval_skipped:
                log.info("[%s] held-out answers not evaluated: %s", self.spec.name, self.eval_skipped)
            return {"eval": {"skipped": self.eval_skipped}} if self.eval_skipped else {}
        pe.after(model, lambda: self._reference(model, ref_model, pe.ref_is_initial),
                 self._reward(reward_model, model) if pe.settings.reward_path or reward_model is not None
                 else None)
        if samples_to is not None and rank_env()[0] == 0:
            pe.write(self.dir / "samples.jsonl" if samples_to == "stage" else Path(samples_to))
        before, after = pe.metrics()
        out = {"before": before, "after": after, "eval": pe.info()}
        line = console.eval_line(self.spec.name, out)
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
            path = models.materialize(self.reference_path(), self.spec.cache_dir, self.model_spec)
            ref = to_device(models.load_causal_lm(path, self.model_spec, self.precision, self.tokenizer,
                                                  peft=self.peft), model)
            try:
                yield ref
            finally:
                del ref
                release_memory()

    def _reward(self, reward_model, like):
        @contextlib.contextmanager
        def factory():
            if reward_model is not None:
                yield reward_model, self.tokenizer
                return
            settings = self.spec.eval  # eval.reward outside the recipe: its own settings, never remote code
            spec = models.link_model_spec(self.model_spec, settings.reward_load, settings.reward_path)
            path = models.materialize(settings.reward_path, self.spec.cache_dir, spec)
            rtok = models.load_tokenizer(path, spec)
            rm = to_device(self.load_classifier(path, spec), like)
            try:
                yield rm, rtok
            finally:
                del rm
                release_memory()
        return factory
