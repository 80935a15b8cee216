"""Run folders get a store entry's files without sharing writable inodes: reflinked, hard-linked (read-only, when not
root) or copied (``ALIGNCTL_STORE_LINKS``; :func:`place_file`), so nothing written into a run's ``final/`` reaches the
store."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from alignctl import fsutil

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
