"""Run a resolved recipe: the stage graph, chaining, outputs and the manifest.

Layout of a run directory::

    <run dir>/config.yaml      the resolved configuration (secrets redacted)
    <run dir>/manifest.json    status, versions, stages and their metrics
    <run dir>/<stage>/spec.json        the stage's fully resolved spec
    <run dir>/<stage>/final/           plain Hugging Face model + tokenizer
    <run dir>/<stage>/checkpoints/     Trainer checkpoints

Everything checkable is checked before any model is loaded: the config (at
resolve time), every stage's data (loaded and column-checked) and every stage's
TRL config (constructed). Only then does the first stage train.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import signal
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from alignctl import fsutil

log = logging.getLogger("alignctl")

def redact(obj: Any) -> Any:
    """Secrets out of what is saved (config.yaml, manifest overrides, launch/command.txt, multirun.yaml): by key
    name and by value pattern, tokenizer fields left intact (alignctl.checks.redact)."""
    from alignctl.checks import redact as _redact

    return _redact(obj)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "alignctl"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# strict JSON (non-finite numbers -> null), atomic and durable: the one writer of the manifest, specs and COMPLETE
write_json = fsutil.write_json


class Manifest:
    def __init__(self, spec: dict, overrides: list[str]):
        self.path = Path(spec["run_dir"]) / "manifest.json"
        last = spec["stages"][-1]
        self.data: dict[str, Any] = {
            "recipe": spec["recipe"], "status": "running", "run_dir": spec["run_dir"],
            "store_dir": spec.get("store_dir"),
            "final_model": str(Path(last["output_dir"]) / "final"),
            "versions": versions(), "overrides": redact(list(overrides)),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "finished": None, "error": None,
            "stages": [{"name": s["name"], "trainer": s["trainer"], "status": "pending", "from": s["from"],
                        "output": str(Path(s["output_dir"]) / "final"), "metrics": {}} for s in spec["stages"]],
        }
        self.save()

    def stage(self, name: str) -> dict:
        return next(s for s in self.data["stages"] if s["name"] == name)

    def update(self, name: str | None = None, **fields) -> None:
        (self.stage(name) if name else self.data).update(fields)
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data, mode=0o600)  # overrides and paths: the owner's only


def stage_specs(spec: dict) -> list[dict]:
    """Each stage's spec, complete on its own (what a worker process needs, and nothing from Hydra)."""
    shared = {k: spec[k] for k in ("model", "precision", "cache_dir", "run_dir", "recipe", "store_dir")}
    return [{**shared, **s} for s in spec["stages"]]


