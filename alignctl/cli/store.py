"""``alignctl store``: inspect and clean the stage store (no torch import).

    alignctl store ls      [--store DIR]                        entries: stage, status, size, last use, holder
    alignctl store du      [--store DIR]                        sizes: weights, checkpoints, what deleting would free
    alignctl store gc      [--store DIR] [--older-than DAYS] [--dry-run]
    alignctl store rm      [--store DIR] <fingerprint | entry | run dir>... [--dry-run]
    alignctl store verify  [--store DIR] [<fingerprint | entry | run dir>...]

``gc`` always removes leftovers (half-written ``*.partial`` folders, temporary files, the Trainer checkpoints of
completed entries that did not ask to keep them) and *stale* entries (completed by an alignctl of another store
format: no run of this one can reuse them, its fingerprints differ; ``ls`` shows them as stale); with
``--older-than DAYS`` it also removes every entry (complete or not) unused for that many days. ``rm`` removes the
named entries; a run directory names the entries of its stages.
Both work on an entry only while holding its lock, taken without waiting: an entry whose holder is alive (its pid
in this pid space, else a recent heartbeat) is skipped with a line naming it; a removed entry is first renamed to
``<store>/.trash-<name>-<random>`` under the lock, then deleted (``gc`` also deletes trash a killed gc/rm left).
Space is reported as what deleting actually frees: files still hard-linked from run folders stay on disk until those
runs are deleted too. ``verify`` re-hashes every
file of the complete entries against the SHA-256 recorded when they completed; exit code 1 if one is damaged.
The store is ``--store DIR``, else ``outputs/.store`` (the default ``<output_root>/.store``); for ``rm <run dir>`` it
is the one recorded in the run's manifest.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

from alignctl import fsutil, store
from alignctl.errors import LockTimeout, UsageError

DEFAULT_STORE = Path("outputs") / ".store"
LEFTOVER_SUFFIXES = (".partial", ".tmp", ".break")
ENTRY_NAME = re.compile(r"^[A-Za-z0-9_]+-[0-9a-f]{16}$")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", help="the store folder (default: outputs/.store)")
    p = argparse.ArgumentParser(prog="alignctl store", description="inspect and clean the stage store")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", parents=[common], help="list entries")
    sub.add_parser("du", parents=[common], help="sizes: weights, checkpoints, what deleting would free")
    gc = sub.add_parser("gc", parents=[common], help="remove leftovers, and entries unused for --older-than days")
    gc.add_argument("--older-than", type=float, metavar="DAYS", help="also remove entries unused for DAYS days")
    gc.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    rm = sub.add_parser("rm", parents=[common], help="remove entries by fingerprint, entry name or run directory")
    rm.add_argument("targets", nargs="+", metavar="fingerprint|entry|run-dir")
    rm.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    verify = sub.add_parser("verify", parents=[common], help="re-hash every file of complete entries")
    verify.add_argument("targets", nargs="*", metavar="fingerprint|entry|run-dir")
    return p


def _age(t: float) -> str:
    days = (time.time() - t) / 86400
    return f"{days * 24:.1f} h" if days < 1 else f"{days:.1f} d"


def _status(e: store.Entry) -> str:
    info = store.holder(e)
    if info:
        return f"locked by {info.get('host')}:{info.get('pid')}"
    if e.stale():  # another store format (an older alignctl): never reused; `store gc` removes it
        return f"stale (format {(e.record() or {}).get('format')})"
    return "complete" if e.complete() else "incomplete"


def _freeable(path: Path) -> tuple[int, int]:
    """(bytes deleting ``path`` frees, bytes that stay because run folders still hard-link them)."""
    unique = fsutil.tree_size(path, unique_only=True)
    return unique, fsutil.tree_size(path) - unique


def _store_dir(args) -> Path:
    return Path(args.store).expanduser() if args.store else DEFAULT_STORE


def _resolve(targets: list[str], root: Path | None) -> tuple[list[store.Entry], Path]:
    """Entries named by fingerprints (or prefixes of 8+ hex digits), entry names/paths or run directories."""
    found: list[store.Entry] = []
    for t in targets:
        p = Path(t).expanduser()
        if (p / "manifest.json").is_file():
            m = json.loads((p / "manifest.json").read_text())
            run_store = Path(root or m.get("store_dir") or (m.get("store") or {}).get("dir") or DEFAULT_STORE)
            root = root or run_store
            fps = [s.get("fingerprint") for s in m.get("stages", []) if s.get("fingerprint")]
            if not fps:
                raise UsageError(f"{t}: the run's manifest names no stage fingerprints")
            found += [e for e in store.entries(run_store) if e.fingerprint in fps or e.dir.name.split("-")[-1]
                      in {f[:16] for f in fps}]
            continue
        if p.is_dir() and ENTRY_NAME.match(p.name):
            root = root or p.parent
            found += [e for e in store.entries(p.parent) if e.dir.name == p.name]
            continue
        pool = store.entries(root or DEFAULT_STORE)
        key = t.lower()
        match = [e for e in pool if e.dir.name == t or (len(key) >= 8 and (e.fingerprint.startswith(key) or
                                                                          e.dir.name.split("-")[-1].startswith(key)))]
        if not match:
            raise UsageError(f"{t}: no such store entry, fingerprint or run directory in {root or DEFAULT_STORE}")
        found += match
    unique = {e.dir: e for e in found}
    return list(unique.values()), Path(root or DEFAULT_STORE)


# -- commands --------------------------------------------------------------------------------------------------------
def cmd_ls(root: Path) -> int:
    es = store.entries(root)
    if not es:
        print(f"{root}: no entries")
        return 0
    print(f"{'entry':<30} {'stage':<10} {'status':<24} {'size':>10} {'checkpoints':>12} {'last used':>10}")
    for e in es:
        rec = e.record() or {}
        ck = fsutil.tree_size(e.dir / "checkpoints")
        print(f"{e.dir.name:<30} {str(rec.get('stage', '-')):<10} {_status(e):<24} {fsutil.human(e.size()):>10} "
              f"{fsutil.human(ck) if ck else '-':>12} {_age(e.last_used()):>10}")
    print(f"{len(es)} entries, {fsutil.human(sum(e.size() for e in es))} in {root}")
    return 0


def cmd_du(root: Path) -> int:
    es = store.entries(root)
    total = sum(e.size() for e in es)
    ckpt = sum(fsutil.tree_size(e.dir / "checkpoints") for e in es)
    weights = sum(fsutil.tree_size(e.final) + fsutil.tree_size(e.dir / "adapter") for e in es)
    free, linked = _freeable(root) if root.is_dir() else (0, 0)
    complete = [e for e in es if e.complete()]
    print(f"store {root}: {len(es)} entries ({len(complete)} complete), {fsutil.human(total)}")
    print(f"  final weights + adapters: {fsutil.human(weights)}")
    print(f"  Trainer checkpoints (optimizer state; resumable runs): {fsutil.human(ckpt)}")
    print(f"  deleting the whole store would free {fsutil.human(free)}; {fsutil.human(linked)} stay on disk, "
          "hard-linked from run folders")
    return 0


def _held(e: store.Entry):
    """The entry's lock, taken at once (a holder judged dead from its lock file is taken over), or None after
    printing who holds it: gc and rm work on an entry only while holding its lock, so a run that takes the entry
    meanwhile waits for them, and they never delete under a run."""
    lock = e.lock(timeout=0, decide_now=True)
    try:
        return lock.acquire()
    except LockTimeout as err:
        print(f"  skip {e.dir.name}: locked by {fsutil.describe_holder(err.holder)}")
        return None


def _remove(e: store.Entry, dry: bool) -> tuple[int, int] | None:
    """Remove an entry unless a live process holds its lock; returns (freed, still linked) or None if skipped.
    Under the entry's lock the folder is renamed to ``<store>/.trash-<name>-<random>`` (one atomic step; a run
    that needs the entry afterwards starts a fresh one), then the trash is deleted."""
    if dry:
        info = store.holder(e)
        if info:
            print(f"  skip {e.dir.name}: locked by {fsutil.describe_holder(info)}")
            return None
        return _freeable(e.dir)
    lock = _held(e)
    if lock is None:
        return None
    trash = e.dir.parent / f".trash-{e.dir.name}-{uuid.uuid4().hex[:8]}"
    try:
        lock.stop_heartbeat()  # its lock file moves with the folder
        e.dir.rename(trash)
    finally:
        lock.release()  # nothing left to remove once moved; the lock file itself if the rename failed
    (trash / ".lock").unlink(missing_ok=True)  # ours: not part of what the entry took
    got = _freeable(trash)
    shutil.rmtree(trash, ignore_errors=True)
    return got


def _leftovers(e: store.Entry) -> list[Path]:
    """Half-written folders and temporary files of an entry, and a completed entry's checkpoints."""
    if not e.dir.is_dir():
        return []
    out = [p for p in e.dir.iterdir() if p.name.endswith(LEFTOVER_SUFFIXES)]
    rec = e.record()
    if rec and not rec.get("keep_checkpoints") and (e.dir / "checkpoints").exists():
        out.append(e.dir / "checkpoints")
    return out


