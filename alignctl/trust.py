"""Who wrote a store entry or a cached model: a per-user secret key and HMAC seals (no torch import).

A recipe can choose ``output_root``, hence the default store ``<output_root>/.store`` and the model cache
``<output_root>/.cache``. Fingerprints are deterministic and the hashes in ``COMPLETE`` are whatever the writer put
there, so hashes alone cannot tell an entry this user trained from one prepared by the recipe's author. A seal can:

* the key: 32 random bytes (hex) in ``$ALIGNCTL_KEY_FILE`` (default ``${XDG_CONFIG_HOME:-~/.config}/alignctl/key``),
  created once, readable by the user only. Two first runs racing to create it end up with the same key (the file is
  created exclusively; the loser reads the winner's);
* :func:`seal` is HMAC-SHA256 over the record's canonical JSON; :func:`sealed` adds ``sealed_by`` (user, uid, host,
  key id: the first 8 hex digits of the key's SHA-256) and ``mac`` to a record; :func:`check` says whether a record's
  seal verifies with this user's key and, either way, who it claims to be sealed by.

Sharing the key file (``ALIGNCTL_KEY_FILE`` pointing at a file a team can read) makes the team's seals one's own.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

KEY_ENV = "ALIGNCTL_KEY_FILE"
KEY_BYTES = 32


def key_path() -> Path:
    configured = os.environ.get(KEY_ENV, "").strip()
    if configured:
        return Path(configured).expanduser().absolute()
    base = os.environ.get("XDG_CONFIG_HOME", "").strip() or "~/.config"
    return Path(base).expanduser().absolute() / "alignctl" / "key"


def _problem(path: Path, what: str) -> Exception:
    from alignctl.errors import ConfigError

    return ConfigError([f"{KEY_ENV}: {what} ({path}); alignctl seals the store entries and cached models you write "
                        f"with this key: set {KEY_ENV} to a file path in a private folder you can write"])


def _parse(text: str) -> bytes | None:
    text = text.strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return None
    return raw if len(raw) == KEY_BYTES else None


def _create(path: Path) -> bool:
    """Create the key file exclusively (False: another process created it first)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(KEY_BYTES) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def key() -> bytes:
    """This user's secret key, created on first use. Read each time (a few bytes): tests and users may switch
    ``ALIGNCTL_KEY_FILE`` within one process."""
    path = key_path()
    try:
        if not path.exists():
            _create(path)
        deadline = time.monotonic() + 5
        while True:  # a racing creator may not have written its key yet: an empty file (or a part of the key)
            text = path.read_text().strip()
            raw = _parse(text)
            writing = len(text) < 2 * KEY_BYTES and all(c in "0123456789abcdef" for c in text)
            if raw is not None or not writing or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    except OSError as e:
        raise _problem(path, f"cannot create or read the key file: {e.strerror or e}") from None
    if raw is None:
        raise _problem(path, f"the key file does not hold a key ({2 * KEY_BYTES} hex digits); remove it to have a "
                             "new one made (entries sealed with the old key then count as not yours)")
    return raw


def key_id(raw: bytes | None = None) -> str:
    return hashlib.sha256(key() if raw is None else raw).hexdigest()[:8]


def canonical(record: dict) -> bytes:
    """The bytes a seal covers: the record as it reads back from strict JSON, keys sorted, no spaces."""
    from alignctl.fsutil import dumps

    return json.dumps(json.loads(dumps(record)), sort_keys=True, separators=(",", ":")).encode()


def seal(record: dict, raw: bytes | None = None) -> str:
    """HMAC-SHA256 (hex) of the record's canonical JSON with this user's key."""
    return hmac.new(key() if raw is None else raw, canonical(record), hashlib.sha256).hexdigest()


def verify(record: dict, mac: Any) -> bool:
    return isinstance(mac, str) and hmac.compare_digest(seal(record), mac)


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except (KeyError, OSError, ImportError):  # a uid without a passwd entry (containers)
        return str(os.getuid()) if hasattr(os, "getuid") else "?"


def sealed(record: dict) -> dict:
    """``record`` plus ``sealed_by`` (who, where, which key) and ``mac`` over everything else."""
    raw = key()
    out = {k: v for k, v in record.items() if k != "mac"}
    out["sealed_by"] = {"user": _user(), "uid": os.getuid() if hasattr(os, "getuid") else None,
                        "host": socket.gethostname(), "key": key_id(raw)}
    out["mac"] = seal(out, raw)
    return out


def check(record: dict | None) -> tuple[bool, str]:
    """(the record's seal verifies with this user's key, who it says sealed it: "user@host key K" / "not sealed")."""
    if not isinstance(record, dict) or "mac" not in record:
        return False, "not sealed"
    by = record.get("sealed_by") if isinstance(record.get("sealed_by"), dict) else {}
    who = f"{by.get('user', '?')}@{by.get('host', '?')} key {by.get('key', '?')}"
    return verify({k: v for k, v in record.items() if k != "mac"}, record["mac"]), who