def preflight(stages: list[dict]) -> list[dict]:
    """Everything checkable before anything trains, for every stage: its TRL config is built (TRL's own
    validation; all stages first, so a bad field of the last stage fails in seconds); then the stages are prepared
    (:func:`_prepare`: precision resolved, local data and model folders identified by content), then each stage's
    data is loaded through the cache that content keys and column-checked, and what this machine needs is checked
    (attention kernel, 4-bit). Returns the prepared stages (what is fingerprinted and run)."""
    import importlib

    from alignctl import checks, models
    from alignctl.errors import ConfigError
    from alignctl.runner import StageContext
    from alignctl.stages import STAGES

    problems = []
    for s in stages:
        kind = STAGES[s["trainer"]]
        module, _, cls = kind.config_class.rpartition(".")
        try:
            with models.training_environment(s, note=False):  # as the stage will see it (no inherited FSDP_* ...)
                config = getattr(importlib.import_module(module), cls)(**StageContext.args_for(s))
            problems += checks.report_to_problems(getattr(config, "report_to", None), f"stages.{s['name']}")
        except (ValueError, TypeError, NotImplementedError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            problems.append(f"stages.{s['name']}: {kind.config_class} rejects the settings: {first}")
    if problems:  # no hashing and no data loading for a run that cannot start
        raise ConfigError(problems)
    stages = _prepare(stages)
    _preflight_data(stages)
    return stages


def _preflight_data(stages: list[dict]) -> None:
    """Each stage's data loaded (as the stage will load it) and column-checked; its chat template renders it."""
    from alignctl import data, models, store
    from alignctl.errors import ConfigError
    from alignctl.stages import STAGES

    problems: list[str] = []
    tokenizer = None
    for s in stages:
        kind = STAGES[s["trainer"]]
        try:  # data generated by an earlier stage does not exist yet (alignctl.stages.generate)
            train, _ = (None, None) if s["data"].get("stage") else data.load(s["data"], kind.data_kind,
                                                                             f"stages.{s['name']}")
        except ConfigError as e:
            problems += e.problems
            train = None
        except store.DataChanged as e:
            problems.append(str(e))
            train = None
        problems += [p for p in models.device_problems(s) if p not in problems]  # attention, 4-bit on this machine
        conversations = _sample_conversations(train) if train is not None and kind.output == "causal_lm" else []
        if conversations:  # the chat template every stage applies (it travels with final/) renders this data
            if tokenizer is None:
                base = models.materialize(s["model"]["name_or_path"], s["cache_dir"], s["model"])
                tokenizer = models.load_tokenizer(base, s["model"])
            found = models.template_problems(tokenizer, conversations, s["data"].get("label", f"stages.{s['name']}.data"),
                                             model=str(s["model"]["name_or_path"]),
                                             assistant_only_loss=bool(s["args"].get("assistant_only_loss")))
            problems += [p for p in found if p not in problems]
    if problems:
        raise ConfigError(problems)


def _sample_conversations(ds, limit: int = 2000) -> list[list[dict]]:
    """The first conversation of a data set, and its first one with a system turn (among the first ``limit`` rows):
    what a chat template must render."""
    def conversation(row: dict) -> list | None:
        if isinstance(row.get("messages"), list):
            return row["messages"]
        prompt, answer = row.get("prompt"), row.get("chosen", row.get("completion"))
        if not isinstance(prompt, list):
            return None
        return prompt + (answer if isinstance(answer, list) else [])

    out = []
    for row in ds.select(range(min(len(ds), limit))):
        conv = conversation(row)
        if not conv:
            return out  # not conversational: no chat template involved
        if not out or any(m.get("role") == "system" for m in conv):
            out.append(conv)
        if len(out) == 2:
            break
    return out


def _write_private(path: Path, text: str) -> None:
    """Write a file that holds configuration: readable by the user only (0600), replaced atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run(spec: dict, overrides: list[str] = (), config_yaml: str | None = None) -> dict:
    """Train (or reuse from the store) every stage in order; returns the manifest. The run directory is locked for
    the run's lifetime: a second run in the same directory stops with a configuration error."""
    with _run_dir_lock(Path(spec["run_dir"])):
        return _run(spec, overrides, config_yaml)


def _run(spec: dict, overrides: list[str] = (), config_yaml: str | None = None) -> dict:
    from alignctl import evaluate, store

    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    if config_yaml is not None:
        _write_private(run_dir / "config.yaml", config_yaml)
    stages = stage_specs(spec)
    try:  # before anything trains: what this machine lacks for the launcher (cheap, first), then every stage's
        _launch_preflight(spec.get("launcher"), None)  # TRL config, data and models
        stages = preflight(stages)  # prepared: precision resolved, data and model folders identified by content
    except Exception as e:  # recorded: the run failed, every stage still pending
        Manifest(spec, list(overrides)).update(status="failed", error=str(e).splitlines()[0][:500] if str(e) else
                                               type(e).__name__, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        raise
    fps = store.fingerprints(stages, spec.get("launcher"))
    for s in stages:  # evaluation settings change no weights: added after fingerprinting (alignctl.evaluate)
        s["eval"] = evaluate.stage_settings(spec.get("eval") or {}, s, stages, spec.get("seed", 42))
    manifest = Manifest(spec, list(overrides))
    try:
        with _stop_on_sigterm():
            _launch_preflight(spec.get("launcher"), manifest)
            for s in stages:
                _run_one(s, store.Entry(spec["store_dir"], s["trainer"], fps[s["name"]]), manifest,
                         spec.get("launcher"))
    except BaseException as e:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        manifest.update(status=status, error=str(e).splitlines()[0][:500] if str(e) else type(e).__name__,
                        finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        raise
    manifest.update(status="completed", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), store=_store_line(spec, manifest))
    _write_report(manifest.data)
    return manifest.data


def _launch_preflight(launcher: dict | None, manifest: Manifest | None) -> None:
    """What this machine lacks for the launcher (e.g. DeepSpeed); the launcher goes into the manifest."""
    from alignctl import launch
    from alignctl.spec import ConfigError

    problems = launch.runtime_problems(launcher)
    if problems:
        raise ConfigError(problems)
    if launcher and manifest is not None:
        manifest.update(launcher={"kind": launcher["kind"], "world_size": launcher["world_size"],
                                  "distributed": launcher["distributed"], "description": launch.describe(launcher)})


def _prepare(stages: list[dict]) -> list[dict]:
    """What the orchestrator fixes before fingerprinting: the precision actually used on this machine (``auto``
    resolved, QLoRA compute dtype too); each stage's local data content + file signatures (``data_check``, also in
    its data spec: the load is keyed by it and compared with it) and local model folders' (``model_check``,
    compared when the stage starts). Unchanged files are not read again (the digest cache in ``cache_dir``)."""
    from alignctl import store

    stages = store.resolve_numerics(stages)
    memo: dict = {}
    for s in stages:
        d = s.get("data")
        # generated data (a generate stage's output) is written during the run: its producer's fingerprint covers it
        s["data_check"] = None if (d or {}).get("stage") else store.data_check(d, s.get("cache_dir"))
        if d:
            s["data"] = {**d, "data_check": s["data_check"], "cache_dir": s.get("cache_dir")}
        s["model_check"] = store.model_checks(s, s.get("cache_dir"), memo)
    return stages


@contextlib.contextmanager
def _run_dir_lock(run_dir: Path):
    from alignctl.errors import ConfigError

    run_dir.mkdir(parents=True, exist_ok=True)
    # a live run there: refused at once; a run killed on another node: taken over once its heartbeat is stale
    lock = fsutil.FileLock(run_dir / ".alignctl.lock", f"run directory {run_dir}", timeout=None, only_if_dead=True)
    try:
        lock.acquire()
    except fsutil.LockTimeout:
        raise ConfigError([f"hydra.run.dir: {run_dir} is in use by another alignctl run "
                           f"({fsutil.describe_holder(fsutil.read_lock(lock.path))}); choose another run directory"
                           ]) from None
    try:
        yield
    finally:
        lock.release()


def upstream_digest(s: dict, manifest: Manifest) -> str:
    """A digest of the linked stages' completed files (their COMPLETE records): an upstream stage trained again
    under the same fingerprint (its entry removed, non-deterministic GPU kernels) gives other weights."""
    import hashlib

    from alignctl import store

    h = hashlib.sha256()
    for link in ("from", "ref", "reward", "value"):
        name = s.get(link)
        up = next((st for st in manifest.data["stages"] if st["name"] == name), None) if name else None
        if up and up.get("fingerprint"):
            rec = store.Entry(manifest.data["store_dir"], up["trainer"], up["fingerprint"]).record() or {}
            h.update(json.dumps([link, rec.get("files")], sort_keys=True).encode())
    return h.hexdigest()


def _check_upstream(s: dict, entry, manifest: Manifest) -> str:
    """Checkpoints written on top of other upstream weights than the ones at hand are dropped (a resume would mix
    them); the upstream digest is recorded in the entry, then in COMPLETE."""
    digest = upstream_digest(s, manifest)
    marker = entry.dir / "upstream.json"
    try:
        before = json.loads(marker.read_text()).get("digest")
    except (OSError, ValueError, AttributeError):
        before = None
    if before and before != digest and (entry.dir / "checkpoints").exists():
        log.warning("stage %s: the stages it starts from were trained again since its checkpoints were written; "
                    "dropping them and training from the start", s["name"])
        entry.drop_checkpoints()
    entry.dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"digest": digest})
    return digest


