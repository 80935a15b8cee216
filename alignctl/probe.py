"""The run's pre-flight checks that need torch, TRL and this machine's GPU, kept off the GPU of the orchestrator.

What it checks: ``precision: auto`` resolved (bf16 / fp16 / fp32, and an ``auto`` QLoRA compute dtype), every
stage's TRL config built (TRL's own validation, its ``report_to`` trackers), and what the machine needs for each
stage (attention kernel, 4-bit). Building a TRL config runs ``TrainingArguments.__post_init__``, which creates
accelerate's ``PartialState`` and selects GPU 0, and resolving ``auto`` initialises CUDA: a process that does either
holds a CUDA context on GPU 0 until it exits. With ``launcher=local`` the stages train in the orchestrator anyway, so
the checks run there. Under torchrun / accelerate the orchestrator only waits for its ranks, and a context kept
there would take memory from rank 0 for the whole run (or, on GPUs in EXCLUSIVE_PROCESS mode, stop rank 0 from
using its GPU at all), so the checks run in a short-lived process instead:
``python -m alignctl.probe <stages.json> <result.json>`` (the stages as their spec.json hold them). On a machine
with no GPU at all (no visible CUDA device, no ROCm tools: :func:`no_gpu`) there is no context to keep off one,
and the checks run in the orchestrator under every launcher (a separate process costs a TRL import, ~7 s).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from alignctl.config.types import StageSpec

log = logging.getLogger("alignctl")

NUMERIC_KEYS = ("precision", "precision_setting", "peft")  # what fingerprint.resolve_numerics fills in
TIMEOUT_S = 900  # a check process that hangs this long (a stuck file system, a GPU driver) is an error


def run(stages: list[StageSpec], launcher: dict | None) -> dict:
    """``{"numerics": [per stage: precision, precision_setting, peft], "problems": [...]}``, computed in this process
    for the local launcher or a machine without GPUs, and in a separate process for torchrun / accelerate."""
    if (launcher or {}).get("kind", "local") == "local" or no_gpu():
        return check(stages)
    return _in_subprocess(stages)


def check(stages: list[StageSpec]) -> dict:
    """The checks, in this process (it may initialise CUDA and accelerate's state: see the module docstring)."""
    import importlib

    from alignctl import fingerprint, models
    from alignctl.stages import STAGES
    from alignctl.train.context import StageContext

    resolved = fingerprint.resolve_numerics(stages)
    problems: list[str] = []
    for s in resolved:
        kind = STAGES[s.kind]
        module, _, cls = kind.config_class.rpartition(".")
        try:
            with models.training_environment(s, note=False):  # as the stage will see it (no inherited FSDP_* ...)
                config = getattr(importlib.import_module(module), cls)(**StageContext.args_for(s))
            problems += report_to_problems(getattr(config, "report_to", None), f"stages.{s.name}")
        except (ValueError, TypeError, NotImplementedError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            problems.append(f"stages.{s.name}: {kind.config_class} rejects the settings: {first}")
    for s in stages:
        problems += [p for p in models.device_problems(s) if p not in problems]  # attention, 4-bit on this machine
    return {"numerics": [{k: getattr(s, k) for k in NUMERIC_KEYS} for s in resolved], "problems": problems}


def no_gpu() -> bool:
    """True when this machine has no GPU a check could take a context on (without importing torch): no CUDA device
    visible (CUDA_VISIBLE_DEVICES, nvidia-smi) and no ROCm (HIP/ROCR_VISIBLE_DEVICES, rocm-smi). Unsure: False."""
    from alignctl.config.launcher import gpu_count

    if gpu_count() or shutil.which("rocm-smi") or shutil.which("amd-smi"):
        return False
    return not any(os.environ.get(k) for k in ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"))


def report_to_problems(report_to: Any, where: str) -> list[str]:
    """``report_to`` of a built TRL config (a list of names) against transformers' trackers and what is installed:
    the Trainer would refuse them only when the stage starts (imports transformers)."""
    from transformers.integrations import integration_utils as iu

    from alignctl.errors import suggest

    names = [] if report_to in (None, "none") else ([report_to] if isinstance(report_to, str) else list(report_to))
    problems = []
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in iu.INTEGRATION_TO_CALLBACK:
            close = suggest(str(name), iu.INTEGRATION_TO_CALLBACK)
            problems.append(f"{where}.report_to: unknown tracker {name!r}{close}"
                            f"; choose from none, all, {', '.join(iu.INTEGRATION_TO_CALLBACK)}")
            continue
        available = getattr(iu, f"is_{ {'azure_ml': 'azureml', 'comet_ml': 'comet'}.get(name, name)}_available", None)
        if available is not None and not available():
            problems.append(f"{where}.report_to: {name} is not installed (pip install {name.replace('_', '-')}), "
                            "or leave it out of report_to")
    return problems


def _in_subprocess(stages: list[StageSpec]) -> dict:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="alignctl-probe-") as tmp:
        given, result = Path(tmp) / "stages.json", Path(tmp) / "result.json"
        given.write_text(json.dumps([s.to_json() for s in stages]))  # each stage as its spec.json holds it
        try:
            proc = subprocess.run([sys.executable, "-m", "alignctl.probe", str(given), str(result)],
                                  capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the pre-flight check process did not finish within {TIMEOUT_S} s") from None
        if proc.returncode != 0 or not result.is_file():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"the pre-flight check process failed (exit code {proc.returncode}):\n{tail}")
        out = json.loads(result.read_text())
    log.info("pre-flight: TRL configs and this machine's devices checked in a separate process (%.1f s), so that "
             "this one never touches the GPU", time.monotonic() - t0, extra={"detail": True})
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m alignctl.probe <stages.json> <result.json>", file=sys.stderr)
        return 2
    out = check([StageSpec.from_json(text) for text in json.loads(Path(argv[0]).read_text())])
    Path(argv[1]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
