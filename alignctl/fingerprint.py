"""Stage fingerprints, and what the orchestrator records of a stage's local files (data, model folders) before it
fingerprints them.

A stage's fingerprint hashes :func:`identity`, built from an allowlist: the fields of the typed stage spec that
determine weights (``WEIGHT_FIELDS`` and :meth:`StageSpec.identity`, alignctl.config.types) and nothing else of it,
so a new bookkeeping field (a name, a folder, evaluation settings, the attempt id, the lock token) can never change a
fingerprint. It covers:

* its kind and TRL fields, except those that cannot change the weights (logging, saving and evaluation cadence,
  output names; the cadence fields count when ``load_best_model_at_end`` picks the final weights by it, and the
  evaluation cadence when the trainer samples as it evaluates: ``StageKind.samples_during_eval``);
* its data spec (:data:`alignctl.config.types.DATA_FIELDS`) and the content of its local data files (checked again
  when the stage loads them: a file that changed since the run started stops the stage), or the Hub id and
  revision, or the fingerprint of the stage that generates it;
* the model settings, local model folders by content (checked again when the stage starts), the precision actually
  used (``auto`` resolved on the machine: bf16 / fp16 / fp32) and the peft settings (the QLoRA compute dtype resolved
  the same way), world size and distributed engine, the kind's options (with the ``monitors`` that can stop the
  stage, ``stop_when`` and their thresholds, as ``monitor_stops``; warning thresholds alone do not change weights);
* the launcher settings that change numerics: ``extra_args``, ``env`` (minus credentials, tracking, logging and
  cache variables) and the content of the accelerate / DeepSpeed config files (minus where-to-run keys);
* the fingerprints of the stages it links to (alignctl.config.links), or the linked model's identity (a Hub link at its
  own revision);
* the versions of torch, transformers, trl, peft, accelerate, datasets, tokenizers (bitsandbytes under qlora or a
  bitsandbytes optimizer, deepspeed under DeepSpeed, ...), a content hash of alignctl's own source files, and the
  store :data:`FORMAT`: entries of another format are *stale* (``alignctl store ls``), never reused.

Files are identified by content through alignctl.digests (SHA-256 computed once, cached under the file's full stat
signature).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from alignctl import models, tiny
from alignctl.config import links as link_table
from alignctl.config.model_checks import PKG_PREFIX, pkg_dir
from alignctl.config.types import DataCheck, DataSpec, StageSpec
from alignctl.digests import content_digest, data_changed, data_files, files_unchanged, signatures, tree_hash
from alignctl.errors import ModelChanged

# TRL/Trainer fields that cannot change the trained weights: they stay out of the fingerprint.
NON_WEIGHT_ARGS = {
    "logging_steps", "logging_strategy", "logging_first_step", "logging_dir", "logging_nan_inf_filter", "log_level",
    "log_level_replica", "log_on_each_node", "report_to", "run_name", "project", "trackio_space_id", "disable_tqdm",
    "output_dir", "overwrite_output_dir", "save_strategy", "save_steps", "save_total_limit", "save_only_model",
    "save_on_each_node", "save_safetensors", "eval_strategy", "eval_steps", "eval_delay", "eval_on_start",
    "per_device_eval_batch_size", "eval_accumulation_steps", "eval_do_concat_batches", "prediction_loss_only",
    "include_for_metrics", "batch_eval_metrics", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "push_to_hub", "hub_model_id", "hub_strategy",
    "hub_private_repo", "hub_always_push", "hub_revision", "resume_from_checkpoint", "num_sample_generations",
    "skip_memory_metrics", "log_completions", "num_completions_to_print", "generate_during_eval",
}
# With load_best_model_at_end the final weights are the best checkpoint at this cadence: then they count.
BEST_MODEL_CADENCE = {"eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "save_strategy", "save_steps",
                      "per_device_eval_batch_size", "eval_accumulation_steps"}
# Trainers that sample completions when they evaluate draw from the RNG at this cadence: then it counts.
SAMPLING_EVAL_CADENCE = {"eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "per_device_eval_batch_size"}
# accelerate config keys that say where/how many processes run (world size and engine are fingerprinted apart),
# or that alignctl overrides (mixed precision comes from `precision`).
ACCELERATE_PLACE_KEYS = {"compute_environment", "distributed_type", "mixed_precision", "num_machines", "machine_rank",
                         "num_processes", "gpu_ids", "rdzv_backend", "same_network", "use_cpu", "debug",
                         "main_process_ip", "main_process_port", "main_training_function", "enable_cpu_affinity",
                         "deepspeed_multinode_launcher", "deepspeed_hostfile", "deepspeed_config_file"}
# launcher.env variables that cannot change the weights (credentials, tracking, logging, caches, proxies)
NON_NUMERIC_ENV = re.compile(r"TOKEN|KEY|SECRET|PASSW|WANDB|MLFLOW|COMET|NEPTUNE|TRACKIO|LOG|DEBUG|PROXY|HOME|CACHE|"
                             r"TMPDIR|HF_HUB", re.IGNORECASE)
FORMAT = 3  # of COMPLETE and of the fingerprints: entries of another format are stale (never reused)


# -- what the orchestrator records of a stage's local files before fingerprinting -----------------------------------
def data_check(d: DataSpec | None, cache_dir: str | os.PathLike | None = None) -> DataCheck | None:
    """Content digest of a data set's local files plus their stat signatures (what its load is keyed by and compared
    with). ``cache_dir``: the digest cache's folder (``<output_root>/.cache``)."""
    files = data_files(d.path, d.local) if d is not None else []
    if not files:
        return None
    before = signatures(files)
    content = content_digest(files, cache_dir, what=f"data {d.label or d.path}")
    return DataCheck(content=content, files=tuple(tuple(sig) for sig in before))


