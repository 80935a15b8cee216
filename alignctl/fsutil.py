"""Small file-system helpers shared by the pipeline and the store (no torch import).

* :func:`write_json`: strict JSON (non-finite numbers become ``null``), written to a unique temporary file, fsync'd
  and renamed over the target, then the directory is fsync'd: readers never see half a file, and after a crash the
  file is either the old or the new version.
* :func:`finite`: the same mapping of NaN/inf to ``None``, for callers that build JSON themselves.
* :func:`fsync_dir`, :func:`tree_files`, :func:`tree_size`.
* :class:`FileLock`: an exclusive lock file (O_CREAT|O_EXCL) with the holder's identity (host, boot id, pid
  namespace, pid, token) and a heartbeat, stale-lock takeover, a wait timeout and a callback when the lock is lost,
  for the stage store and run directories on local and shared (cluster) file systems; :func:`check_owner` lets a
  writer (a rank) confirm it still holds it; :func:`lock_settings` / :func:`lock_problems`: ALIGNCTL_LOCK_*.
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

from alignctl.errors import LockLost, LockTimeout

log = logging.getLogger("alignctl")
FROM_ENV: Any = object()  # FileLock's timeout: ALIGNCTL_LOCK_TIMEOUT (lock_settings)


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
    """Write ``text`` to ``path`` atomically and durably (unique temp name, fsync, rename, fsync of the folder).
    ``mode``: the file's permissions from the moment it exists (0o600: configuration and secrets are never readable
    by others, not even while being written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)  # also when the umask is stricter or looser than asked
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
LOCK_ENV = {"timeout": "ALIGNCTL_LOCK_TIMEOUT", "stale": "ALIGNCTL_LOCK_STALE", "heartbeat": "ALIGNCTL_LOCK_HEARTBEAT"}
DEFAULT_STALE = 600.0


