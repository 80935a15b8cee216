"""Small file-system helpers shared by the pipeline and the store (no torch import).

* :func:`write_json`: strict JSON (non-finite numbers become ``null``), written to a unique temporary file, fsync'd
  and renamed over the target, then the directory is fsync'd: readers never see half a file, and after a crash the
  file is either the old or the new version.
* :func:`finite`: the same mapping of NaN/inf to ``None``, for callers that build JSON themselves.
* :func:`fsync_dir`, :func:`tree_files`, :func:`tree_size`.
* :class:`FileLock`: an exclusive lock file (O_CREAT|O_EXCL) with the holder's host/pid and a heartbeat, stale-lock
  takeover and a wait timeout, for the stage store and run directories on local and shared (cluster) file systems.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("alignctl")
_FROM_ENV: Any = object()


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """Strict JSON text: NaN/inf become null, anything else unknown becomes its ``str``."""
    return json.dumps(finite(obj), allow_nan=False, default=str, **kwargs)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename/creation in ``path`` durable (best effort: some file systems refuse fsync on directories)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    """Write ``text`` to ``path`` atomically and durably (unique temp name, fsync, rename, fsync of the folder)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json(path: str | os.PathLike, obj: Any, mode: int | None = None) -> None:
    """Write strict JSON atomically and durably (see :func:`write_text_atomic`)."""
    write_text_atomic(path, dumps(obj, indent=2) + "\n", mode)


def tree_files(root: str | os.PathLike) -> list[Path]:
    """Regular files under ``root`` (symlinks are not followed and not listed), sorted."""
    root = Path(root)
    if root.is_symlink() or not root.is_dir():
        return [root] if root.is_file() and not root.is_symlink() else []
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink() and p.is_file():
                out.append(p)
    return sorted(out)


def tree_size(root: str | os.PathLike, unique_only: bool = False) -> int:
    """Bytes of the regular files under ``root``; ``unique_only``: only files not hard-linked elsewhere (what
    deleting ``root`` actually frees)."""
    total = 0
    for f in tree_files(root):
        try:
            st = f.stat()
        except OSError:
            continue
        if unique_only and st.st_nlink > 1:
            continue
        total += st.st_size
    return total


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


# -- a lock that works on shared file systems ------------------------------------------------------------------------


class LockTimeout(RuntimeError):
    """Waited longer than the lock timeout for another process's lock."""


def _env_seconds(name: str, default: float | None) -> float | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    if value.lower() in ("none", "inf", "never"):
        return None
    return float(value)


def lock_settings() -> dict[str, float | None]:
    """Lock timings from the environment: ALIGNCTL_LOCK_TIMEOUT (seconds to wait for another holder; unset: wait as
    long as it is alive), ALIGNCTL_LOCK_STALE (a lock whose heartbeat has not moved for this long is taken over;
    default 600), ALIGNCTL_LOCK_HEARTBEAT (default stale / 10)."""
    stale = _env_seconds("ALIGNCTL_LOCK_STALE", 600.0) or 600.0
    return {"timeout": _env_seconds("ALIGNCTL_LOCK_TIMEOUT", None), "stale": stale,
            "heartbeat": _env_seconds("ALIGNCTL_LOCK_HEARTBEAT", None) or max(0.2, stale / 10)}


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a live holder from a later process that reuses its pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, start: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return start is None or _proc_start(pid) in (None, start)


