"""A stage's health: a diverged stage (a NaN/inf training loss, metric or weight) fails before anything is sampled,
saved or stored as complete, so it is never reused (alignctl.train.lifecycle calls these)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def is_number(v) -> bool:
    """A numeric metric, NaN and inf included: :func:`check_healthy` must see them (JSON writers map them to null)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _non_finite(metrics: Any, path: str = "") -> list[str]:
    if isinstance(metrics, dict):
        return [p for k, v in metrics.items() for p in _non_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(metrics, float) and not math.isfinite(metrics):
        return [f"{path}={metrics}"]
    return []


def _diverged(stage: str, what: list[str]):
    from alignctl.errors import StageFailed

    shown = ", ".join(what[:4]) + (f" and {len(what) - 4} more" if len(what) > 4 else "")
    return StageFailed(stage, "(training diverged)", f"non-finite {shown}; nothing was stored as complete. Lower "
                       f"stages.{stage}.learning_rate (or use bf16/fp32 instead of fp16) and run again")


def check_healthy(stage: str, metrics: dict) -> None:
    """Fail the stage when a training loss or a metric after training is NaN/inf (a diverged stage must never be
    stored as complete, hence reused). Only losses count among training metrics: under fp16 a grad_norm of inf is a
    step the loss scaler skipped, not a failure."""
    train = {k: v for k, v in (metrics.get("train") or {}).items() if "loss" in k}
    bad = _non_finite({"train": train, **{k: v for k, v in metrics.items() if k not in ("train", "before")}})
    if bad:
        raise _diverged(stage, bad)


def check_saved_finite(folder: str | Path, stage: str) -> None:
    """Fail the stage when a saved weight in ``folder``'s safetensors files is NaN/inf: for weights that never went
    through :func:`check_weights_finite` (an adapter merged into the base, weights gathered from ZeRO-3/FSDP shards).
    Streams one tensor at a time (memory-mapped), in chunks."""
    import torch
    from safetensors import safe_open

    bad = []
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                t = h.get_tensor(name)
                if t.is_floating_point() and t.numel() and \
                        not all(bool(torch.isfinite(c).all()) for c in t.reshape(-1).split(1 << 24)):
                    bad.append(name)
                del t
    if bad:
        raise _diverged(stage, [f"saved weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"])


def check_weights_finite(model, stage: str, what: str = "weights") -> None:
    """Fail the stage when a weight is NaN/inf (the Trainer's logging_nan_inf_filter can hide a NaN loss; a merge
    into fp16 weights can overflow: ``what`` = "merged weights")."""
    import torch

    with torch.no_grad():
        bad = [n for n, p in model.named_parameters() if p.numel() and not bool(torch.isfinite(p).all())]
    if bad:
        raise _diverged(stage, [f"{what} ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"])
