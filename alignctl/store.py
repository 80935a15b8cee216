"""The stage store shared by runs, and the sequence a stage goes through in it. A stage's fingerprint (what it
covers) is alignctl.fingerprint's; how a run folder gets an entry's files, alignctl.placement's.

The store (default ``<output_root>/.store``) has one entry per fingerprint, ``<trainer>-<fingerprint[:16]>/``. A run
goes through :meth:`Entry.reuse_or_train` for each stage: under the entry's lock (:class:`alignctl.fsutil.FileLock`,
an exclusive lock file with a heartbeat that works on shared file systems), it checks the entry's seal, reuses a
complete entry whose files verify (sizes, mtimes, a sampled hash of every file; a full hash of a file whose mtime
moved) and whose upstream weights are the run's, or trains it (resuming from its newest valid checkpoint). Once
trained, its files are fsync'd and made read-only, their sizes and SHA-256 are recorded in ``COMPLETE`` (written
last), and its Trainer checkpoints are deleted unless the stage keeps them. Run folders get the entry's files
reflinked, hard-linked (read-only, when not root) or copied, so nothing written into a run's ``final/`` reaches the
store.

``COMPLETE`` and an entry's ``upstream.json`` (written when training starts) are sealed with the user's key
(:mod:`alignctl.trust`); :meth:`Entry.trust_state` says whether what a run would take from an entry (a complete
entry, or checkpoints to resume) was sealed by this user. The rule built on it (the default store takes only the
user's entries, a named store any) is :func:`check_trust`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignctl import digests, fsutil, trust
from alignctl.config import links as link_table
from alignctl.config.types import StageSpec
from alignctl.digests import check_files
from alignctl.errors import ConfigError, LockLost, LockTimeout, StageFailed
from alignctl.fingerprint import FORMAT
from alignctl.placement import link_tree, link_tree_file

log = logging.getLogger("alignctl")

KEPT = ("final", "adapter", "log_history.json", "samples.jsonl", "metrics.json")  # what a complete entry holds
UPSTREAM = "upstream.json"  # an entry being trained: the upstream digest, sealed by the user who started it


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

    def stale(self) -> bool:
        """COMPLETE of another store format (an older alignctl): never reused, as every fingerprint changed since."""
        rec = self.record()
        return bool(rec) and rec.get("format") != FORMAT

    def metrics(self) -> dict:
        path = self.dir / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def lock(self, timeout: Any = fsutil.FROM_ENV, on_lost=None, decide_now: bool = False) -> fsutil.FileLock:
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
            files[str(f.relative_to(self.dir))] = digests.record(f)
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

    # -- the sequence a stage of a run goes through (alignctl.pipeline) ---------------------------------------------
    def reuse_or_train(self, stage: StageSpec, train: Callable[[StageSpec, Path], dict],
                       upstream: Mapping[str, Entry], stop: Any = None, trusted_store: bool = False,
                       note: Callable[..., None] | None = None) -> Outcome:
        """Reuse this entry for ``stage`` or train it, under the entry's lock, then place its files into the run.

        Under the lock: the entry must be this user's (:meth:`check_seal`); a complete entry is reused when its files
        verify and it was trained on the upstream weights at hand (``upstream``: the entries of the stages it links
        to, by stage name), else it is trained again (``note(retrained=why)``); training resumes from the newest
        valid checkpoint, runs ``train(work, spec path)`` (``{"metrics", "world_size"}``) and ends in COMPLETE. A
        lost lock stops it (``stop``: the lock's ``on_lost`` with an ``armed(lock)`` context, alignctl.pipeline) and
        nothing is marked complete. ``trusted_store``: the store was named (store=), entries others sealed are used."""
        stage_dir = Path(stage.stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        spec_path = stage_dir / "spec.json"
        # attempt: the ranks refuse a spec.json with another attempt id (another run that wrote the same file)
        work = stage.replace(entry_dir=str(self.dir), fingerprint=self.fingerprint, attempt=uuid.uuid4().hex[:12])
        with self._stage_lock(stage, stop) as lock:
            work = work.replace(lock_token=lock.token)  # rank 0 checks it before it replaces final/ (lifecycle, worker)
            self.check_seal(stage, trusted_store)
            t0 = time.perf_counter()
            metrics, world_size = self._reused(stage, upstream, note or (lambda **fields: None)), stage.world_size
            seconds = {"verify": round(time.perf_counter() - t0, 3)}  # a complete entry's files against its hashes
            reused = str(self.dir) if metrics is not None else None
            if metrics is None:
                work, metrics, world_size = self._train(work, train, upstream, lock, stop, spec_path)
            write_spec(spec_path, work)
            t0 = time.perf_counter()
            placed = self.place(stage_dir)
            seconds["place"] = round(time.perf_counter() - t0, 3)
            size = (self.record() or {}).get("bytes")
        if placed.get("copy"):
            log.info("stage %s: final/ copied from the store (%s; %s)", stage.name, fsutil.human(placed["copy"]),
                     "running as root, a hard link would let writes reach the store" if os.geteuid() == 0
                     else "the store is on another file system")
        return Outcome(metrics, reused, world_size, size, placed, seconds)

    @contextlib.contextmanager
    def _stage_lock(self, stage: StageSpec, stop: Any):
        """The entry's lock for a stage; waiting past ALIGNCTL_LOCK_TIMEOUT ends the stage with one line."""
        try:
            lock = self.lock(on_lost=stop).acquire()
        except LockTimeout as e:
            raise StageFailed(stage.name, "(waiting for its store entry)", str(e)) from None
        try:
            yield lock
        finally:
            lock.release()

    def check_seal(self, stage: StageSpec, trusted_store: bool) -> None:
        """The rule of :func:`check_trust`, under the entry's lock, just before the entry is used (its content may
        have changed since the run started): refused in the default store, logged in a named one."""
        why = untrusted(self)
        if why is None:
            return
        if not trusted_store:
            raise ConfigError([why])
        log.info("stage %s: store entry %s was not written by you (%s); trusted because the store was named on the "
                 "command line (store=%s)", stage.name, self.dir, _seal_phrase(self.trust_state()), self.dir.parent)

    def _reused(self, stage: StageSpec, upstream: Mapping[str, Entry], note: Callable[..., None]) -> dict | None:
        """The metrics of this entry when it is complete, intact and trained on the upstream weights at hand; None
        when the stage must be trained (a damaged or outdated entry is forgotten first)."""
        if not self.complete():
            return None
        why = self.not_reusable(stage, upstream)
        if why:
            log.warning("stage %s: store entry %s %s; training it again", stage.name, self.dir, why)
            note(retrained=why)
            self.invalidate()
            return None
        log.info("stage %s: reusing completed stage %s (same fingerprint, files checked)", stage.name, self.dir)
        metrics = self.metrics()
        if not (self.record() or {}).get("keep_checkpoints"):
            self.drop_checkpoints()  # left by a run killed between COMPLETE and the clean-up
        self.touch()
        return metrics

    def not_reusable(self, stage: StageSpec, upstream: Mapping[str, Entry]) -> str | None:
        """Why a complete entry must be trained again: its files are damaged, or it was trained on top of other
        upstream weights than this run's (an upstream entry removed or trained again since: N11)."""
        problems = self.verify()
        if problems:
            more = f"; {len(problems) - 3} more" if len(problems) > 3 else ""
            return "is damaged (" + "; ".join(problems[:3]) + more + ")"
        recorded = (self.record() or {}).get("upstream")
        if recorded is not None and recorded != upstream_digest(stage, upstream):
            return "was trained from other weights of the stages it links to than this run's (they were trained again)"
        return None

    def _train(self, work: StageSpec, train: Callable[[StageSpec, Path], dict], upstream: Mapping[str, Entry],
               lock: fsutil.FileLock, stop: Any, spec_path: Path) -> tuple[StageSpec, dict, int]:
        """Train the stage into this entry (resuming where it can) and mark it complete; returns the spec it trained
        with, its metrics and the world size it ran at."""
        digest = self.check_upstream(work, upstream)
        work = work.replace(resume_from=self.resume_point(work))
        write_spec(spec_path, work)
        log.info("stage %s (%s): starting from %s", work.name, work.kind, work.source.path)
        try:
            with stop.armed(lock) if stop is not None else contextlib.nullcontext():  # a lost lock stops it at once
                result = train(work, spec_path)
            if not lock.owned():  # checked again right before COMPLETE is written
                raise LockLost(str(lock.path))
        except BaseException:
            if lock.lost or not lock.owned():  # stalled past the stale timeout, another process took it over
                raise StageFailed(work.name, "(lost its store lock)", f"another process took over {self.dir} while "
                                  "this one trained it; the stage was stopped and nothing was marked complete. "
                                  "Re-run: the stage is reused once the other process completes it") from None
            raise
        check = work.data.check if work.data is not None else None
        self.mark_complete(result["metrics"], keep_checkpoints=work.keep_checkpoints,
                           extra={"stage": work.name, "trainer": work.kind,
                                  "data_content": check.content if check else None, "upstream": digest})
        return work, result["metrics"], result.get("world_size", work.world_size)

    def check_upstream(self, stage: StageSpec, upstream: Mapping[str, Entry]) -> str:
        """Checkpoints written on top of other upstream weights than the ones at hand are dropped (a resume would
        mix them); the upstream digest is recorded in the entry (``upstream.json``, sealed with the user's key: the
        entry is theirs while it trains), then in COMPLETE. Checkpoints someone else wrote in a named store keep
        that writer's seal when they are resumed from."""
        digest = upstream_digest(stage, upstream)
        before = (self.marker() or {}).get("digest")
        checkpoints = (self.dir / "checkpoints").exists()
        if before and before != digest and checkpoints:
            log.warning("stage %s: the stages it starts from were trained again since its checkpoints were written; "
                        "dropping them and training from the start", stage.name)
            self.drop_checkpoints()
            checkpoints = False
        self.dir.mkdir(parents=True, exist_ok=True)
        seal = self.trust_state()
        if not (checkpoints and before == digest and seal and not seal[1]):
            self.write_marker(digest)
        return digest

    def resume_point(self, stage: StageSpec) -> str | None:
        """The checkpoint to resume the stage from: the newest valid one (older ones when newer are damaged)."""
        ckpt, skipped = self.resume_checkpoint()
        for name, why in skipped:
            log.warning("stage %s: skipping checkpoint %s: %s", stage.name, name, why)
        if ckpt:
            step = json.loads((Path(ckpt) / "trainer_state.json").read_text())["global_step"]
            log.info("stage %s: resuming from %s (step %d)", stage.name, Path(ckpt).name, step)
        elif skipped:
            log.warning("stage %s: no valid checkpoint to resume from; training from the start", stage.name)
        return ckpt

    def place(self, stage_dir: Path) -> dict[str, int]:
        """The entry's final/ (and adapter/, log_history.json, samples.jsonl) into a run's stage folder
        (:func:`link_tree`); returns the bytes placed by each method."""
        placed = link_tree(self.final, stage_dir / "final")
        if (self.dir / "adapter").is_dir():  # lora/qlora: the trained adapter, kept beside the merged final/
            link_tree(self.dir / "adapter", stage_dir / "adapter")
        for extra in ("log_history.json", "samples.jsonl"):
            if (self.dir / extra).is_file():
                link_tree_file(self.dir / extra, stage_dir / extra)
        return placed


@dataclass(frozen=True)
class Outcome:
    """What :meth:`Entry.reuse_or_train` did (the manifest records it)."""
    metrics: dict
    reused_from: str | None  # the entry, when it was reused
    world_size: int
    bytes: int | None  # of the complete entry
    placed: dict[str, int]  # bytes placed into the run by method: reflink | link | copy
    seconds: dict[str, float]  # wall time of the store's own steps: verify (a reused entry's files), place


def write_spec(path: Path, spec: StageSpec) -> None:
    """A stage's spec.json (what its ranks read: :meth:`StageSpec.from_json`): the owner's only, replaced atomically."""
    fsutil.write_text_atomic(path, spec.to_json() + "\n", mode=0o600)


def upstream_digest(stage: StageSpec, upstream: Mapping[str, Entry]) -> str:
    """A digest of the linked stages' completed files (their COMPLETE records; ``upstream``: the entries of the run's
    stages by name): an upstream stage trained again under the same fingerprint (its entry removed,
    non-deterministic GPU kernels) gives other weights."""
    h = hashlib.sha256()
    for row in link_table.UPSTREAM:  # from, ref, reward, value, judge, audit (alignctl.config.links)
        for name in link_table.member_keys(stage.links, row):  # an ensemble's members: reward, reward.2, ...
            link = stage.links[name]
            up = upstream.get(link.stage) if link.stage else None
            if up is not None:
                h.update(json.dumps([name, (up.record() or {}).get("files")], sort_keys=True).encode())
    return h.hexdigest()


def untrusted(entry: Entry) -> str | None:
    """Why this user cannot take an entry's content as theirs (None: nothing in it, or sealed with their key)."""
    seal = entry.trust_state()
    if seal is None or seal[1]:
        return None
    return (f"store entry {entry.dir} was not written by you ({_seal_phrase(seal)}): alignctl reuses or resumes "
            f"only entries sealed with your key ({trust.KEY_ENV}) from the default store <output_root>/.store: name "
            "the store on the command line (store=DIR) to trust entries others wrote, or use another output_root")


def _seal_phrase(seal: tuple[str, bool, str]) -> str:
    what, _, who = seal
    if who == "not sealed":
        return f"{what} not sealed"
    mine = who.endswith(f" key {trust.key_id()}")  # this user's key id, but the record changed after sealing
    return f"{what} sealed by {who}" + (", changed since: its seal does not verify" if mine else "")


def check_trust(entries: list[Entry], named: bool) -> None:
    """Before anything trains: in the default store (chosen by output_root, which a recipe may set), every entry a
    run would reuse or resume must be sealed with this user's key; one line per other entry. ``named``: the store
    was named on the command line (store=), its entries are trusted whoever sealed them."""
    if named:
        return
    problems = [p for e in entries if (p := untrusted(e))]
    if problems:
        raise ConfigError(problems)


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
