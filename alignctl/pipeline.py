"""Run a resolved recipe (a :class:`alignctl.config.types.RunSpec`): pre-flight, the stage loop and the manifest.

Each stage goes through its store entry (:meth:`alignctl.store.Entry.reuse_or_train`: lock, seal, reuse or train,
resume, COMPLETE, placement into the run folder); this module records what happens in the manifest.

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
import logging
import os
import platform
import signal
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from alignctl import data, fsutil, launch, models, probe, store, trust
from alignctl.config import launcher as launch_config
from alignctl.config.types import RunSpec, StageSpec
from alignctl.errors import ConfigError, DataChanged, LockLost, LockTimeout
from alignctl.stages import STAGES

log = logging.getLogger("alignctl")


def redact(obj: Any) -> Any:
    """Secrets out of what is saved (config.yaml, manifest overrides, launch/command.txt, multirun.yaml): by key
    name and by value pattern, tokenizer fields left intact (alignctl.config.redact)."""
    from alignctl.config.redact import redact as _redact

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
    def __init__(self, spec: RunSpec, overrides: list[str]):
        self.path = Path(spec.run_dir) / "manifest.json"
        self.data: dict[str, Any] = {
            "recipe": spec.recipe, "status": "running", "run_dir": spec.run_dir, "store_dir": spec.store_dir or None,
            "final_model": str(Path(spec.stages[-1].stage_dir) / "final"),
            "versions": versions(), "overrides": redact(list(overrides)),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "finished": None, "error": None,
            "stages": [{"name": s.name, "trainer": s.kind, "status": "pending", "from": s.source.stage,
                        "output": str(Path(s.stage_dir) / "final"), "metrics": {}} for s in spec.stages],
        }
        self.save()

    def stage(self, name: str) -> dict:
        return next(s for s in self.data["stages"] if s["name"] == name)

    def update(self, name: str | None = None, **fields) -> None:
        (self.stage(name) if name else self.data).update(fields)
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data, mode=0o600)  # overrides and paths: the owner's only

    def entries(self) -> dict[str, store.Entry]:
        """The store entries of the stages that have started, by stage name (the upstream of later stages)."""
        return {s["name"]: store.Entry(self.data["store_dir"], s["trainer"], s["fingerprint"])
                for s in self.data["stages"] if s.get("fingerprint")}


def stage_specs(spec: RunSpec) -> list[StageSpec]:
    """Each stage's spec, complete on its own (what a worker process needs, and nothing from Hydra)."""
    return list(spec.stages)


def preflight(stages: list[StageSpec], launcher: dict | None = None) -> list[StageSpec]:
    """Everything checkable before anything trains, for every stage: its TRL config is built (TRL's own
    validation; all stages first, so a bad field of the last stage fails in seconds) and what this machine needs is
    checked (attention kernel, 4-bit) by :func:`check_configs`; then the stages are prepared (:func:`_prepare`:
    precision resolved, local data and model folders identified by content), then each stage's data is loaded through
    the cache that content keys and column-checked. Returns the prepared stages (what is fingerprinted and run)."""
    numerics = check_configs(stages, launcher)
    stages = _prepare(stages, numerics)
    _preflight_data(stages)
    return stages


def _preflight_data(stages: list[StageSpec]) -> None:
    """Each stage's data loaded (as the stage will load it) and column-checked; its chat template renders it."""
    problems: list[str] = []
    tokenizer = None
    for s in stages:
        kind = STAGES[s.kind]
        try:  # data generated by an earlier stage does not exist yet (alignctl.stages.generate)
            train, _ = (None, None) if s.data.source == "generated" else data.load(s.data, kind.data_kind,
                                                                                   f"stages.{s.name}")
        except ConfigError as e:
            problems += e.problems
            train = None
        except DataChanged as e:
            problems.append(str(e))
            train = None
        conversations = _sample_conversations(train) if train is not None and kind.output == "causal_lm" else []
        if conversations:  # the chat template every stage applies (it travels with final/) renders this data
            if tokenizer is None:
                base = models.materialize(s.model.name_or_path, s.cache_dir, s.model)
                tokenizer = models.load_tokenizer(base, s.model)
            found = models.template_problems(tokenizer, conversations, s.data.label or f"stages.{s.name}.data",
                                             model=str(s.model.name_or_path),
                                             assistant_only_loss=bool(s.args.get("assistant_only_loss")))
            problems += [p for p in found if p not in problems]
    if problems:
        raise ConfigError(problems)


