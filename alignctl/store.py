"""Stage fingerprints and the stage store shared by runs.

A stage's fingerprint hashes everything that determines its weights:

* its trainer and TRL fields, except those that cannot change the weights (logging, saving and evaluation cadence,
  output names; the cadence fields count when ``load_best_model_at_end`` picks the final weights by it, and the
  evaluation cadence when the trainer samples as it evaluates: ``StageKind.samples_during_eval``);
* its data spec and the content of its local data files (checked again when the stage loads them: a file that
  changed since the run started stops the stage), or the Hub id and revision;
* the model settings, local model folders by content (checked again when the stage starts), the precision actually
  used (``auto`` resolved on the machine: bf16 / fp16 / fp32) and the peft settings (the QLoRA compute dtype resolved
  the same way), world size and distributed engine;
* the launcher settings that change numerics: ``extra_args``, ``env`` (minus credentials, tracking, logging and
  cache variables) and the content of the accelerate / DeepSpeed config files (minus where-to-run keys);
* the fingerprints of the stages it links to (alignctl.config.links), or the linked model's identity (a Hub link at its
  own revision);
* the versions of torch, transformers, trl, peft, accelerate, datasets, tokenizers (bitsandbytes under qlora or a
  bitsandbytes optimizer, deepspeed under DeepSpeed, ...) and a content hash of alignctl's own source files.

A file's SHA-256 is computed once: the digest cache (``<cache>/digests/``) keeps it under the file's full stat
signature (path, device, inode, size, mtime and ctime; inode and ctime cannot be set back by tar, ``cp -p``, rsync
or touch), so unchanged files are not read again and a replaced one always is.

The store (default ``<output_root>/.store``) has one entry per fingerprint, ``<trainer>-<fingerprint[:16]>/``. An
entry is trained under :class:`alignctl.fsutil.FileLock`, an exclusive lock file with a heartbeat that works on
shared file systems. Once trained, its files are fsync'd and made read-only, their sizes and SHA-256 are recorded
in ``COMPLETE`` (written last), and its Trainer checkpoints are deleted unless the stage keeps them. Reuse checks
the entry cheaply first (sizes, mtimes, a sampled hash of every file; a full hash of a file whose mtime moved) and
retrains a damaged entry. Run folders get the entry's files reflinked, hard-linked (read-only, when not root) or
copied, so nothing written into a run's ``final/`` reaches the store.

``COMPLETE`` and an entry's ``upstream.json`` (written when training starts) are sealed with the user's key
(:mod:`alignctl.trust`); :meth:`Entry.trust_state` says whether what a run would take from an entry (a complete
entry, or checkpoints to resume) was sealed by this user. The rule built on it (the default store takes only the
user's entries, a named store any) is :func:`alignctl.pipeline._check_trust`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from alignctl import fsutil, models, trust
from alignctl.config import links as link_table

log = logging.getLogger("alignctl")

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
# Spec keys that name places or bookkeeping, not weights; links are replaced by the linked stage's fingerprint.
PLACE_KEYS = {"name", "output_dir", "run_dir", "recipe", "cache_dir", "store_dir", "label", "run_stage_dir",
              "precision_setting", "data_check", "model_check", "keep_checkpoints", "attempt", "fingerprint",
              "resume_from", "description"}
LINKS = tuple((link.name, link.path_key) for link in link_table.LINKS)  # (link, spec key of its path): alignctl.config.links
# accelerate config keys that say where/how many processes run (world size and engine are fingerprinted apart),
# or that alignctl overrides (mixed precision comes from `precision`).
ACCELERATE_PLACE_KEYS = {"compute_environment", "distributed_type", "mixed_precision", "num_machines", "machine_rank",
                         "num_processes", "gpu_ids", "rdzv_backend", "same_network", "use_cpu", "debug",
                         "main_process_ip", "main_process_port", "main_training_function", "enable_cpu_affinity",
                         "deepspeed_multinode_launcher", "deepspeed_hostfile", "deepspeed_config_file"}
# launcher.env variables that cannot change the weights (credentials, tracking, logging, caches, proxies)
NON_NUMERIC_ENV = re.compile(r"TOKEN|KEY|SECRET|PASSW|WANDB|MLFLOW|COMET|NEPTUNE|TRACKIO|LOG|DEBUG|PROXY|HOME|CACHE|"
                             r"TMPDIR|HF_HUB", re.IGNORECASE)
FORMAT = 2
SAMPLE_BLOCKS, SAMPLE_BYTES = 8, 1 << 12  # the cheap check hashes 8 blocks of 4 KiB spread over each file
KEPT = ("final", "adapter", "log_history.json", "samples.jsonl", "metrics.json")  # what a complete entry holds
UPSTREAM = "upstream.json"  # an entry being trained: the upstream digest, sealed by the user who started it


# -- fingerprints ----------------------------------------------------------------------------------------------------
def _file_digest(path: Path, h) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def _data_files(d: dict) -> list[Path]:
    p = Path(d["path"])
    if not (d.get("local") and p.exists()):
        return []
    return sorted([p] if p.is_file() else [f for f in p.iterdir() if f.is_file()])


def _signature(f: Path) -> list:
    """What identifies one file on disk: a rewrite, a replacement (tar, cp -p, rsync -a) or a swapped symlink
    changes its inode or ctime even when size and mtime are restored, and neither can be set back by user space."""
    st = f.stat()
    return [str(f), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def signatures(files: list[Path]) -> list[list]:
    return [_signature(f) for f in files]


DIGESTS = "digests"  # <cache>/digests/<key>.json: a file's SHA-256 under its exact stat signature


def _digest_entry(sig: list, cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / DIGESTS / f"{hashlib.sha256(json.dumps(sig).encode()).hexdigest()[:32]}.json"


def cached_digest(sig: list, cache_dir: str | os.PathLike | None) -> str | None:
    """The SHA-256 the digest cache holds for a file with exactly this stat signature, or None."""
    if not cache_dir:
        return None
    try:
        rec = json.loads(_digest_entry(sig, cache_dir).read_text())
        if rec.get("signature") == sig and isinstance(rec.get("sha256"), str):
            return rec["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    return None


def file_digest(f: Path, cache_dir: str | os.PathLike | None = None) -> str:
    """SHA-256 of a file's content, read from the digest cache (``<cache_dir>/digests``) when the file's full stat
    signature is the one recorded there, else hashed (and recorded when the file did not change while hashed)."""
    sig = _signature(f)
    digest = cached_digest(sig, cache_dir)
    if digest is not None:
        return digest
    digest = full_hash(f)
    if cache_dir and _signature(f) == sig:
        entry = _digest_entry(sig, cache_dir)
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            fsutil.write_json(entry, {"signature": sig, "sha256": digest})
        except OSError as e:  # a cache: a read-only or full disk costs a re-hash next time, nothing else
            log.debug("digest cache %s not written: %s", entry, e)
    return digest


def _content(files: list[Path], cache_dir: str | os.PathLike | None = None, root: Path | None = None,
             what: str | None = None) -> str:
    """One digest of the files' names (relative to ``root``, else their own) and contents; ``what``: log a line
    when at least 1 GB of it has to be read."""
    if what:
        sigs = signatures(files)
        unread = sum(sig[3] for sig in sigs if cached_digest(sig, cache_dir) is None)
        if unread >= 1 << 30:
            log.info("fingerprinting %s by content: reading %s%s", what, fsutil.human(unread),
                     " (once: unchanged files are not read again)" if cache_dir else "")
    items = [[str(f.relative_to(root)) if root else f.name, file_digest(f, cache_dir)] for f in files]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def data_check(d: dict | None, cache_dir: str | os.PathLike | None = None) -> dict | None:
    """Content digest of a data set's local files plus their stat signatures (what its load is keyed by and compared
    with). ``cache_dir``: the digest cache's folder (``<output_root>/.cache``)."""
    files = _data_files(d) if d else []
    if not files:
        return None
    before = signatures(files)
    return {"content": _content(files, cache_dir, what=f"data {d.get('label') or d['path']}"), "files": before}


