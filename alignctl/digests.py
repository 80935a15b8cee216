"""What identifies files on disk: stat signatures, SHA-256 digests (through the digest cache), the records of an
entry's files and the cheap check against them, and a data set's local files.

A file's SHA-256 is computed once: the digest cache (``<cache>/digests/``) keeps it under the file's full stat
signature (path, device, inode, size, mtime and ctime; inode and ctime cannot be set back by tar, ``cp -p``, rsync
or touch), so unchanged files are not read again and a replaced one always is. A record of a file (:func:`record`)
holds its size, mtime, a sampled hash (8 blocks of 4 KiB spread over it) and its full SHA-256; :func:`check_files`
compares files with their records, cheaply by default.

Used by alignctl.fingerprint (fingerprints), alignctl.store (entries), alignctl.data (a data set's load is keyed by
and compared with its files) and alignctl.models (cached builds): a leaf module, so that none of them imports another
for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from alignctl import fsutil
from alignctl.errors import DataChanged

log = logging.getLogger("alignctl")


def _file_digest(path: Path, h) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


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


def content_digest(files: list[Path], cache_dir: str | os.PathLike | None = None, root: Path | None = None,
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


def files_unchanged(recorded: dict, files: list[Path], cache_dir=None, root: Path | None = None) -> bool:
    """The files are those ``recorded`` (a data or model check): the same stat signatures, or else the same paths
    and the same content (touched, or rewritten with the same bytes)."""
    if signatures(files) == recorded["files"]:
        return True
    return [f[0] for f in recorded["files"]] == [str(f) for f in files] and \
        content_digest(files, cache_dir, root) == recorded["content"]


def tree_hash(root: Path) -> str:
    """SHA-256 over the names and contents of the Python files under ``root``."""
    h = hashlib.sha256()
    for f in sorted(Path(root).rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        h.update(str(f.relative_to(root)).encode())
        _file_digest(f, h)
    return h.hexdigest()


SAMPLE_BLOCKS, SAMPLE_BYTES = 8, 1 << 12  # the cheap check hashes 8 blocks of 4 KiB spread over each file


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


def record(path: Path, full: bool = True) -> dict:
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
    return {str(f.relative_to(root)): record(f) for f in fsutil.tree_files(root)}


def data_files(path: str, local: bool) -> list[Path]:
    """A local data set's files (a file, or the files of a folder); none for a Hub data set or a missing path."""
    p = Path(path)
    if not (local and p.exists()):
        return []
    return sorted([p] if p.is_file() else [f for f in p.iterdir() if f.is_file()])


def data_changed(who: str, shown: str, how: str = "since this run started and fingerprinted it") -> DataChanged:
    """The error for a data set (``shown``: its label or path) whose files are not the ones fingerprinted."""
    return DataChanged(f"{who}: its data ({shown}) changed on disk {how}; nothing was trained. Keep data files "
                       "unchanged while a run uses them, and re-run.")
