"""alignctl's error types, close-match suggestions, and the one way errors are shown.

Every error type lives here (so that no module imports another for its exceptions): :class:`ConfigError` (bad
user input), :class:`UsageError` (a bad command-line argument of a subcommand that parses its own options),
:class:`StageFailed` (a stage failed: a rank, divergence, its data or lock), :class:`DataChanged` and
:class:`ModelChanged` (a stage's local files changed since the run fingerprinted them), :class:`LockTimeout` and
:class:`LockLost` (alignctl.fsutil's lock) and :class:`SweepPointFailed` (a sweep point run in another process).

Every failure a user can cause ends in :func:`report`: ``alignctl: configuration error:`` and one line per problem
(what, where — the key, file or column — and what to do), then "Nothing was trained.", exit code 2, no traceback.
A genuine bug in alignctl ends in :func:`internal_error`: one line saying so, the traceback kept in a log file,
exit code 1. ``--debug`` or ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

import difflib
import os
import sys
import tempfile
import traceback
from pathlib import Path


class ConfigError(Exception):
    """Bad user input; ``problems`` is a list of one-line messages, each naming the key, file or column."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def __reduce__(self):  # raised in a datasets worker process, it reaches the parent with its problems intact
        return type(self), (self.problems,)


class UsageError(Exception):
    """A bad argument of a subcommand that parses its own options (``alignctl store``): one line, exit code 2."""


class StageFailed(RuntimeError):
    """A stage failed: where (which rank, or why: diverged, its data changed, its store lock), its error (one line)
    and the failing rank's traceback."""

    def __init__(self, stage: str, where: str, error: str, traceback: str = "", output_log: str | None = None):
        self.stage, self.where, self.error, self.traceback, self.output_log = stage, where, error, traceback, output_log
        super().__init__(f"stage {stage} failed {where}: {error}")

    def report(self) -> str:
        """What the CLI prints: the failing rank's error once (its traceback), and where every rank's output is."""
        head = f"alignctl: stage {self.stage} failed {self.where}"
        lines = [head + ":", self.traceback.rstrip()] if self.traceback else [f"{head}: {self.error}"]
        if self.output_log:
            lines.append(f"output of every rank: {self.output_log}")
        return "\n".join(lines)


class DataChanged(RuntimeError):
    """A stage's local data files are not the ones the run fingerprinted (it stops before training)."""


class ModelChanged(DataChanged):
    """A stage's local model folder is not the one the run fingerprinted."""


class LockTimeout(RuntimeError):
    """Waited longer than the lock timeout for another process's lock; ``holder``: what its lock file said."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder


class LockLost(RuntimeError):
    """This process no longer holds a lock it took: another process took it over (or its file is gone)."""


class SweepPointFailed(Exception):
    """A sweep point run in another process (joblib, SLURM) failed: raised as a plain Exception, which Hydra records
    for that job (the other points still run) and which makes the sweep's exit code non-zero."""


def suggest(key: str, candidates) -> str:
    close = difflib.get_close_matches(str(key), sorted(str(c) for c in candidates), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def debug() -> bool:
    """Show tracebacks: ``alignctl --debug ...`` or HYDRA_FULL_ERROR=1."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("ALIGNCTL_DEBUG") == "1"


def report(e: ConfigError, header: str = "configuration error") -> int:
    """Print a user's mistake (one line per problem) and return exit code 2."""
    problems = e.problems or [str(e)]
    print(f"alignctl: {header}" + ("s:" if len(problems) > 1 else ":"), file=sys.stderr)
    for p in problems[:20]:
        print(f"  - {p}", file=sys.stderr)
    if len(problems) > 20:
        print(f"  ... and {len(problems) - 20} more", file=sys.stderr)
    print("Nothing was trained.", file=sys.stderr)
    return 2


def from_library(e: BaseException, where: str) -> ConfigError:
    """A Hydra/OmegaConf/YAML error caused by the user's input, as one short problem (first lines only)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    text = " ".join(lines[:3]) or type(e).__name__
    if len(text) > 400:
        text = text[:400] + " ..."
    return ConfigError([f"{where}: {text}"])


def internal_error(e: BaseException, log_file: str | os.PathLike | None = None) -> int:
    """A bug in alignctl: say so in one line, keep the traceback in ``log_file`` (the run log) or a temp file."""
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    if log_file is None:
        fd, log_file = tempfile.mkstemp(prefix="alignctl-internal-error-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(tb)
    else:
        with open(log_file, "a") as f:
            f.write(tb)
    print(f"alignctl: internal error ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
          f"this is a bug in alignctl, not in your configuration. Traceback: {Path(log_file)} "
          "(or re-run with --debug)", file=sys.stderr)
    return 1