def data_identity(d: dict | None, check: dict | None = None) -> Any:
    """Spec of a data set plus the content hash of its local files (or its Hub revision)."""
    if not d:
        return d
    out = {k: v for k, v in d.items() if k not in PLACE_KEYS}
    check = check or data_check(d)
    if check:
        out["path"] = Path(d["path"]).name
        out["content"] = check["content"]
    return out


class DataChanged(RuntimeError):
    """A stage's local data files are not the ones the run fingerprinted (it stops before training)."""


class ModelChanged(DataChanged):
    """A stage's local model folder is not the one the run fingerprinted."""


def files_unchanged(recorded: dict, files: list[Path], cache_dir=None, root: Path | None = None) -> bool:
    """The files are those ``recorded`` (a data or model check): the same stat signatures, or else the same paths
    and the same content (touched, or rewritten with the same bytes)."""
    if signatures(files) == recorded["files"]:
        return True
    return [f[0] for f in recorded["files"]] == [str(f) for f in files] and \
        _content(files, cache_dir, root) == recorded["content"]


def check_data_unchanged(spec: dict) -> None:
    """Called by the stage once its data is loaded: the local files must still be those fingerprinted at the start
    of the run (same stat signature, or else the same content); else the stage stops before training."""
    recorded = spec.get("data_check")
    if not recorded:
        return
    if files_unchanged(recorded, _data_files(spec["data"]), spec.get("cache_dir")):
        return
    raise data_changed(f"stage {spec['name']}", spec["data"])