def _env_number(name: str, problems: list[str], never: bool = False) -> float | None:
    """A number of seconds from the environment (None: unset; inf: none/inf/never where ``never``); a bad value is
    a problem, never an exception."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if never and value.lower() in ("none", "inf", "never"):
        return math.inf
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0 or (number == 0 and not never):
        allowed = "seconds >= 0, or never" if never else "seconds > 0"
        problems.append(f"{name}={value!r}: must be a number of {allowed}; set it so or unset it")
        return None
    return number


def default_heartbeat(stale: float) -> float:
    """A tenth of ``stale`` (at least 0.2 s where that still leaves ``stale`` > 3 heartbeats)."""
    return max(0.2, stale / 10) if stale > 0.6 else stale / 10


def lock_problems() -> list[str]:
    """What is wrong with the ALIGNCTL_LOCK_* settings (empty: fine); checked at plan, run and ``store`` start."""
    problems: list[str] = []
    _env_number(LOCK_ENV["timeout"], problems, never=True)
    stale = _env_number(LOCK_ENV["stale"], problems)
    heartbeat = _env_number(LOCK_ENV["heartbeat"], problems)
    if heartbeat is not None and not problems and 3 * heartbeat >= (stale or DEFAULT_STALE):
        problems.append(f"{LOCK_ENV['heartbeat']}={heartbeat:g}: must be under a third of {LOCK_ENV['stale']} "
                        f"({stale or DEFAULT_STALE:g}{'' if stale else ', the default'}), so that a live holder "
                        "is never taken for a stale one; raise the one or lower the other")
    return problems


def lock_settings() -> dict[str, float | None]:
    """Lock timings from the environment: ALIGNCTL_LOCK_TIMEOUT (seconds to wait for another holder; unset or never:
    as long as it is alive), ALIGNCTL_LOCK_STALE (a lock whose heartbeat has not moved for this long is taken over;
    default 600), ALIGNCTL_LOCK_HEARTBEAT (default stale / 10; must stay under stale / 3). A bad value is a
    ConfigError naming the variable."""
    problems = lock_problems()
    if problems:
        from alignctl.errors import ConfigError

        raise ConfigError(problems)
    scratch: list[str] = []
    timeout = _env_number(LOCK_ENV["timeout"], scratch, never=True)
    stale = _env_number(LOCK_ENV["stale"], scratch) or DEFAULT_STALE
    return {"timeout": None if timeout == math.inf else timeout, "stale": stale,
            "heartbeat": _env_number(LOCK_ENV["heartbeat"], scratch) or default_heartbeat(stale)}


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


def identity() -> dict[str, Any]:
    """What a pid means relative to: the host name, the kernel's boot id and the pid namespace. Containers with host
    networking share the host name but not the pid namespace; machines cloned from one image can share a host name
    but not a boot id (None where Linux's /proc is not there)."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        boot_id = None
    try:
        pid_ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pid_ns = None
    return {"host": socket.gethostname(), "boot_id": boot_id, "pid_ns": pid_ns}


def same_pid_space(info: dict) -> bool:
    """Whether a lock holder's pid can be checked from here: same host name, boot id and pid namespace, all
    recorded (a lock file without them, e.g. of an older alignctl, is judged by its heartbeat only)."""
    me = identity()
    return isinstance(info.get("pid"), int) and all(k in info and info[k] == v for k, v in me.items())


def holder_stale(info: dict, stale: float) -> float:
    """How long a holder's heartbeat may stand still before its lock is stale: ``stale``, but at least three of the
    heartbeats the holder recorded (processes with other ALIGNCTL_LOCK_* settings share locks safely)."""
    beat = info.get("heartbeat")
    if isinstance(beat, (int, float)) and not isinstance(beat, bool) and math.isfinite(beat) and beat > 0:
        return max(stale, 3 * float(beat))
    return stale


def read_lock(path: str | os.PathLike) -> dict | None:
    """The holder recorded in a lock file (None if there is none; {} while it is being written or unreadable)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        st = os.fstat(fd)
        raw = os.read(fd, 1 << 16)
    except OSError:
        return {}
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
    """Whether a lock file's holder looks alive, judged at once (``store ls/gc/rm``): in this pid space (same host,
    boot and pid namespace) its pid runs; elsewhere its heartbeat is younger than :func:`holder_stale` (clocks of
    the nodes assumed roughly in sync)."""
    if info is None:
        return False
    if same_pid_space(info):
        return pid_alive(info["pid"], info.get("proc_start"))
    return time.time() - info.get("_mtime", 0) < holder_stale(info, stale)


def describe_holder(info: dict | None) -> str:
    if not info or "host" not in info:
        return "another process (lock file still being written)"
    age = time.time() - info.get("_mtime", time.time())
    where = info["host"]
    if where == socket.gethostname() and not same_pid_space(info):
        where += " (another pid namespace or boot: judged by its heartbeat)"
    return (f"{info.get('user', '?')}@{where} pid {info.get('pid')} since {info.get('started', '?')} "
            f"(heartbeat {age:.0f} s ago)")


def check_owner(path: str | os.PathLike, token: str, what: str = "") -> None:
    """Raise :class:`LockLost` unless the lock file ``path`` still holds ``token`` (called right before a holder
    replaces what others may be writing, e.g. a store entry's final/)."""
    info = read_lock(path)
    if not info or info.get("token") != token:
        by = describe_holder(info) if info else "nobody (the lock file is gone)"
        raise LockLost(f"{what or path}: lost its store lock {path} (now held by {by}); not writing")


class _Watch:
    """What a waiter saw of a holder: since when its lock file is unchanged, and when its heartbeat last moved."""

    def __init__(self):
        self.key: tuple | None = None
        self.since = time.monotonic()
        self.last_beat: float | None = None

    def see(self, info: dict) -> None:
        key = (info.get("token"), info.get("_mtime"))
        if key == self.key:
            return
        now = time.monotonic()
        if self.key is not None and key[0] == self.key[0]:
            self.last_beat = now  # same holder, file touched: its heartbeat moved
        elif self.key is not None:
            self.last_beat = None  # another holder
        self.key, self.since = key, now


class FileLock:
    """An exclusive lock made of a lock file created with O_CREAT|O_EXCL|O_NOFOLLOW, which is atomic on local file
    systems and on NFS (v3+), Lustre, BeeGFS and GPFS, unlike flock on many cluster mounts.

    The file holds the holder's host, boot id, pid namespace, pid, process start time, user, a random token and its
    heartbeat and stale settings; a thread touches its mtime every ``heartbeat`` seconds. A waiter takes a lock over
    when its holder is gone: at once when the holder's pid is dead and it ran in this pid space (same host name,
    boot id and pid namespace: :func:`same_pid_space`); otherwise when the heartbeat (the file's mtime) has not moved
    for ``stale`` seconds, or three of the holder's heartbeats if longer, as seen by the waiter's own clock (so clock
    skew between nodes does not matter). A lock whose heartbeat this waiter saw move within that time is never taken
    over, even when its pid looks dead. Takeover and release are serialised by a second exclusive file
    (``<lock>.break``), so two waiters never both remove a lock and a release never removes a new holder's lock.

    ``timeout``: seconds to wait before :class:`LockTimeout` (None: as long as the holder is alive); 0: fail at once
    if held. ``only_if_dead``: fail at once when the holder is seen alive (its pid in this pid space, or a
    heartbeat), else wait until it is stale and take over (a run directory reused after its run was killed, maybe on
    another node). ``decide_now`` (``store gc/rm``): judge the holder at once from its file (:func:`lock_is_live`)
    instead of watching its heartbeat. ``on_lost``: called once, from the heartbeat thread, when this process finds
    that it lost the lock (taken over, its file gone, or not renewable for ``stale`` seconds).
    """

    def __init__(self, path: str | os.PathLike, what: str = "", timeout: float | None = FROM_ENV,
                 stale: float | None = None, heartbeat: float | None = None, poll: float = 0.2,
                 only_if_dead: bool = False, decide_now: bool = False, on_lost=None):
        settings = lock_settings()
        self.path = Path(path)
        self.what = what or str(self.path.parent)
        self.timeout = settings["timeout"] if timeout is FROM_ENV else timeout
        self.stale = stale or settings["stale"]
        self.heartbeat = heartbeat or (settings["heartbeat"] if stale is None else default_heartbeat(self.stale))
        self.poll = poll
        self.only_if_dead = only_if_dead
        self.decide_now = decide_now
        self.on_lost = on_lost
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
        except FileNotFoundError:  # the folder went away (store gc moved the entry to its trash): make it again
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return False
        try:
            info = {**identity(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()), "user": _user(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "token": self.token,
                    "heartbeat": self.heartbeat, "stale": self.stale}
            os.write(fd, json.dumps(info).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _breaker(self) -> int | None:
        """Take the break file (serialises takeovers and releases); None while another process holds it."""
        breaker = self.path.with_name(self.path.name + ".break")
        try:
            return os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            try:  # a breaker that died while breaking: its file is old
                if time.time() - breaker.stat().st_mtime > max(60.0, self.stale):
                    breaker.unlink(missing_ok=True)
            except OSError:
                pass
            return None

    def _break_if_stale(self, info: dict, why: str) -> bool:
        """Remove the lock file if it still holds the holder judged stale (under the break file); True if removed."""
        try:
            fd = self._breaker()
        except FileNotFoundError:  # the folder went away meanwhile
            return False
        if fd is None:
            return False
        os.close(fd)
        try:
            now = read_lock(self.path)
            if now is not None and now.get("token") == info.get("token") and now.get("_mtime") == info.get("_mtime"):
                log.warning("%s: taking over the lock of %s (%s)", self.what, describe_holder(info), why)
                self.path.unlink(missing_ok=True)
                return True
            return False
        finally:
            self.path.with_name(self.path.name + ".break").unlink(missing_ok=True)

    def _gone(self, info: dict, watch: _Watch, warned: set) -> str | None:
        """Why the holder is gone (its lock may be taken over), or None while it may be alive."""
        stale = holder_stale(info, self.stale)
        here = same_pid_space(info)
        dead = here and not pid_alive(info["pid"], info.get("proc_start"))
        beating = watch.last_beat is not None and time.monotonic() - watch.last_beat < stale
        if dead and beating:
            if watch.key not in warned:
                warned.add(watch.key)
                log.error("%s: the holder of %s looks dead (pid %s is gone) but its heartbeat moved %.1f s ago; "
                          "not taking it over (two machines or containers share a host name, boot id and pid "
                          "namespace?)", self.what, self.path, info.get("pid"), time.monotonic() - watch.last_beat)
            dead = False
        if self.only_if_dead and ((here and not dead) or beating):
            raise LockTimeout(f"{self.what} is locked by {describe_holder(info)}, which is alive "
                              f"(lock file {self.path})", info)
        if dead:
            return "its process is gone"
        if time.monotonic() - watch.since >= stale:
            return f"no heartbeat for {stale:.0f} s"
        if self.decide_now and not here and not lock_is_live(info, self.stale):
            return f"its heartbeat is {time.time() - info.get('_mtime', 0):.0f} s old"
        return None

    def acquire(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.parent.is_symlink():
            raise RuntimeError(f"{self.path.parent} is a symbolic link; refusing to lock through it")
        t0 = time.monotonic()
        watch, warned = _Watch(), set()
        told = 0.0
        while not self._try_create():
            info = read_lock(self.path)
            if info is None:
                continue  # released between our attempt and the read
            watch.see(info)
            why = self._gone(info, watch, warned)
            if why:
                if not self._break_if_stale(info, why):
                    time.sleep(self.poll)  # another waiter is taking it over
                continue
            waited = time.monotonic() - t0
            if self.timeout is not None and waited >= self.timeout:
                raise LockTimeout(f"{self.what} is locked by {describe_holder(info)}; gave up after {waited:.0f} s "
                                  f"(lock file {self.path}; ALIGNCTL_LOCK_TIMEOUT sets how long to wait)", info)
            if waited - told >= 300 or told == 0.0:
                log.info("%s: waiting for %s, which holds %s", self.what, describe_holder(info), self.path)
                told = waited or 1e-9
            time.sleep(self.poll)
        self.lost = False
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.path}", daemon=True)
        self._thread.start()
        return self

    # -- holding -----------------------------------------------------------------------------------------------------
    def _beat(self) -> None:
        failing_since: float | None = None
        while not self._stop.wait(self.heartbeat):
            try:
                info = read_lock(self.path)
                if info is None or (info and info.get("token") != self.token):
                    self._lose(f"taken over by {describe_holder(info)}" if info else "its lock file was removed")
                    return
                if not info:
                    raise OSError(f"{self.path} is unreadable")
                os.utime(self.path)
                failing_since = None
            except OSError as e:  # an NFS stall, ESTALE...: the heartbeat must not die silently
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    log.warning("%s: cannot renew the lock %s (%s); retrying", self.what, self.path, e)
                elif now - failing_since >= self.stale:
                    self._lose(f"it could not be renewed for {now - failing_since:.0f} s ({e}); another process may "
                               "have taken it over")
                    return

    def _lose(self, why: str) -> None:
        self.lost = True
        log.error("%s: lost the lock %s (%s); stopping the work done under it", self.what, self.path, why)
        if self.on_lost is not None:
            try:
                self.on_lost()
            except Exception:  # noqa: BLE001 - the heartbeat thread reports, it cannot raise anywhere
                log.exception("%s: stopping after losing the lock failed", self.what)

    def owned(self) -> bool:
        """Whether this process still holds the lock: not lost, and the lock file holds its token."""
        info = read_lock(self.path)
        return not self.lost and bool(info) and info.get("token") == self.token

    def stop_heartbeat(self) -> None:
        """Stop touching the lock file (before moving the folder that holds it; :meth:`release` does this too)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this process's, under the break file: a
        takeover in progress is waited for (a few seconds at most), so its new lock is never removed."""
        self.stop_heartbeat()
        deadline = time.monotonic() + max(2.0, 10 * self.poll)
        while True:
            try:
                fd = self._breaker()
            except FileNotFoundError:  # the folder is gone (moved to the store's trash): nothing to remove
                return
            if fd is not None:
                break
            if time.monotonic() > deadline:
                log.warning("%s: %s is busy; leaving the lock file %s (taken over once stale)", self.what,
                            self.path.name + ".break", self.path)
                return
            time.sleep(0.05)
        os.close(fd)
        try:
            info = read_lock(self.path)
            if info and info.get("token") == self.token:
                self.path.unlink(missing_ok=True)
        finally:
            self.path.with_name(self.path.name + ".break").unlink(missing_ok=True)

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return str(os.getuid())
