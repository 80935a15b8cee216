"""Stage fingerprints and the stage store shared by runs.

A stage's fingerprint hashes everything that determines its weights: its trainer,
its TRL fields except those that cannot change the weights (logging, saving,
evaluation cadence, output names), its data spec and the content of local data
files (or the Hub revision), the model settings, precision and peft settings, the
fingerprints of the stages it links to (``from``, ``ref``, ``reward``, ``value``)
and the alignctl / TRL / transformers versions.

Completed stages live in the store (default ``<output_root>/.store``), one entry per
fingerprint. An entry is trained under a file lock, so concurrent sweep jobs that
share a stage wait for the one training it; its ``final/`` appears by rename once
fully written, and ``COMPLETE`` is written last. A run whose stage is already
complete reuses the entry instead of training, and an interrupted entry keeps its
Trainer checkpoints, so re-running the same command resumes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from alignctl import models

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
# Spec keys that name places, not weights; links are replaced by the linked stage's fingerprint.
PLACE_KEYS = {"name", "output_dir", "run_dir", "recipe", "cache_dir", "store_dir", "label", "run_stage_dir"}
LINKS = (("from", "init_path"), ("ref", "ref_path"), ("reward", "reward_path"), ("value", "value_path"))
FORMAT = 1


def _file_digest(path: Path, h) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def data_identity(d: dict | None) -> Any:
    """Spec of a data set plus the content hash of its local files (or its Hub revision)."""
    if not d:
        return d
    out = {k: v for k, v in d.items() if k not in PLACE_KEYS}
    p = Path(d["path"])
    if d.get("local") and p.exists():
        h = hashlib.sha256()
        for f in sorted([p] if p.is_file() else [f for f in p.iterdir() if f.is_file()]):
            h.update(f.name.encode())
            _file_digest(f, h)
        out["path"] = p.name
        out["content"] = h.hexdigest()
    return out


def model_identity(path: str, revision: str | None = None) -> Any:
    """A base model's identity: built-in name, Hub id + revision, or a local folder's file names/sizes/mtimes."""
    if models.is_tiny(path):
        return {"tiny": models.tiny_key(path)}
    p = Path(path).expanduser()
    if p.exists():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return {"local": [(str(f.relative_to(p)), f.stat().st_size, int(f.stat().st_mtime)) for f in files]}
    return {"hub": path, "revision": revision or "main"}


def _versions() -> dict[str, str | None]:
    out = {}
    for pkg in ("alignctl", "trl", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:  # pragma: no cover
            out[pkg] = None
    return out


def fingerprints(stages: list[dict]) -> dict[str, str]:
    """Fingerprint of every stage, in order (upstream fingerprints feed downstream ones)."""
    fps: dict[str, str] = {}
    versions = _versions()
    for s in stages:
        ident: dict[str, Any] = {k: v for k, v in s.items()
                                 if k not in PLACE_KEYS and k not in dict(LINKS) and k not in {p for _, p in LINKS}}
        ident["args"] = {k: v for k, v in s.get("args", {}).items() if k not in NON_WEIGHT_ARGS}
        ident["data"] = data_identity(s.get("data"))
        model = s.get("model") or {}
        for link, path_key in LINKS:
            target = s.get(link)
            if target is not None and target in fps:
                ident[link] = fps[target]
            elif s.get(path_key):
                ident[link] = model_identity(s[path_key], model.get("revision"))
        ident["versions"] = versions
        ident["format"] = FORMAT
        blob = json.dumps(ident, sort_keys=True, default=str)
        fps[s["name"]] = hashlib.sha256(blob.encode()).hexdigest()
    return fps


class Entry:
    """One store entry: <store>/<trainer>-<fingerprint[:16]>/ with final/, checkpoints/, metrics.json, COMPLETE."""

    def __init__(self, store_dir: str | os.PathLike, trainer: str, fingerprint: str):
        self.dir = Path(store_dir) / f"{trainer}-{fingerprint[:16]}"
        self.fingerprint = fingerprint

    @property
    def final(self) -> Path:
        return self.dir / "final"

    def complete(self) -> bool:
        return (self.dir / "COMPLETE").is_file() and self.final.is_dir()

    def metrics(self) -> dict:
        path = self.dir / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def mark_complete(self, metrics: dict) -> None:
        from alignctl.pipeline import write_json

        write_json(self.dir / "metrics.json", metrics)
        write_json(self.dir / "COMPLETE", {"fingerprint": self.fingerprint})

    def last_checkpoint(self) -> str | None:
        """The newest complete Trainer checkpoint (the Trainer writes trainer_state.json last)."""
        done = [p for p in (self.dir / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
        ckpts = sorted(done,
                       key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
        return str(ckpts[-1]) if ckpts else None

    @contextlib.contextmanager
    def lock(self):
        """Exclusive lock on this entry (blocks while another process trains it)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def link_tree(src: Path, dst: Path) -> None:
    """Make ``dst`` a plain folder with ``src``'s files, hard-linked (copied across file systems)."""
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for f in src.rglob("*"):
        target = tmp / f.relative_to(src)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def link_tree_file(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
