"""``alignctl run``: the Hydra application behind it: check every point up front, resolve once, run the pipeline.

Before Hydra starts, :func:`run` checks the configuration (every point of a sweep: alignctl.config.compose.precheck_run)
and rewrites the overrides as ``plan`` composes them; Hydra then runs :func:`hydra_main` once per point.

Errors end the way every alignctl error does (alignctl.errors): a user's mistake is one short message and exit
code 2; a bug is "internal error" with the traceback kept in the run log (<run dir>/alignctl.log). A failed or
interrupted run still gets its report.md. In a sweep (``-m``) a failed point does not end the sweep: it is recorded
and the next point runs; the last lines name the failed points and the exit code is non-zero (:func:`main`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from alignctl import console, errors, pipeline, report, views
from alignctl.config import compose
from alignctl.config.paths import CONFIGS_DIR
from alignctl.config.redact import RedactingFilter, redact
from alignctl.config.resolve import resolve
from alignctl.errors import ConfigError, StageFailed, SweepPointFailed
from alignctl.fsutil import write_text_atomic
from alignctl.metrics import objective

log = logging.getLogger("alignctl")


# The sweep points run in this process (Hydra's basic launcher): what `alignctl run -m` reports at the end.
POINTS: list[dict] = []
_MAIN_PID: list[int] = []  # the pid of the process that called main(): jobs there are "in this process"


def run(args: list[str]) -> int:
    """The ``run`` command: check up front, then hand the (rewritten) overrides to Hydra; the exit code of
    :func:`main`. ``-v``/``--verbose``: per-step metrics and library warnings on the console too."""
    if any(a in ("-v", "--verbose") for a in args):
        os.environ["ALIGNCTL_VERBOSE"] = "1"
        args = [a for a in args if a not in ("-v", "--verbose")]
    overrides, extra = compose.prepare_overrides(args)
    if any(a in ("-m", "--multirun") for a in args):
        _warn_secret_overrides(args)
    compose.precheck_run(args)
    compose.register_recipes(extra, compose.user_config_dir(args))
    for name in compose.LAUNCHER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())
    sys.argv = ["alignctl"] + overrides
    return main()  # non-zero after a sweep with failed points


def _warn_secret_overrides(args: list[str]) -> None:
    """A sweep's overrides reach disk through Hydra's launchers (multirun.yaml, submitit's pickled job files) before
    any alignctl code can redact them: say so, once, for overrides that look secret."""
    keys = [compose.override_key(a) for a in args if "=" in a and not a.startswith("-") and redact([a]) != [a]]
    if keys:
        print(f"alignctl: warning: {', '.join(keys)} looks like a secret; Hydra's launcher writes a sweep's overrides "
              "to disk before alignctl can redact them: export it as an environment variable instead (the ranks "
              "inherit it), e.g. export HF_TOKEN=...", file=sys.stderr)


class _Failed(Exception):
    def __init__(self, code: int, reason: str):
        self.code, self.reason = code, reason
        super().__init__(reason)


def main() -> int:
    """Run the Hydra application (``sys.argv`` already set); after a sweep, name its failed points. The exit code:
    0, or for a sweep with failed points 2 when every failure was a configuration error, else 1."""
    POINTS.clear()
    _MAIN_PID[:] = [os.getpid()]
    try:
        hydra_main()
    finally:  # also when Ctrl-C stopped the sweep: the points that failed before it
        code = _sweep_summary(POINTS)
    return code


@hydra.main(version_base="1.3", config_path=str(CONFIGS_DIR), config_name="config")
def hydra_main(cfg: DictConfig):
    """One run, or one point of a sweep. A run that fails exits (code 2: configuration, 130: interrupted, 1: other);
    a failed sweep point is recorded (manifest, report.md) and the sweep goes on: the point returns NaN (a failed
    trial for a sweeper such as Optuna). An interrupted point stops the sweep."""
    console.setup()  # per-step metrics, library warnings and progress bars off the console (kept in alignctl.log)
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if multirun:  # Hydra saved the sweep's config with every override as given: redact it
        _redact_file(Path(hc.sweep.dir) / "multirun.yaml")
    try:
        manifest, value = _resolve_and_run(cfg, hc)
    except _Failed as f:
        _report_failed_run(Path(hc.runtime.output_dir))
        if not multirun or f.code == 130:
            sys.exit(f.code)
        return _failed_point(hc, f)
    if multirun:
        POINTS.append(_point(hc, 0, ""))
    views.summary(manifest)
    return value


def _resolve_and_run(cfg: DictConfig, hc) -> tuple[dict, float | None]:
    """Resolve and run; a failure is printed the alignctl way (one line, or the failing rank's error) and raised as
    :class:`_Failed` with its exit code. ``--debug`` lets the original exception through. Returns the manifest and
    the sweep objective."""
    try:
        resolved = resolve(cfg, hc.runtime.output_dir, run=True)
        for note in resolved.notes:
            log.warning("%s", note)
        config = redact(OmegaConf.to_container(cfg, resolve=True))
        config_yaml = OmegaConf.to_yaml(OmegaConf.create(config))
        manifest = pipeline.run(resolved, list(hc.overrides.task), config_yaml)
    except ConfigError as e:
        if errors.debug():
            raise
        raise _Failed(errors.report(e), e.problems[0] if e.problems else str(e)) from None
    except StageFailed as e:  # a rank of a torchrun/accelerate stage failed: its error once, no orchestrator traceback
        _say(e.report())
        raise _Failed(1, str(e).splitlines()[0]) from None
    except KeyboardInterrupt:
        _say(f"alignctl: interrupted; manifest: {hc.runtime.output_dir}/manifest.json. Re-run the same command to "
             "resume (completed stages are reused, the interrupted one resumes from its last checkpoint).")
        raise _Failed(130, "interrupted") from None
    except Exception as e:
        if errors.debug():
            raise
        log.exception("internal error")
        code = errors.internal_error(e, Path(hc.runtime.output_dir) / f"{hc.job.name}.log")
        raise _Failed(code, f"internal error ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
                      ) from None
    return manifest, objective(manifest, resolved.sweep.get("objective"))


def _say(text: str) -> None:
    try:
        print(text, file=sys.stderr)
    except OSError:  # the terminal is gone (SIGHUP after an ssh drop): the manifest says it all
        pass


def _point(hc, code: int, reason: str) -> dict:
    return {"job": hc.job.num, "overrides": redact(list(hc.overrides.task)), "code": code, "reason": reason,
            "run_dir": str(hc.runtime.output_dir)}


def _failed_point(hc, f: _Failed) -> float:
    """Record a failed sweep point and go on with the next one (see :func:`hydra_main`)."""
    if _MAIN_PID != [os.getpid()]:
        raise SweepPointFailed(f"sweep point #{hc.job.num} failed: {f.reason} (manifest: "
                               f"{hc.runtime.output_dir}/manifest.json)")
    POINTS.append(_point(hc, f.code, f.reason))
    log.warning("sweep point #%s failed; going on with the next point", hc.job.num)
    return float("nan")


def _sweep_summary(points: list[dict]) -> int:
    """The last lines of a sweep with failed points (their swept values, why, their run folder); the exit code."""
    failed = [p for p in points if p["code"]]
    if not failed:
        return 0
    common = set.intersection(*(set(p["overrides"]) for p in points))
    _say(f"alignctl: {len(failed)} of {len(points)} sweep points failed:")
    for p in failed:
        swept = " ".join(o.lstrip("+") for o in p["overrides"] if o not in common) or "the base configuration"
        _say(f"  #{p['job']} {swept}: {p['reason']} ({p['run_dir']})")
    return 2 if all(p["code"] == 2 for p in failed) else 1


def _report_failed_run(run_dir: Path) -> None:
    """report.md for a run that failed or was interrupted (its manifest says which stage, and why)."""
    path = run_dir / "manifest.json"
    if not path.is_file():  # it failed before the run started (e.g. a configuration error)
        return
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("status") in ("failed", "interrupted"):  # not another live run's manifest ("running")
            report.write_run_report(manifest)
    except Exception as e:  # noqa: BLE001 - a report must never hide the run's own error
        log.warning("could not write report.md: %s", e)


def _redact_file(path: Path) -> None:
    """Rewrite a YAML file Hydra wrote (multirun.yaml) with secrets redacted, readable by the user only."""
    try:
        text = OmegaConf.to_yaml(OmegaConf.create(redact(OmegaConf.to_container(OmegaConf.load(path)))))
    except (OSError, ValueError) as e:
        log.warning("could not redact %s: %s", path, e)
        return
    write_text_atomic(path, text, mode=0o600)