def data_changed(who: str, d: dict, how: str = "since this run started and fingerprinted it") -> DataChanged:
    return DataChanged(f"{who}: its data ({d.get('label') or d['path']}) changed on disk {how}; nothing was "
                       "trained. Keep data files unchanged while a run uses them, and re-run.")


MODEL_LINK_PATHS = tuple(link.path_key for link in link_table.LINKS)  # the models a stage loads


def _model_folder(path: str) -> Path | None:
    """The local folder a model path names (``pkg:`` resolved), or None (built-in tiny model, Hub id)."""
    if models.is_tiny(path):
        return None
    if str(path).startswith(models.PKG_PREFIX):  # an installed package's folder: its files, like a local folder
        folder = models.pkg_dir(path)
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
    return {"folder": str(folder), "content": _content(files, cache_dir, folder, what=f"model {path}"),
            "files": before}


def model_identity(path: str, revision: str | None = None, check: dict | None = None) -> Any:
    """A model's identity: built-in name, Hub id + revision, or a local folder's content (file names and SHA-256)."""
    if models.is_tiny(path):
        return {"tiny": models.tiny_key(path)}
    check = check or model_check(path)
    if check:
        return {"local": check["content"]}
    return {"hub": path, "revision": revision or "main"}


def model_checks(stage: dict, cache_dir: str | os.PathLike | None = None, memo: dict | None = None) -> dict:
    """The local model folders a stage loads that no earlier stage of the run wrote: path key -> model_check."""
    memo = {} if memo is None else memo
    out = {}
    for link, key in LINKS:
        path = stage.get(key)
        if not path or stage.get(link) is not None:  # a link to an earlier stage: its fingerprint identifies it
            continue
        if path not in memo:
            memo[path] = model_check(path, cache_dir)
        if memo[path]:
            out[key] = memo[path]
    return out