def check_data_unchanged(spec: StageSpec) -> None:
    """Called by the stage once its data is loaded: the local files must still be those fingerprinted at the start
    of the run (same stat signature, or else the same content); else the stage stops before training."""
    d = spec.data
    if d is None or d.check is None:
        return
    if files_unchanged(d.check.to_dict(), data_files(d.path, d.local), spec.cache_dir):
        return
    raise data_changed(f"stage {spec.name}", d.label or d.path)


def _model_folder(path: str) -> Path | None:
    """The local folder a model path names (``pkg:`` resolved), or None (built-in tiny model, Hub id)."""
    if tiny.is_tiny(path):
        return None
    if str(path).startswith(PKG_PREFIX):  # an installed package's folder: its files, like a local folder
        folder = pkg_dir(path)
        return folder if folder is not None and folder.is_dir() else None
    p = Path(path).expanduser()
    return p.absolute() if p.is_dir() else None


def _model_files(folder: Path) -> list[Path]:
    """A model folder's files (symlinks followed: a Hub snapshot links to its blobs), hidden ones left out (.git,
    the Hub's .cache): transformers loads none of them."""
    return sorted(f for f in folder.rglob("*")
                  if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def model_check(path: str, cache_dir: str | os.PathLike | None = None) -> dict | None:
    """A local model folder's content digest (per-file SHA-256 through the digest cache) and the files' stat
    signatures, compared again when a stage loads it; None for a built-in or Hub model."""
    folder = _model_folder(path)
    if folder is None:
        return None
    files = _model_files(folder)
    before = signatures(files)
    return {"folder": str(folder), "content": content_digest(files, cache_dir, folder, what=f"model {path}"),
            "files": before}


def model_identity(path: str, revision: str | None = None, check: dict | None = None) -> Any:
    """A model's identity: built-in name, Hub id + revision, or a local folder's content (file names and SHA-256)."""
    if tiny.is_tiny(path):
        return {"tiny": tiny.tiny_key(path)}
    check = check or model_check(path)
    if check:
        return {"local": check["content"]}
    return {"hub": path, "revision": revision or "main"}


def _path_key(link: str) -> str:
    """The key of a link's model in ``StageSpec.model_check`` (its old spec key: init_path, reward_path, ...; an
    ensemble's further members: reward.2_path, ...)."""
    return link_table.path_key_of(link)


def model_checks(stage: StageSpec, cache_dir: str | os.PathLike | None = None, memo: dict | None = None) -> dict:
    """The local model folders a stage loads that no earlier stage of the run wrote: path key -> model_check."""
    memo = {} if memo is None else memo
    out = {}
    for name, link in stage.links.items():
        if not link.path or link.stage is not None:  # a link to an earlier stage: its fingerprint identifies it
            continue
        if link.path not in memo:
            memo[link.path] = model_check(link.path, cache_dir)
        if memo[link.path]:
            out[_path_key(name)] = memo[link.path]
    return out


def check_models_unchanged(spec: StageSpec) -> None:
    """Called by a stage before it loads its models: the local model folders must still be those fingerprinted at
    the start of the run; else the stage stops before training."""
    for key, recorded in spec.model_check.items():
        folder = Path(recorded["folder"])
        files = _model_files(folder) if folder.is_dir() else []
        if not files_unchanged(recorded, files, spec.cache_dir, folder):
            raise ModelChanged(f"stage {spec.name}: the model folder {folder} ({key.removesuffix('_path')}) "
                               "changed on disk since this run started and fingerprinted it; nothing was trained. "
                               "Keep model folders unchanged while a run uses them, and re-run.")


def resolve_numerics(stages: list[StageSpec]) -> list[StageSpec]:
    """Resolve what depends on this machine (imports torch): ``precision: auto`` becomes bf16 / fp16 / fp32 and an
    ``auto`` QLoRA compute dtype becomes that precision; the setting as written is kept as ``precision_setting``.
    The workers train with the resolved values and check that they resolve ``auto`` the same way."""
    out = []
    for s in stages:
        precision = models.precision_for(s.precision)
        peft = dict(s.peft)
        if peft.get("method") == "qlora" and peft.get("bnb_4bit_compute_dtype", "auto") in (None, "auto"):
            peft["bnb_4bit_compute_dtype"] = precision
        out.append(s.replace(precision_setting=s.precision, precision=precision, peft=peft))
    return out


# -- fingerprints ----------------------------------------------------------------------------------------------------
def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def source_hash() -> str:
    """SHA-256 of alignctl's own Python source files (an editable install changes weights without a version bump)."""
    return tree_hash(Path(__file__).resolve().parent)


# TRL / Trainer optimizers that run on bitsandbytes kernels (8-bit, paged): its version then changes the weights
BNB_OPTIMIZERS = re.compile(r"8bit|paged|bnb", re.IGNORECASE)


def environment(stage: StageSpec) -> dict[str, str | None]:
    """Library versions that change a stage's weights, and alignctl's source hash."""
    pkgs = ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers"]
    args = stage.args
    if stage.peft.get("method") == "qlora" or BNB_OPTIMIZERS.search(str(args.get("optim") or "")):
        pkgs.append("bitsandbytes")
    if stage.distributed.startswith("deepspeed"):
        pkgs.append("deepspeed")
    if args.get("use_liger_kernel"):
        pkgs.append("liger-kernel")
    if args.get("use_vllm"):
        pkgs.append("vllm")
    if str(stage.model.attn_implementation or "").startswith("flash_attention"):
        pkgs.append("flash-attn")
    return {**{p: _version(p) for p in pkgs}, "alignctl": _version("alignctl"), "alignctl_source": source_hash()}


def launcher_identity(launcher: dict | None) -> dict:
    """The launcher settings that change numerics: extra_args, env and the accelerate / DeepSpeed file contents
    (world size and engine are part of every stage already; where processes run is not)."""
    launcher = launcher or {}
    out: dict[str, Any] = {}
    if launcher.get("extra_args"):
        out["extra_args"] = list(launcher["extra_args"])
    env = {k: v for k, v in (launcher.get("env") or {}).items() if not NON_NUMERIC_ENV.search(k)}
    if env:
        out["env"] = env
    if launcher.get("config_file"):
        import yaml

        cfg = yaml.safe_load(Path(launcher["config_file"]).read_text()) or {}
        content = _strip(cfg)
        ds_file = (cfg.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if ds_file:
            content["deepspeed_config_file"] = json.loads(Path(ds_file).expanduser().read_text())
        if content:
            out["config_file"] = content
    return out


def _strip(cfg: Any) -> Any:
    if isinstance(cfg, dict):
        return {k: _strip(v) for k, v in cfg.items() if k not in ACCELERATE_PLACE_KEYS and _strip(v) not in ({}, None)}
    return cfg


def _non_weight_args(stage: StageSpec) -> set[str]:
    """The stage's TRL fields left out of its fingerprint: NON_WEIGHT_ARGS, less the evaluation cadence when it picks
    the final weights (load_best_model_at_end) or when the trainer samples at it (the RNG stream then depends on
    when evaluation runs: StageKind.samples_during_eval)."""
    from alignctl.stages import STAGES

    skip = set(NON_WEIGHT_ARGS)
    if stage.args.get("load_best_model_at_end"):
        skip -= BEST_MODEL_CADENCE
    kind = STAGES.get(stage.kind)
    if kind is not None and kind.samples_during_eval:
        skip -= SAMPLING_EVAL_CADENCE
    return skip


def _linked(stage: StageSpec, fps: dict[str, str]) -> dict[str, Any]:
    """Each link's identity: the fingerprint of the earlier stage it names, else its model's identity (an external
    link at its own revision, with its remote-code consent; the base model at the base model's revision)."""
    out: dict[str, Any] = {}
    for name, link in stage.links.items():
        if link.stage is not None and link.stage in fps:
            out[name] = fps[link.stage]
        elif link.path:
            revision = link.revision if link.external else stage.model.revision
            out[name] = model_identity(link.path, revision, stage.model_check.get(_path_key(name)))
            if link.external and link.trust_remote_code:
                out[name] = {**out[name], "trust_remote_code": True}
    return out


def _data_identity(d: DataSpec | None, fps: dict[str, str]) -> Any:
    """A data set's identity (:meth:`DataSpec.identity`) with its local files' content in place of their folder, or
    the producing stage's fingerprint for data an earlier stage generates."""
    if d is None:
        return None
    out = d.identity()
    if d.source == "generated":  # never its files: a folder left by an earlier run of the producer would count
        out["path"], out["stage"] = None, fps.get(d.stage, d.stage)
        return out
    check = d.check or data_check(d)
    if check is not None:
        out["path"], out["content"] = Path(d.path).name, check.content
    return out


def identity(stage: StageSpec, fps: dict[str, str], launcher: dict, env: dict | None = None) -> dict[str, Any]:
    """Exactly what a stage's fingerprint hashes: :meth:`StageSpec.identity` (the allowlist ``WEIGHT_FIELDS``) with
    the TRL fields that cannot change weights left out and the data's content in, plus the launcher's numerics
    (``launcher``: :func:`launcher_identity`), the library versions (``env`` overrides :func:`environment`) and the
    store format. Nothing else of the spec can reach it."""
    ident = stage.identity(_linked(stage, fps))
    skip = _non_weight_args(stage)
    ident["args"] = {k: v for k, v in ident["args"].items() if k not in skip}
    ident["data"] = _data_identity(stage.data, fps)
    if launcher:
        ident["launcher"] = launcher
    ident["environment"] = env if env is not None else environment(stage)
    ident["format"] = FORMAT
    return ident


def fingerprints(stages: list[StageSpec], launcher: dict | None = None, env: dict | None = None) -> dict[str, str]:
    """Fingerprint of every stage, in order (upstream fingerprints feed downstream ones). ``env`` overrides
    :func:`environment` (tests); ``launcher`` is the run's resolved launcher."""
    fps: dict[str, str] = {}
    numerics = launcher_identity(launcher)
    for s in stages:
        blob = json.dumps(identity(s, fps, numerics, env), sort_keys=True, default=str)
        fps[s.name] = hashlib.sha256(blob.encode()).hexdigest()
    return fps


# What alignctl's own held-out evaluation reads of a stage's TRL fields (alignctl.evaluate.pref_settings, the
# policy evaluation's batch): with the rest of :func:`before_key` they determine its "before" results.
EVAL_ARGS = ("per_device_eval_batch_size", "max_length", "truncation_mode")


# TRL/Trainer fields that only training reads (its optimizer, schedule, length and training batches): the trainer's
# evaluation of the initial weights is the same whatever they are.
TRAIN_ONLY_ARGS = {
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "warmup_ratio", "num_train_epochs",
    "max_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "optim_args",
    "gradient_accumulation_steps", "per_device_train_batch_size", "global_batch_size",
}
# Of NON_WEIGHT_ARGS, those the trainer's evaluation reads.
EVAL_READS = {"per_device_eval_batch_size", "eval_accumulation_steps", "eval_do_concat_batches",
              "prediction_loss_only", "include_for_metrics", "batch_eval_metrics"}


def trainer_before_key(stage: StageSpec, upstream: str, launcher: dict | None = None, env: dict | None = None
                       ) -> str | None:
    """Identity of the trainer's own evaluation of the initial weights (``trainer.evaluate()`` before training),
    for kinds that declare what it does not read (``StageKind.before_ignores``; None for the others): what
    :func:`identity` hashes, with the TRL fields less :data:`TRAIN_ONLY_ARGS`, the kind's ignored ones and the
    bookkeeping ones (plus the evaluation's batch fields, :data:`EVAL_READS`), and the linked stages by content."""
    from alignctl.stages import STAGES

    kind = STAGES.get(stage.kind)
    if kind is None or kind.before_ignores is None:
        return None
    skip = TRAIN_ONLY_ARGS | (NON_WEIGHT_ARGS - EVAL_READS) | kind.before_ignores(stage)
    return _evaluation_key(stage, upstream, launcher, env, "trainer",
                           {k: v for k, v in stage.args.items() if k not in skip})


def _evaluation_key(stage: StageSpec, upstream: str, launcher: dict | None, env: dict | None, evaluation: str,
                    args: dict[str, Any], **extra: Any) -> str:
    """SHA-256 of :func:`identity` with ``args`` for the TRL fields, the linked stages by their content
    (``upstream``) instead of their fingerprints, and what names the evaluation."""
    fps = {ln.stage: "upstream" for ln in stage.links.values() if ln.stage}  # their content: ``upstream``
    ident = identity(stage, fps, launcher_identity(launcher), env)
    ident.update(args=args, upstream=upstream, evaluation=evaluation, **extra)
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def before_key(stage: StageSpec, upstream: str, launcher: dict | None = None, env: dict | None = None) -> str:
    """Identity of a stage's "before" evaluation by alignctl (the policy evaluation's answers and log-probabilities
    on the held-out prompts, the preference accuracy of the initial weights), which a sweep point that changes only
    training settings shares with every other point. It hashes what :func:`identity` hashes, with the TRL fields cut
    to :data:`EVAL_ARGS`, the linked stages by the content of their completed files (``upstream``:
    alignctl.store.upstream_digest) instead of their fingerprints, and the evaluation settings that choose prompts and
    answers (prompt count and source by content, answer length, temperature, seed; not the reward model, which
    scores "before" answers only after training). TRL's own evaluation: :func:`trainer_before_key`."""
    ev = stage.eval
    settings = None if ev is None or not ev.enabled else {
        "max_prompts": ev.max_prompts, "max_new_tokens": ev.max_new_tokens, "temperature": ev.temperature,
        "seed": ev.seed, "prompts": _data_identity(ev.prompts_data, {})}
    return _evaluation_key(stage, upstream, launcher, env, "alignctl", {k: stage.args.get(k) for k in EVAL_ARGS},
                           eval=settings)
