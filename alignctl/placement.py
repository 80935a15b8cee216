"""Run folders get a store entry's files without duplicating their bytes: reflinked where the file system has them,
else hard-linked to the read-only store files (root included), else copied (``ALIGNCTL_STORE_LINKS``;
:func:`place_file`). A run folder costs kilobytes, whatever the model's size. A normal user cannot write through a
hard link to a read-only file; root can, and what it changes in the store is found by the check every reuse makes
(``Entry.verify``), which trains the stage again instead of reusing it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from alignctl import fsutil

# -- run folders get the entry's files without copying them ---------------------------------------------------------
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
    """Put ``src``'s content at ``dst`` without a second copy of its bytes: a reflink (its own inode, shared blocks:
    writing ``dst`` never changes ``src``) where the file system has them; else a hard link to the read-only store
    file (a normal user's in-place write through it fails with PermissionError; root's succeeds and changes the store
    entry, which the next reuse's check finds: the stage is trained again); else (another file system, or a store
    file left writable) a copy. ``ALIGNCTL_STORE_LINKS=copy`` always copies (a root user who wants run folders that
    can never reach the store, at the cost of a copy of the weights per run); ``=link`` always hard-links. Returns
    how: reflink | link | copy."""
    dst.unlink(missing_ok=True)
    mode = placement()
    if mode != "copy" and _reflink(src, dst):
        return "reflink"
    read_only = not os.stat(src).st_mode & 0o222  # as a completed entry's files are (mark_complete)
    if mode == "link" or (mode == "auto" and read_only):
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