def check_models_unchanged(spec: dict) -> None:
    """Called by a stage before it loads its models: the local model folders must still be those fingerprinted at
    the start of the run; else the stage stops before training."""
    for key, recorded in (spec.get("model_check") or {}).items():
        folder = Path(recorded["folder"])
        files = _model_files(folder) if folder.is_dir() else []
        if not files_unchanged(recorded, files, spec.get("cache_dir"), folder):
            raise ModelChanged(f"stage {spec['name']}: the model folder {folder} ({key.removesuffix('_path')}) "
                              "changed on disk since this run started and fingerprinted it; nothing was trained. "
                              "Keep model folders unchanged while a run uses them, and re-run.")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def tree_hash(root: Path) -> str:
    """SHA-256 over the names and contents of the Python files under ``root``."""
    h = hashlib.sha256()
    for f in sorted(Path(root).rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        h.update(str(f.relative_to(root)).encode())
        _file_digest(f, h)
    return h.hexdigest()


@lru_cache(maxsize=1)
def source_hash() -> str:
    """SHA-256 of alignctl's own Python source files (an editable install changes weights without a version bump)."""
    return tree_hash(Path(__file__).resolve().parent)


# TRL / Trainer optimizers that run on bitsandbytes kernels (8-bit, paged): its version then changes the weights
BNB_OPTIMIZERS = re.compile(r"8bit|paged|bnb", re.IGNORECASE)


def environment(stage: dict) -> dict[str, str | None]:
    """Library versions that change a stage's weights, and alignctl's source hash."""
    pkgs = ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers"]
    args = stage.get("args") or {}
    if (stage.get("peft") or {}).get("method") == "qlora" or BNB_OPTIMIZERS.search(str(args.get("optim") or "")):
        pkgs.append("bitsandbytes")
    if str(stage.get("distributed", "")).startswith("deepspeed"):
        pkgs.append("deepspeed")
    if args.get("use_liger_kernel"):
        pkgs.append("liger-kernel")
    if args.get("use_vllm"):
        pkgs.append("vllm")
    if str((stage.get("model") or {}).get("attn_implementation") or "").startswith("flash_attention"):
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


def resolve_numerics(stages: list[dict]) -> list[dict]:
    """Resolve what depends on this machine (imports torch): ``precision: auto`` becomes bf16 / fp16 / fp32 and an
    ``auto`` QLoRA compute dtype becomes that precision; the setting as written is kept as ``precision_setting``.
    The workers train with the resolved values and check that they resolve ``auto`` the same way."""
    out = []
    for s in stages:
        s = dict(s)
        s["precision_setting"] = s.get("precision", "auto")
        s["precision"] = models.precision_for(s["precision_setting"])
        peft = dict(s.get("peft") or {})
        if peft.get("method") == "qlora" and peft.get("bnb_4bit_compute_dtype", "auto") in (None, "auto"):
            peft["bnb_4bit_compute_dtype"] = s["precision"]
            s["peft"] = peft
        out.append(s)
    return out


def _non_weight_args(stage: dict) -> set[str]:
    """The stage's TRL fields left out of its fingerprint: NON_WEIGHT_ARGS, less the evaluation cadence when it picks
    the final weights (load_best_model_at_end) or when the trainer samples at it (the RNG stream then depends on
    when evaluation runs: StageKind.samples_during_eval)."""
    from alignctl.stages import STAGES

    skip = set(NON_WEIGHT_ARGS)
    if (stage.get("args") or {}).get("load_best_model_at_end"):
        skip -= BEST_MODEL_CADENCE
    kind = STAGES.get(stage.get("trainer"))
    if kind is not None and kind.samples_during_eval:
        skip -= SAMPLING_EVAL_CADENCE
    return skip


def fingerprints(stages: list[dict], launcher: dict | None = None, env: dict | None = None) -> dict[str, str]:
    """Fingerprint of every stage, in order (upstream fingerprints feed downstream ones). ``env`` overrides
    :func:`environment` (tests); ``launcher`` is the run's resolved launcher."""
    fps: dict[str, str] = {}
    launch_ident = launcher_identity(launcher)
    for s in stages:
        link_keys = {k for pair in LINKS for k in pair}
        ident: dict[str, Any] = {k: v for k, v in s.items() if k not in PLACE_KEYS and k not in link_keys}
        args = s.get("args", {})
        ident["args"] = {k: v for k, v in args.items() if k not in _non_weight_args(s)}
        ident["data"] = data_identity(s.get("data"), s.get("data_check"))
        if (s.get("data") or {}).get("stage") in fps:  # generated by an earlier stage: that stage's fingerprint
            ident["data"] = {**ident["data"], "path": None, "stage": fps[s["data"]["stage"]]}
        for link, path_key in LINKS:
            target = s.get(link)
            if target is not None and target in fps:
                ident[link] = fps[target]
            elif s.get(path_key):
                ident[link] = model_identity(s[path_key], link_table.revision(s, link),  # an external link's own
                                             (s.get("model_check") or {}).get(path_key))
        if launch_ident:
            ident["launcher"] = launch_ident
        ident["environment"] = env if env is not None else environment(s)
        ident["format"] = FORMAT
        blob = json.dumps(ident, sort_keys=True, default=str)
        fps[s["name"]] = hashlib.sha256(blob.encode()).hexdigest()
    return fps


# -- entry files: sizes and hashes -----------------------------------------------------------------------------------
def sampled_hash(path: Path, size: int | None = None) -> str:
    """SHA-256 of ``SAMPLE_BLOCKS`` blocks spread evenly over the file (all of it when small): cheap to check on
    every reuse, and it catches truncation, zero-filled and rewritten files."""
    size = path.stat().st_size if size is None else size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * SAMPLE_BYTES:
            h.update(f.read())
        else:
            step = (size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1)
            for i in range(SAMPLE_BLOCKS):
                f.seek(i * step)
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def full_hash(path: Path) -> str:
    h = hashlib.sha256()
    _file_digest(path, h)
    return h.hexdigest()


def _record(path: Path, full: bool = True) -> dict:
    st = path.stat()
    rec = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sample": sampled_hash(path, st.st_size)}
    if full:
        rec["sha256"] = full_hash(path)
    return rec


def check_files(root: Path, recorded: dict[str, dict], full: bool = False) -> list[str]:
    """Problems of the files under ``root`` against their records (see :func:`_record`): cheap by default (size,
    mtime, sampled hash; a file whose mtime moved is hashed in full); ``full``: every file's SHA-256."""
    problems = []
    for rel, want in recorded.items():
        f = root / rel
        try:
            st = f.lstat()
        except OSError:
            problems.append(f"{rel}: missing")
            continue
        if not os.path.isfile(f) or f.is_symlink():
            problems.append(f"{rel}: not a regular file")
        elif st.st_size != want.get("size"):
            problems.append(f"{rel}: {st.st_size} bytes, {want.get('size')} when recorded")
        elif full or st.st_mtime_ns != want.get("mtime_ns"):
            if full_hash(f) != want.get("sha256"):
                problems.append(f"{rel}: content changed (SHA-256 differs)")
        elif sampled_hash(f, st.st_size) != want.get("sample"):
            problems.append(f"{rel}: content changed (sampled hash differs)")
    return problems


def record_files(root: Path) -> dict[str, dict]:
    """Size, mtime, sampled and full SHA-256 of every regular file under ``root``, by relative path."""
    return {str(f.relative_to(root)): _record(f) for f in fsutil.tree_files(root)}


# -- checkpoints (resume) --------------------------------------------------------------------------------------------
def _safetensors_truncated(path: Path) -> bool:
    """A safetensors file whose header promises more bytes than the file has (a truncated write)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size < 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return True


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a Trainer checkpoint cannot be resumed from (None if it looks complete): trainer_state.json parses with
    a global_step; weights and optimizer state are present; no file is empty; safetensors files are whole."""
    state = ckpt / "trainer_state.json"
    try:
        step = json.loads(state.read_text()).get("global_step")
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError, AttributeError):
        return "trainer_state.json is not valid JSON"
    if not isinstance(step, int):
        return "trainer_state.json has no global_step"
    files = fsutil.tree_files(ckpt)
    empty = [f.name for f in files if f.stat().st_size == 0]
    if empty:
        return f"empty file(s): {', '.join(empty[:3])}"
    names = {f.name for f in files}
    weights = [f for f in files if f.suffix in (".safetensors", ".bin") and f.name != "training_args.bin"]
    sharded = any(p.is_dir() and (p.name.startswith(("global_step", "pytorch_model_fsdp"))) for p in ckpt.iterdir())
    if not weights and not sharded:
        return "no weights"
    if "optimizer.pt" not in names and not sharded and not any(p.name.startswith("optimizer") for p in ckpt.iterdir()):
        return "no optimizer state (saved with save_only_model?)"
    broken = [f.name for f in weights if f.suffix == ".safetensors" and _safetensors_truncated(f)]
    if broken:
        return f"truncated {', '.join(broken)}"
    return None