def _clean(e: store.Entry, root: Path, dry: bool) -> tuple[int, int]:
    """Remove an entry's leftovers, under its lock (an entry being trained is skipped); returns (freed, linked)."""
    if not _leftovers(e):
        return 0, 0  # nothing to do: the entry is left untouched (not even locked)
    if dry:
        info = store.holder(e)
        if info:
            print(f"  skip {e.dir.name}: locked by {fsutil.describe_holder(info)}")
            return 0, 0
        return _drop_leftovers(e, root, dry)
    lock = _held(e)
    if lock is None:
        return 0, 0
    try:
        return _drop_leftovers(e, root, dry)  # listed again, under the lock
    finally:
        lock.release()


def _drop_leftovers(e: store.Entry, root: Path, dry: bool) -> tuple[int, int]:
    freed = linked = 0
    for p in _leftovers(e):
        f, ln = _freeable(p)
        freed, linked = freed + f, linked + ln
        print(f"  {'would remove' if dry else 'removed'} {p.relative_to(root)} ({fsutil.human(f)})")
        if not dry:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return freed, linked


def _trash(root: Path, dry: bool) -> tuple[int, int]:
    """Entries a killed gc/rm had moved to the store's trash but not yet deleted."""
    freed = linked = 0
    for t in sorted(root.glob(".trash-*")):
        if t.is_dir() and not t.is_symlink():
            f, ln = _freeable(t)
            freed, linked = freed + f, linked + ln
            print(f"  {'would remove' if dry else 'removed'} {t.name} (left by an interrupted gc/rm, "
                  f"{fsutil.human(f)})")
            if not dry:
                shutil.rmtree(t, ignore_errors=True)
    return freed, linked


