"""Where a stage's time and memory go: wall seconds and peak memory of each phase of its lifecycle.

A :class:`PhaseClock` measures named phases (``with clock.phase("train"): ...``); a phase inside another one is
subtracted from it, so every second and every peak belongs to exactly one phase ("prepare" is the trainer's set-up
less the model loads inside it). Peak resident memory is the kernel's own high-water mark (``VmHWM``), reset at each
phase boundary through ``/proc/self/clear_refs``: exact, no sampling thread (Linux; elsewhere it is left out). Peak
accelerator memory is ``torch.cuda.max_memory_allocated``, reset the same way, once CUDA is initialised.

The records go into the stage's metrics as ``phases`` (the manifest, ``benchmarks/scale.py``); they describe the
process that trained the stage (rank 0 under several processes).
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

_STATUS, _CLEAR = "/proc/self/status", "/proc/self/clear_refs"


def _peak_rss_mb() -> float | None:
    """The process's peak resident memory since the last reset, in MiB (None where the kernel does not say)."""
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_rss() -> None:
    try:
        with open(_CLEAR, "w") as f:
            f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
    except OSError:
        pass


def _cuda():
    torch = sys.modules.get("torch")  # never imports torch, never initialises CUDA
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda
    return None


def _peak_gpu_mb() -> float | None:
    cuda = _cuda()
    return cuda.max_memory_allocated() / 2**20 if cuda is not None else None


def _reset_gpu() -> None:
    cuda = _cuda()
    if cuda is not None:
        cuda.reset_peak_memory_stats()


class PhaseClock:
    """Wall time and peak memory per named phase; a phase met again adds its seconds and keeps the higher peak."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self._stack: list[list[Any]] = []  # [name, start, seconds of the phases inside, peak rss, peak gpu]

    def _close_peaks(self) -> None:
        """Fold the peaks since the last boundary into the innermost open phase, then reset them."""
        if self._stack:
            top = self._stack[-1]
            top[3] = _max(top[3], _peak_rss_mb())
            top[4] = _max(top[4], _peak_gpu_mb())
        _reset_rss()
        _reset_gpu()

    @contextlib.contextmanager
    def phase(self, name: str):
        self._close_peaks()
        frame = [name, time.perf_counter(), 0.0, None, None]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._close_peaks()
            self._stack.pop()
            elapsed = time.perf_counter() - frame[1]
            if self._stack:
                self._stack[-1][2] += elapsed
            rec = self.records.setdefault(name, {"seconds": 0.0})
            rec["seconds"] = round(rec["seconds"] + elapsed - frame[2], 3)
            for key, value in (("peak_rss_mb", frame[3]), ("peak_gpu_mb", frame[4])):
                if value is not None:
                    rec[key] = round(_max(rec.get(key), value), 1)


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


class _NoClock:
    """The clock of a context made outside a stage's lifecycle (``alignctl eval``, tests): measures nothing."""

    records: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        yield


NO_CLOCK = _NoClock()
