"""What TRL 1.16 does with settings that recipes written for older TRL (and other tools' docs) still use, said at plan
time instead of in a log line mid-run (no torch, no TRL): ``padding_free`` on a DPO stage (ignored by TRL since 0.29:
an error), ``liger_kernel_config`` with ``fused_linear_cross_entropy`` (TRL 1.16 raises: an error) and
``use_liger_kernel`` (deprecated in 1.16, to be removed in 2.0: a note with the replacement). Sources:
../shared/reference/anchor-research-2026-12-02.md, sections 1.3 and 1.4."""

from __future__ import annotations

from typing import Any

DPO_CONFIG = "trl.DPOConfig"


def check(config_class: str, args: dict[str, Any], where: str) -> tuple[list[str], list[str]]:
    """(problems, notes) for one stage's TRL fields."""
    problems, notes = [], []
    if config_class == DPO_CONFIG and args.get("padding_free"):
        problems.append(f"{where}.padding_free: TRL's DPOTrainer ignores it (there has been no padding-free DPO since "
                        "TRL 0.29: it logs a line and pads as usual); remove it")
    liger = args.get("liger_kernel_config")
    if isinstance(liger, dict) and liger.get("fused_linear_cross_entropy"):
        problems.append(f"{where}.liger_kernel_config: TRL 1.16 raises on fused_linear_cross_entropy: its own fused, "
                        "chunked LM head (always on) replaced Liger's; remove that key")
    if args.get("use_liger_kernel"):
        if not config_class.startswith("trl."):  # alignctl's own loops (PPO, generate) use no Liger kernels
            problems.append(f"{where}.use_liger_kernel: {config_class} uses no Liger kernels; remove it")
        else:
            notes.append(f"{where}.use_liger_kernel: deprecated in TRL 1.16 (removed in 2.0): TRL's own fused LM head "
                         "is always on, and the flag now only swaps in Liger's per-layer kernels; for Hub kernels set "
                         "model_init_kwargs: {use_kernels: true} instead")
    return problems, notes