def _resume_point(s: dict, entry) -> str | None:
    """The checkpoint to resume the stage from: the newest valid one (older ones when newer are damaged); None for
    stage kinds that cannot resume (their stale checkpoints are dropped)."""
    from alignctl.stages import module

    ckpt, skipped = entry.resume_checkpoint()
    for name, why in skipped:
        log.warning("stage %s: skipping checkpoint %s: %s", s["name"], name, why)
    cannot = getattr(module(s["trainer"]), "NO_RESUME", None)
    if cannot and (ckpt or skipped):
        log.warning("stage %s: cannot resume: %s; it starts again from its initial weights", s["name"], cannot)
        entry.drop_checkpoints()
        return None
    if ckpt:
        step = json.loads((Path(ckpt) / "trainer_state.json").read_text())["global_step"]
        log.info("stage %s: resuming from %s (step %d)", s["name"], Path(ckpt).name, step)
    elif skipped:
        log.warning("stage %s: no valid checkpoint to resume from; training from the start", s["name"])
    return ckpt


def _run_one(s: dict, entry, manifest: Manifest, launcher: dict | None = None) -> None:
    """Reuse a completed store entry (after checking its files) or train it (resuming from its newest valid
    checkpoint) under the entry's lock; then place final/ (and adapter/, log_history.json, samples.jsonl) into the
    run. The stage runs through ``launcher`` (alignctl.launch: in this process, or torchrun / accelerate ranks)."""
    import uuid

    from alignctl import launch, store

    stage_dir = Path(s["output_dir"])
    stage_dir.mkdir(parents=True, exist_ok=True)
    # attempt: the ranks refuse a spec.json with another attempt id (another run that wrote the same file)
    work = {**s, "output_dir": str(entry.dir), "fingerprint": entry.fingerprint, "attempt": uuid.uuid4().hex[:12]}
    t0 = time.time()
    world_size = s.get("world_size", 1)
    manifest.update(s["name"], status="running", fingerprint=entry.fingerprint, started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    with entry.lock() as lock:
        reused = None
        if entry.complete():
            problems = entry.verify()
            if problems:
                log.warning("stage %s: store entry %s is damaged (%s); training it again", s["name"], entry.dir,
                            "; ".join(problems[:3]) + (f"; {len(problems) - 3} more" if len(problems) > 3 else ""))
                entry.invalidate()
            else:
                log.info("stage %s: reusing completed stage %s (same fingerprint, files checked)", s["name"],
                         entry.dir)
                metrics, reused = entry.metrics(), str(entry.dir)
                if not (entry.record() or {}).get("keep_checkpoints"):
                    entry.drop_checkpoints()  # left by a run killed between COMPLETE and the clean-up
                entry.touch()
        if reused is None:
            upstream = _check_upstream(s, entry, manifest)
            work["resume_from"] = _resume_point(s, entry)
            write_json(stage_dir / "spec.json", work, mode=0o600)
            log.info("stage %s (%s): starting from %s", s["name"], s["trainer"], s["init_path"])
            try:
                result = launch.run_stage(work, stage_dir / "spec.json", launcher)
                metrics, world_size = result["metrics"], result.get("world_size", world_size)
            except BaseException as e:
                status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
                manifest.update(s["name"], status=status, seconds=round(time.time() - t0, 1))
                raise
            if lock.lost:  # stalled past the stale timeout: another process took the entry over; it decides
                manifest.update(s["name"], status="failed", seconds=round(time.time() - t0, 1))
                raise launch.StageFailed(s["name"], "(lost its store lock)", f"another process took over {entry.dir} "
                                         "while this one trained it; nothing was marked complete. Re-run: the stage "
                                         "is reused once the other process completes it")
            data = s.get("data_check") or {}
            entry.mark_complete(metrics, keep_checkpoints=bool(s.get("keep_checkpoints")),
                                extra={"stage": s["name"], "trainer": s["trainer"], "data_content": data.get("content"),
                                       "upstream": upstream})
        write_json(stage_dir / "spec.json", work, mode=0o600)
        placed = store.link_tree(entry.final, stage_dir / "final")
        if (entry.dir / "adapter").is_dir():  # lora/qlora: the trained adapter, kept beside the merged final/
            store.link_tree(entry.dir / "adapter", stage_dir / "adapter")
        for extra in ("log_history.json", "samples.jsonl"):
            if (entry.dir / extra).is_file():
                store.link_tree_file(entry.dir / extra, stage_dir / extra)
        size = (entry.record() or {}).get("bytes")
    if placed.get("copy"):
        log.info("stage %s: final/ copied from the store (%s; %s)", s["name"], fsutil.human(placed["copy"]),
                 "running as root, a hard link would let writes reach the store" if os.geteuid() == 0
                 else "the store is on another file system")
    manifest.update(s["name"], status="completed", metrics=metrics, reused_from=reused,
                    seconds=round(time.time() - t0, 1), world_size=world_size,
                    distributed=s.get("distributed", "none"), bytes=size, final_placed_by=sorted(placed))
    log.info("stage %s: %s in %.1f s, final weights in %s", s["name"], "reused" if reused else "completed",
             time.time() - t0, stage_dir / "final")


def _store_line(spec: dict, manifest: Manifest) -> dict:
    """Size of the store and what this run added to it (the run summary's size line)."""
    from alignctl import store

    try:
        entries = store.entries(spec["store_dir"])
        total = sum(e.size() for e in entries)
        added = sum(s.get("bytes") or 0 for s in manifest.data["stages"] if not s.get("reused_from"))
    except OSError as e:  # a size line must never fail a finished run
        log.warning("could not measure the store: %s", e)
        return {}
    log.info("store %s: %d entries, %s; this run added %s (inspect: alignctl store ls; clean: alignctl store gc)",
             spec["store_dir"], len(entries), fsutil.human(total), fsutil.human(added))
    return {"dir": spec["store_dir"], "entries": len(entries), "bytes": total, "added_bytes": added}


@contextlib.contextmanager
def _stop_on_sigterm():
    """SIGTERM stops a run like Ctrl-C: the running stage and the run are marked interrupted."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_report(manifest: dict) -> None:
    try:
        from alignctl import report

        report.write_run_report(manifest)
    except Exception as e:  # a report must never fail a finished run
        log.warning("could not write report.md: %s", e)