def _step(p: Path) -> int:
    tail = p.name.split("-")[-1]
    return int(tail) if tail.isdigit() else -1


# -- an entry --------------------------------------------------------------------------------------------------------
class Entry:
    """One store entry: <store>/<trainer>-<fingerprint[:16]>/ with final/, checkpoints/, metrics.json, COMPLETE."""

    def __init__(self, store_dir: str | os.PathLike, trainer: str, fingerprint: str):
        self.dir = Path(store_dir) / f"{trainer}-{fingerprint[:16]}"
        self.fingerprint = fingerprint

    @property
    def final(self) -> Path:
        return self.dir / "final"

    def record(self) -> dict | None:
        try:
            rec = json.loads((self.dir / "COMPLETE").read_text())
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    def complete(self) -> bool:
        """COMPLETE exists, is this entry's (same fingerprint, this format) and final/ exists."""
        rec = self.record()
        return bool(rec) and rec.get("fingerprint") == self.fingerprint and rec.get("format") == FORMAT \
            and self.final.is_dir()

    def metrics(self) -> dict:
        path = self.dir / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def lock(self, timeout: Any = fsutil._FROM_ENV, on_lost=None, decide_now: bool = False) -> fsutil.FileLock:
        """Exclusive lock on this entry: a lock file in the entry (works across nodes on shared file systems);
        ``on_lost``/``decide_now``: see :class:`alignctl.fsutil.FileLock`."""
        if self.dir.is_symlink():
            raise RuntimeError(f"store entry {self.dir} is a symbolic link; refusing to use it")
        return fsutil.FileLock(self.dir / ".lock", f"store entry {self.dir.name}", timeout=timeout, on_lost=on_lost,
                               decide_now=decide_now)

    def _kept_files(self) -> list[Path]:
        return [f for name in KEPT for f in fsutil.tree_files(self.dir / name)]

    def mark_complete(self, metrics: dict, keep_checkpoints: bool = False, extra: dict | None = None) -> dict:
        """Seal a trained entry: metrics.json, every kept file fsync'd, made read-only and recorded (size, mtime,
        sampled and full SHA-256) in COMPLETE, written last and sealed with the user's key (alignctl.trust); then
        drop the Trainer checkpoints unless kept."""
        if not self.final.is_dir():
            raise RuntimeError(f"store entry {self.dir}: the stage reported success but wrote no final/")
        fsutil.write_json(self.dir / "metrics.json", metrics)
        files = {}
        for f in self._kept_files():
            fsutil.fsync_file(f)
            f.chmod(f.stat().st_mode & 0o555)
            files[str(f.relative_to(self.dir))] = _record(f)
        for d in {f.parent for f in self._kept_files()} | {self.dir}:
            fsutil.fsync_dir(d)
        rec = {"fingerprint": self.fingerprint, "format": FORMAT, "completed": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "host": socket.gethostname(), "keep_checkpoints": bool(keep_checkpoints),
               "bytes": sum(r["size"] for r in files.values()), "files": files, **(extra or {})}
        rec = trust.sealed(rec)  # who trained it: only entries sealed with the user's key count as theirs
        fsutil.write_json(self.dir / "COMPLETE", rec, mode=0o444)
        self.touch()
        if not keep_checkpoints:
            self.drop_checkpoints()
        return rec

    # -- who wrote it (alignctl.trust) --------------------------------------------------------------------------
    def marker(self) -> dict | None:
        """``upstream.json``: written (sealed) when a run starts training the entry; the upstream digest its
        checkpoints were written on top of."""
        try:
            rec = json.loads((self.dir / UPSTREAM).read_text())
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    def write_marker(self, digest: str) -> None:
        fsutil.write_json(self.dir / UPSTREAM, trust.sealed({"fingerprint": self.fingerprint, "digest": digest}),
                          mode=0o644)

    def trust_state(self) -> tuple[str, bool, str] | None:
        """What a run would take from this folder and whether this user sealed it: ``(what, verifies, who)`` with
        what = ``COMPLETE`` (a complete entry is reused) or ``upstream.json`` (any other content: checkpoints are
        resumed from, leftover files would be kept); None when the folder is missing or holds only dot files
        (lock, last use). A seal binds the fingerprint: one copied from another entry does not verify."""
        try:
            names = [p.name for p in self.dir.iterdir() if not p.name.startswith(".")]
        except OSError:
            return None
        if not names:
            return None
        if self.complete():
            ok, who = trust.check(self.record())
            return "COMPLETE", ok, who
        rec = self.marker()
        ok, who = trust.check(rec)
        return UPSTREAM, ok and rec.get("fingerprint") == self.fingerprint, who

    def drop_checkpoints(self) -> int:
        """Delete the Trainer checkpoints (optimizer state included); returns the bytes freed."""
        ckpts = self.dir / "checkpoints"
        if not ckpts.exists():
            return 0
        size = fsutil.tree_size(ckpts)
        shutil.rmtree(ckpts, ignore_errors=True)
        return size

    def touch(self) -> None:
        """Record a use (``store gc --older-than`` removes entries unused for that long)."""
        used = self.dir / ".last_used"
        used.touch(exist_ok=True)
        os.utime(used)

    def last_used(self) -> float:
        for name in (".last_used", "COMPLETE", ".lock"):
            try:
                return (self.dir / name).stat().st_mtime
            except OSError:
                continue
        try:
            return self.dir.stat().st_mtime
        except OSError:
            return 0.0

    def verify(self, full: bool = False) -> list[str]:
        """Problems of a complete entry's files against COMPLETE (empty: intact). Cheap by default: sizes, mtimes
        and sampled hashes (a file whose mtime moved is hashed in full); ``full``: every file's SHA-256."""
        rec = self.record()
        if not rec or "files" not in rec:
            return ["COMPLETE is missing or unreadable"]
        recorded = rec["files"]
        problems = check_files(self.dir, recorded, full)
        extra = [str(f.relative_to(self.dir)) for f in self._kept_files()
                 if str(f.relative_to(self.dir)) not in recorded]
        problems += [f"{rel}: not part of the completed entry" for rel in extra]
        return problems

    def invalidate(self) -> None:
        """Forget a damaged entry's result, so that it is trained again (its folder stays, its lock too)."""
        (self.dir / "COMPLETE").unlink(missing_ok=True)
        for name in KEPT:
            p = self.dir / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def resume_checkpoint(self) -> tuple[str | None, list[tuple[str, str]]]:
        """The newest valid Trainer checkpoint (or None) and the newer ones skipped, with why."""
        skipped = []
        for ckpt in sorted((self.dir / "checkpoints").glob("checkpoint-*"), key=_step, reverse=True):
            if not ckpt.is_dir() or ckpt.is_symlink():
                continue
            problem = checkpoint_problem(ckpt)
            if problem is None:
                return str(ckpt), skipped
            skipped.append((ckpt.name, problem))
        return None, skipped

    def last_checkpoint(self) -> str | None:
        return self.resume_checkpoint()[0]

    def size(self) -> int:
        return fsutil.tree_size(self.dir)