def check_configs(stages: list[StageSpec], launcher: dict | None) -> list[dict]:
    """Resolve the numerics (``precision: auto``), build every stage's TRL config and check this machine's devices
    (alignctl.probe): in this process for the local launcher, in a short-lived one under torchrun / accelerate, so
    that the orchestrator never initialises CUDA or accelerate's state on GPU 0. ConfigError for a bad setting;
    returns each stage's resolved numerics (for :func:`_prepare`)."""
    result = probe.run(stages, launcher)
    if result["problems"]:  # no data loading for a run that cannot start
        raise ConfigError(result["problems"])
    return result["numerics"]


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


def run(spec: RunSpec, overrides: list[str] = (), config_yaml: str | None = None) -> dict:
    """Train (or reuse from the store) every stage in order; returns the manifest. The run directory is locked for
    the run's lifetime: a second run in the same directory stops with a configuration error."""
    with _run_dir_lock(Path(spec.run_dir)):
        return _run(spec, overrides, config_yaml)


def _run(spec: RunSpec, overrides: list[str] = (), config_yaml: str | None = None) -> dict:
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config_yaml is not None:
        _write_private(run_dir / "config.yaml", config_yaml)
    try:  # before anything trains: the key that seals what this run writes (alignctl.trust), what this machine
        trust.key()  # lacks for the launcher (cheap, first), then every stage's TRL config, data and models
        _launch_preflight(spec.launcher, None)
        stages = preflight(list(spec.stages), spec.launcher)  # prepared: precision resolved, data/models by content
    except Exception as e:  # recorded: the run failed, every stage still pending
        Manifest(spec, list(overrides)).update(status="failed", error=_first_line(e),
                                               finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        raise
    fps = store.fingerprints(stages, spec.launcher)  # each stage's eval settings (resolved with it) are outside it
    entries = [store.Entry(spec.store_dir, s.kind, fps[s.name]) for s in stages]
    manifest = Manifest(spec, list(overrides))
    try:
        with _stop_on_sigterm():
            _launch_preflight(spec.launcher, manifest)
            store.check_trust(entries, spec.store_named)  # before anything trains
            for s, entry in zip(stages, entries):  # store= given: its entries are trusted whoever sealed them
                _run_one(s, entry, manifest, spec.launcher, trusted_store=spec.store_named)
    except BaseException as e:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        manifest.update(status=status, error=_first_line(e), finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        raise
    manifest.update(status="completed", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), store=_store_line(spec, manifest))
    _write_report(manifest.data)
    return manifest.data


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0][:500] if str(e) else type(e).__name__


def _launch_preflight(launcher: dict | None, manifest: Manifest | None) -> None:
    """What this machine lacks for the launcher (e.g. DeepSpeed); the launcher goes into the manifest."""
    problems = launch_config.runtime_problems(launcher)
    if problems:
        raise ConfigError(problems)
    if launcher and manifest is not None:
        manifest.update(launcher={"kind": launcher["kind"], "world_size": launcher["world_size"],
                                  "distributed": launcher["distributed"],
                                  "description": launch_config.describe(launcher)})


def _prepare(stages: list[StageSpec], numerics: list[dict] | None = None) -> list[StageSpec]:
    """What the orchestrator fixes before fingerprinting: the precision actually used on this machine (``auto``
    resolved, QLoRA compute dtype too: ``numerics`` from :func:`check_configs`, else resolved here); each stage's
    local data content + file signatures (``data.check``: the load is keyed by it and compared with it) and local
    model folders' (``model_check``, compared when the stage starts). Unchanged files are not read again (the digest
    cache in ``cache_dir``)."""
    stages = store.resolve_numerics(stages) if numerics is None else [s.replace(**n) for s, n in zip(stages, numerics)]
    memo: dict = {}
    out = []
    for s in stages:
        d = s.data
        if d is not None:  # generated data (a generate stage's output) is written during the run: its producer's
            check = None if d.source == "generated" else store.data_check(d, s.cache_dir)  # fingerprint covers it
            s = s.replace(data=d.replace(check=check, cache_dir=s.cache_dir))
        out.append(s.replace(model_check=store.model_checks(s, s.cache_dir, memo)))
    return out


