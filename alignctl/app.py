"""The Hydra application behind ``alignctl run``: resolve once, then run the pipeline."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from alignctl.cli import CONFIGS_DIR, _error
from alignctl.launch import StageFailed
from alignctl.spec import ConfigError

log = logging.getLogger("alignctl")


@hydra.main(version_base="1.3", config_path=str(CONFIGS_DIR), config_name="config")
def hydra_main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    from alignctl import pipeline, plan, spec

    hc = HydraConfig.get()
    try:
        resolved = spec.resolve(cfg, hc.runtime.output_dir)
        config_yaml = OmegaConf.to_yaml(OmegaConf.create(pipeline.redact(OmegaConf.to_container(cfg, resolve=True))))
        manifest = pipeline.run(resolved, list(hc.overrides.task), config_yaml)
    except ConfigError as e:
        sys.exit(_error(e))
    except StageFailed as e:  # a rank of a torchrun/accelerate stage failed: its error once, no orchestrator traceback
        print(e.report(), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"alignctl: interrupted; manifest: {hc.runtime.output_dir}/manifest.json. "
              "Re-run the same command to resume (completed stages are reused, the interrupted one resumes "
              "from its last checkpoint).", file=sys.stderr)
        sys.exit(130)
    plan.summary(manifest)
    return plan.objective(manifest)