# -- run folders get the entry's files without sharing writable inodes -----------------------------------------------
FICLONE = 0x40049409  # ioctl: reflink (copy-on-write clone) on btrfs, XFS, bcachefs, OCFS2...


def _reflink(src: Path, dst: Path) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return False
    try:
        with open(src, "rb") as s, open(dst, "wb") as d:
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
        shutil.copystat(src, dst)
        return True
    except OSError:
        dst.unlink(missing_ok=True)
        return False


PLACEMENT_ENV = "ALIGNCTL_STORE_LINKS"  # auto (default) | link | copy: how run folders get the store's files


def placement() -> str:
    value = os.environ.get(PLACEMENT_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "link", "copy"):
        raise ValueError(f"{PLACEMENT_ENV}={value!r}: use auto, link or copy")
    return value


def place_file(src: Path, dst: Path) -> str:
    """Put ``src``'s content at ``dst`` so that writing ``dst`` can never change ``src``: a reflink (its own inode,
    shared blocks, no extra disk) where the file system has them; else a hard link to the read-only store file when
    this process is not root (an in-place write through it then fails with PermissionError); else a copy.
    ``ALIGNCTL_STORE_LINKS=copy`` always copies; ``=link`` hard-links even as root (no extra disk, but a root
    process writing into a run's final/ then changes the store entry: the reuse check finds it and retrains).
    Returns how: reflink | link | copy."""
    dst.unlink(missing_ok=True)
    mode = placement()
    if mode != "copy" and _reflink(src, dst):
        return "reflink"
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    if mode == "link" or (mode == "auto" and not root and not os.access(src, os.W_OK)):
        try:
            os.link(src, dst)
            return "link"
        except OSError:
            pass
    shutil.copy2(src, dst)
    return "copy"


