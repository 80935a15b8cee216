"""The Hydra application behind ``alignctl run``: resolve once, then run the pipeline.

Errors end the way every alignctl error does (alignctl.errors): a user's mistake is one short message and exit
code 2; a bug is "internal error" with the traceback kept in the run log (<run dir>/alignctl.log).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from alignctl import errors
from alignctl.errors import ConfigError
from alignctl.launch import StageFailed
from alignctl.spec import CONFIGS_DIR

log = logging.getLogger("alignctl")


@hydra.main(version_base="1.3", config_path=str(CONFIGS_DIR), config_name="config")
def hydra_main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from alignctl import checks, console, pipeline, plan, spec

    console.setup()  # per-step metrics, library warnings and progress bars off the console (kept in alignctl.log)
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:  # Hydra saved the sweep's config with every override as given: redact it
        _redact_file(Path(hc.sweep.dir) / "multirun.yaml")
    try:
        resolved = spec.resolve(cfg, hc.runtime.output_dir, run=True)
        for note in resolved.get("notes", []):
            log.warning("%s", note)
        config = checks.redact(OmegaConf.to_container(cfg, resolve=True))
        config_yaml = OmegaConf.to_yaml(OmegaConf.create(config))
        manifest = pipeline.run(resolved, list(hc.overrides.task), config_yaml)
    except ConfigError as e:
        if errors.debug():
            raise
        sys.exit(errors.report(e))
    except StageFailed as e:  # a rank of a torchrun/accelerate stage failed: its error once, no orchestrator traceback
        print(e.report(), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"alignctl: interrupted; manifest: {hc.runtime.output_dir}/manifest.json. "
              "Re-run the same command to resume (completed stages are reused, the interrupted one resumes "
              "from its last checkpoint).", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if errors.debug():
            raise
        log.exception("internal error")
        sys.exit(errors.internal_error(e, Path(hc.runtime.output_dir) / f"{hc.job.name}.log"))
    plan.summary(manifest)
    return plan.objective(manifest, (resolved.get("sweep") or {}).get("objective"))


def _redact_file(path: Path) -> None:
    """Rewrite a YAML file Hydra wrote (multirun.yaml) with secrets redacted, readable by the user only."""
    import os

    from alignctl import checks

    try:
        text = OmegaConf.to_yaml(OmegaConf.create(checks.redact(OmegaConf.to_container(OmegaConf.load(path)))))
    except (OSError, ValueError) as e:
        log.warning("could not redact %s: %s", path, e)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
