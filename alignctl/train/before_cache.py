"""A stage's "before" evaluation, kept once and reused: every point of a sweep that changes only training settings
(learning rate, steps, schedule; beta where the kind declares that its evaluation at step 0 ignores it) starts from
the same weights and evaluates them on the same held-out data with the same settings, so that evaluation is
measured at the first point and read back at the others.

Two records, each under the key that names what it covers (alignctl.fingerprint): alignctl's own evaluation (the
policy evaluation's answers and log-probabilities, the preference accuracy; ``before_key``) and the trainer's
``evaluate()`` (``trainer_before_key``, only for kinds that declare ``before_ignores``). Each is
``<cache_dir>/before-eval/<key>.json``, written by rank 0 once the stage has completed and sealed with the user's key
(alignctl.trust): a file that does not verify, or that holds another key, is ignored and the evaluation runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from alignctl import trust
from alignctl.config.types import StageSpec

log = logging.getLogger("alignctl")
VERSION = 1
PARTS = {"before_key": ("policy", "pref"), "trainer_before_key": ("trainer",)}


def _path(spec: StageSpec, key: str | None) -> Path | None:
    if not key or not spec.cache_dir:
        return None
    return Path(spec.cache_dir) / "before-eval" / f"{key[:40]}.json"


def _read(spec: StageSpec, key: str | None) -> dict[str, Any]:
    path = _path(spec, key)
    if path is None or not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ok, _ = trust.check(record)
    if not ok or record.get("key") != key or record.get("version") != VERSION:
        log.warning("[%s] ignoring %s: not sealed by you for this evaluation; evaluating again", spec.name, path)
        return {}
    return record


def load(spec: StageSpec) -> dict[str, Any]:
    """What is kept of this stage's "before" evaluation: ``policy`` (PolicyEval.before_state()), ``pref``
    (preference accuracy), ``trainer`` (the trainer's metrics); {} when nothing is."""
    out: dict[str, Any] = {}
    for field, parts in PARTS.items():
        record = _read(spec, getattr(spec, field))
        out.update({k: record[k] for k in parts if record.get(k)})
    if out:
        log.info("[%s] \"before\" evaluation read back (%s: the same initial weights, held-out data and settings)",
                 spec.name, ", ".join(sorted(out)))
    return out


def save(spec: StageSpec, **parts: Any) -> None:
    """Keep what was measured before training (rank 0, once the stage completed): ``policy``, ``pref``, ``trainer``."""
    from alignctl.fsutil import write_json
    from alignctl.ranks import rank_env

    if rank_env()[0] != 0:
        return
    for field, names in PARTS.items():
        key, kept = getattr(spec, field), {k: parts.get(k) for k in names if parts.get(k)}
        path = _path(spec, key)
        if path is None or not kept:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, trust.sealed({"key": key, "version": VERSION, **kept}))