def link_tree(src: Path, dst: Path) -> dict[str, int]:
    """Make ``dst`` a plain folder with ``src``'s files (see :func:`place_file`); returns bytes per method."""
    if not src.is_dir() or src.is_symlink():
        raise FileNotFoundError(f"{src}: no such store folder")
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    how: dict[str, int] = {}
    for f in fsutil.tree_files(src):
        target = tmp / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        method = place_file(f, target)
        how[method] = how.get(method, 0) + f.stat().st_size
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return how


def link_tree_file(src: Path, dst: Path) -> str:
    return place_file(src, dst)


# -- the store as a whole (alignctl store ...) -----------------------------------------------------------------------
def entries(store_dir: str | os.PathLike) -> list[Entry]:
    """Every entry folder of a store (complete or not); not ``.trash-*`` (entries being deleted by store gc/rm)."""
    root = Path(store_dir)
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.is_symlink() and "-" in d.name and not d.name.startswith("."):
            trainer, _, fp = d.name.rpartition("-")
            e = Entry(root, trainer, fp)
            rec = e.record()
            if rec and str(rec.get("fingerprint", "")).startswith(fp):
                e.fingerprint = rec["fingerprint"]
            out.append(e)
    return out


def holder(entry: Entry) -> dict | None:
    """The live holder of an entry's lock (None when unlocked or the lock is stale), judged at once by
    :func:`alignctl.fsutil.lock_is_live`: its pid where it ran in this pid space, else its heartbeat."""
    info = fsutil.read_lock(entry.dir / ".lock")
    return info if fsutil.lock_is_live(info, fsutil.lock_settings()["stale"]) else None