def read_lock(path: str | os.PathLike) -> dict | None:
    """The holder recorded in a lock file (None if there is none; {} while it is being written)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        st = os.fstat(fd)
        raw = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    try:
        info = json.loads(raw)
    except ValueError:
        info = {}
    info = info if isinstance(info, dict) else {}
    info["_mtime"] = st.st_mtime
    return info


def lock_is_live(info: dict | None, stale: float) -> bool:
    """Whether a lock file's holder looks alive, judged at once (used by ``store gc``): same host: its pid runs;
    another host: its heartbeat is younger than ``stale`` seconds (clocks of the nodes assumed roughly in sync)."""
    if info is None:
        return False
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        return pid_alive(info["pid"], info.get("proc_start"))
    return time.time() - info.get("_mtime", 0) < stale


def describe_holder(info: dict | None) -> str:
    if not info or "host" not in info:
        return "another process (lock file still being written)"
    age = time.time() - info.get("_mtime", time.time())
    return (f"{info.get('user', '?')}@{info['host']} pid {info.get('pid')} since {info.get('started', '?')} "
            f"(heartbeat {age:.0f} s ago)")


class FileLock:
    """An exclusive lock made of a lock file created with O_CREAT|O_EXCL|O_NOFOLLOW, which is atomic on local file
    systems and on NFS (v3+), Lustre, BeeGFS and GPFS, unlike flock on many cluster mounts.

    The file holds the holder's host, pid, process start time, user and a random token; a thread touches its mtime
    every ``heartbeat`` seconds. A waiter takes a lock over when its holder is gone: at once when the holder ran on
    this host and its pid is dead; otherwise when the heartbeat (the file's mtime) has not moved for ``stale``
    seconds as seen by the waiter's own clock (so clock skew between nodes does not matter). Takeover is serialised
    by a second exclusive file (``<lock>.break``), so two waiters never both remove a lock. ``timeout``: seconds to
    wait before :class:`LockTimeout` (None: as long as the holder is alive); 0: fail at once if held.
    ``only_if_dead``: fail at once when the holder is seen alive (its pid on this host, or a heartbeat), else wait
    until it is stale and take over (a run directory reused after its run was killed, maybe on another node).
    """

    def __init__(self, path: str | os.PathLike, what: str = "", timeout: float | None = _FROM_ENV,
                 stale: float | None = None, heartbeat: float | None = None, poll: float = 0.2,
                 only_if_dead: bool = False):
        settings = lock_settings()
        self.path = Path(path)
        self.what = what or str(self.path.parent)
        self.timeout = settings["timeout"] if timeout is _FROM_ENV else timeout
        self.stale = stale or settings["stale"]
        self.heartbeat = heartbeat or settings["heartbeat"]
        self.poll = poll
        self.only_if_dead = only_if_dead
        self.token = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquiring ---------------------------------------------------------------------------------------------------
    def _try_create(self) -> bool:
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except FileExistsError:
            return False
        try:
            info = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
                    "user": _user(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "token": self.token}
            os.write(fd, json.dumps(info).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _break_if_stale(self, info: dict, stale_now: bool) -> bool:
        """Remove the lock file if it still holds the holder judged stale (under the break file); True if removed."""
        breaker = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            try:  # a breaker that died while breaking: its file is old
                if time.time() - breaker.stat().st_mtime > max(60.0, self.stale):
                    breaker.unlink(missing_ok=True)
            except OSError:
                pass
            return False
        os.close(fd)
        try:
            now = read_lock(self.path)
            if now is not None and now.get("token") == info.get("token") and now.get("_mtime") == info.get("_mtime"):
                log.warning("%s: taking over the lock of %s (%s)", self.what, describe_holder(info),
                            "its process is gone" if stale_now else f"no heartbeat for {self.stale:.0f} s")
                self.path.unlink(missing_ok=True)
                return True
            return False
        finally:
            breaker.unlink(missing_ok=True)

    def acquire(self) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.parent.is_symlink():
            raise RuntimeError(f"{self.path.parent} is a symbolic link; refusing to lock through it")
        t0 = time.monotonic()
        seen: tuple | None = None  # (token, mtime) of the holder and when this waiter first saw that heartbeat
        seen_at = t0
        told = 0.0
        while True:
            if self._try_create():
                break
            info = read_lock(self.path)
            if info is None:
                continue  # released between our attempt and the read
            key = (info.get("token"), info.get("_mtime"))
            beat = seen is not None and key != seen and key[0] == seen[0]  # the holder's heartbeat moved
            if key != seen:
                seen, seen_at = key, time.monotonic()
            here = info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int)
            dead_here = here and not pid_alive(info["pid"], info.get("proc_start"))
            if self.only_if_dead and ((here and not dead_here) or beat):
                raise LockTimeout(f"{self.what} is locked by {describe_holder(info)}, which is alive "
                                  f"(lock file {self.path})")
            if dead_here or time.monotonic() - seen_at >= self.stale:
                if not self._break_if_stale(info, dead_here):
                    time.sleep(self.poll)  # another waiter is taking it over
                continue
            waited = time.monotonic() - t0
            if self.timeout is not None and waited >= self.timeout:
                raise LockTimeout(f"{self.what} is locked by {describe_holder(info)}; gave up after {waited:.0f} s "
                                  f"(lock file {self.path}; ALIGNCTL_LOCK_TIMEOUT sets how long to wait)")
            if waited - told >= 300 or told == 0.0:
                log.info("%s: waiting for %s, which holds %s", self.what, describe_holder(info), self.path)
                told = waited or 1e-9
            time.sleep(self.poll)
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.path}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            info = read_lock(self.path)
            if info is None or (info and info.get("token") != self.token):
                if not self.lost:
                    log.error("%s: lost the lock %s (taken over by %s)", self.what, self.path, describe_holder(info))
                self.lost = True
                continue
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        info = read_lock(self.path)
        if info and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return str(os.getuid())