def cmd_gc(root: Path, older_than: float | None, dry: bool) -> int:
    verb = "would free" if dry else "freed"
    freed, linked = _trash(root, dry)
    removed = 0
    cutoff = time.time() - older_than * 86400 if older_than is not None else None
    for e in store.entries(root):
        used = e.last_used()
        if (cutoff is not None and used < cutoff) or e.stale():
            got = _remove(e, dry)
            if got:
                removed += 1
                freed, linked = freed + got[0], linked + got[1]
                why = f"unused for {_age(used)}" if cutoff is not None and used < cutoff else "stale: an older format"
                print(f"  {'would remove' if dry else 'removed'} {e.dir.name} ({why}, {fsutil.human(got[0])})")
            continue
        f, ln = _clean(e, root, dry)
        freed, linked = freed + f, linked + ln
    print(f"gc {root}: {removed} entries removed; {verb} {freed} bytes ({fsutil.human(freed)})"
          + (f"; {fsutil.human(linked)} stay on disk, hard-linked from run folders" if linked else ""))
    return 0


def cmd_rm(root: Path | None, targets: list[str], dry: bool) -> int:
    es, root = _resolve(targets, root)
    freed = linked = 0
    skipped = 0
    for e in es:
        got = _remove(e, dry)
        if got is None:
            skipped += 1
            continue
        freed, linked = freed + got[0], linked + got[1]
        print(f"  {'would remove' if dry else 'removed'} {e.dir.name} ({fsutil.human(got[0])})")
    print(f"rm: {len(es) - skipped} entries; {'would free' if dry else 'freed'} {freed} bytes ({fsutil.human(freed)})"
          + (f"; {fsutil.human(linked)} stay on disk, hard-linked from run folders" if linked else ""))
    return 1 if skipped else 0


def cmd_verify(root: Path | None, targets: list[str]) -> int:
    es, root = _resolve(targets, root) if targets else (store.entries(root or DEFAULT_STORE), root)
    damaged = 0
    for e in es:
        if not e.complete():
            print(f"  {e.dir.name}: {_status(e)} (not verified)")
            continue
        problems = e.verify(full=True)
        if problems:
            damaged += 1
            print(f"  {e.dir.name}: DAMAGED: {'; '.join(problems[:5])}")
        else:
            print(f"  {e.dir.name}: ok ({fsutil.human(e.size())})")
    print(f"verify: {len(es)} entries, {damaged} damaged" + (" (a run retrains a damaged entry; or remove it: "
                                                              "alignctl store rm <entry>)" if damaged else ""))
    return 1 if damaged else 0


def run(args: list[str]) -> int:
    """``alignctl store <command>``: its exit code (2 for a usage error, one line on stderr)."""
    parser = _parser()
    try:
        ns = parser.parse_args(args)
    except SystemExit as e:  # argparse printed the usage / help
        return int(e.code or 0)
    root = Path(ns.store).expanduser() if ns.store else None
    problems = fsutil.lock_problems()  # ALIGNCTL_LOCK_*: how ls/gc/rm judge a lock's holder
    if problems:
        for p in problems:
            print(f"alignctl store: {p}", file=sys.stderr)
        return 2
    try:
        if ns.command in ("ls", "du", "gc"):
            root = root or DEFAULT_STORE
            if not root.is_dir():
                raise UsageError(f"--store: {root} is not a store folder (pass --store <output_root>/.store)")
            if ns.command == "ls":
                return cmd_ls(root)
            if ns.command == "du":
                return cmd_du(root)
            if ns.older_than is not None and not ns.older_than >= 0:  # also nan
                raise UsageError("--older-than: must be a number of days >= 0")
            return cmd_gc(root, ns.older_than, ns.dry_run)
        if ns.command == "rm":
            return cmd_rm(root, ns.targets, ns.dry_run)
        return cmd_verify(root, ns.targets)
    except UsageError as e:
        print(f"alignctl store: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
