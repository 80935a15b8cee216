"""What ``eval`` and ``generate`` share: their hand-parsed options (``--flag VALUE``, ``--flag=VALUE``, switches,
``key=value`` overrides) and quiet library output. No torch."""

from __future__ import annotations

import logging
import sys

from alignctl import console
from alignctl.errors import ConfigError


def parse(args: list[str], flags: set[str], usage: str, switches: frozenset[str] = frozenset()
          ) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """(positional, {flag: [values]}, key=value overrides); a switch (a flag without value) maps to ["1"].
    ``-h``/``--help`` prints ``usage`` and exits 0; an unknown option or a flag without its value is a ConfigError."""
    pos, opts, overrides, it = [], {}, [], iter(args)
    for a in it:
        if a in ("-h", "--help"):
            print(usage)
            raise SystemExit(0)
        key, eq, value = a.partition("=")
        if a in switches:
            opts[a] = ["1"]
        elif key in flags:
            value = value if eq else next(it, None)
            if value is None:
                raise ConfigError([f"{key}: needs a value\n{usage}"])
            opts.setdefault(key, []).append(value)
        elif a.startswith("-"):
            raise ConfigError([f"unknown option {a}\n{usage}"])
        elif eq:
            overrides.append(a)
        else:
            pos.append(a)
    return pos, opts, overrides


def quiet() -> None:
    """Library progress bars and warnings off the console (alignctl.console), alignctl's own lines on stderr."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    console.setup()