@contextlib.contextmanager
def _run_dir_lock(run_dir: Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    # a live run there: refused at once; a run killed on another node: taken over once its heartbeat is stale
    lock = fsutil.FileLock(run_dir / ".alignctl.lock", f"run directory {run_dir}", timeout=None, only_if_dead=True)
    try:
        lock.acquire()
    except LockTimeout:
        raise ConfigError([f"hydra.run.dir: {run_dir} is in use by another alignctl run "
                           f"({fsutil.describe_holder(fsutil.read_lock(lock.path))}); choose another run directory"
                           ]) from None
    try:
        yield
    finally:
        lock.release()


def _run_one(s: StageSpec, entry: store.Entry, manifest: Manifest, launcher: dict | None = None,
             trusted_store: bool = False) -> None:
    """One stage through its store entry (:meth:`alignctl.store.Entry.reuse_or_train`: reused, or trained through
    ``launcher``, alignctl.launch: in this process, or torchrun / accelerate ranks), recorded in the manifest.
    ``trusted_store``: the store was named (store=), so entries sealed by others are used too."""
    t0 = time.time()
    manifest.update(s.name, status="running", fingerprint=entry.fingerprint, started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    try:
        done = entry.reuse_or_train(s, lambda work, spec_path: launch.run_stage(work, spec_path, launcher),
                                    manifest.entries(), stop=_StopWhenLost(launcher), trusted_store=trusted_store,
                                    note=lambda **fields: manifest.update(s.name, **fields))
    except BaseException as e:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        manifest.update(s.name, status=status, seconds=round(time.time() - t0, 1))
        raise
    manifest.update(s.name, status="completed", metrics=done.metrics, reused_from=done.reused_from,
                    seconds=round(time.time() - t0, 1), world_size=done.world_size, distributed=s.distributed,
                    bytes=done.bytes, final_placed_by=sorted(done.placed))
    log.info("stage %s: %s in %.1f s, final weights in %s", s.name, "reused" if done.reused_from else "completed",
             time.time() - t0, Path(s.stage_dir) / "final")


class _StopWhenLost:
    """The entry lock's ``on_lost``: while a stage runs (:meth:`armed`), stop it at once, before it writes more:
    the launcher's process groups are killed (torchrun / accelerate), or the main thread is interrupted (local)."""

    def __init__(self, launcher: dict | None):
        import threading

        self.local = (launcher or {"kind": "local"})["kind"] == "local"
        self.running = False
        self.guard = threading.Lock()  # no interrupt is sent once the stage has returned

    def __call__(self) -> None:
        import _thread

        with self.guard:
            if not self.running:
                return
            if self.local:
                _thread.interrupt_main()
            else:
                launch.kill_live_groups()

    @contextlib.contextmanager
    def armed(self, lock: fsutil.FileLock):
        if lock.lost:
            raise LockLost(str(lock.path))
        previous = self._handle_sigint(lock) if self.local else None
        with self.guard:
            self.running = True
        try:
            yield
        finally:
            with self.guard:
                self.running = False
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    @staticmethod
    def _handle_sigint(lock: fsutil.FileLock):
        """interrupt_main works through the SIGINT handler: where SIGINT is ignored (a job started in the background
        by a script), install one that interrupts only for a lost lock. Returns the handler to restore, or None."""
        try:
            current = signal.getsignal(signal.SIGINT)
            if current is not signal.SIG_IGN:  # Python's own handler (KeyboardInterrupt), or one we must keep
                return None

            def lost_only(signum, frame):
                if lock.lost:
                    raise KeyboardInterrupt("lost the store lock")

            signal.signal(signal.SIGINT, lost_only)
            return current
        except ValueError:  # not the main thread: the stage is checked when it returns
            return None


def _store_line(spec: RunSpec, manifest: Manifest) -> dict:
    """Size of the store and what this run added to it (the run summary's size line)."""
    try:
        entries = store.entries(spec.store_dir)
        total = sum(e.size() for e in entries)
        added = sum(s.get("bytes") or 0 for s in manifest.data["stages"] if not s.get("reused_from"))
    except OSError as e:  # a size line must never fail a finished run
        log.warning("could not measure the store: %s", e)
        return {}
    log.info("store %s: %d entries, %s; this run added %s (inspect: alignctl store ls; clean: alignctl store gc)",
             spec.store_dir, len(entries), fsutil.human(total), fsutil.human(added))
    return {"dir": spec.store_dir, "entries": len(entries), "bytes": total, "added_bytes": added}


STOP_SIGNALS = ("SIGTERM", "SIGHUP")  # SIGHUP: the terminal went away (an ssh connection dropped without tmux)


@contextlib.contextmanager
def _stop_on_sigterm():
    """SIGTERM and SIGHUP stop a run like Ctrl-C: the running stage and the run are marked interrupted."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = {}
    try:
        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                previous[name] = signal.signal(getattr(signal, name), handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for name, old in previous.items():
            signal.signal(getattr(signal, name), old)


def _write_report(manifest: dict) -> None:
    try:
        from alignctl import report

        report.write_run_report(manifest)
    except Exception as e:  # a report must never fail a finished run
        log.warning("could not write report.md: %s", e)
