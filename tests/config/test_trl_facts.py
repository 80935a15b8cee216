"""TRL 1.16 facts at plan time (settings TRL now ignores or refuses stop with one line naming the key and what TRL
does; the deprecated use_liger_kernel gets a note with its replacement and plans), and `plan --json`."""

from __future__ import annotations

import pytest

from alignctl.cli import main


def plan(capsys, *overrides: str) -> tuple[int, str]:
    rc = main(["plan", *overrides])
    out = capsys.readouterr()
    return rc, out.out + out.err


@pytest.mark.parametrize("overrides,expected", [
    (["+stages.dpo.padding_free=true"], "stages.dpo.padding_free: TRL's DPOTrainer ignores it (there has been no "
                                        "padding-free DPO since TRL 0.29"),
    (["+stages.sft.liger_kernel_config={fused_linear_cross_entropy: true}"],
     "stages.sft.liger_kernel_config: TRL 1.16 raises on fused_linear_cross_entropy"),
    (["recipe=rlhf-ppo", "+stages.ppo.use_liger_kernel=true"],
     "stages.ppo.use_liger_kernel: alignctl.rl.ppo_config.PPOConfig uses no Liger kernels; remove it"),
])
def test_what_trl_116_ignores_or_refuses_stops_at_plan(capsys, overrides, expected):
    rc, text = plan(capsys, *overrides)
    assert rc == 2 and expected in text and "Traceback" not in text, text


def test_use_liger_kernel_plans_with_the_trl_116_note(capsys):
    rc, text = plan(capsys, "+stages.dpo.use_liger_kernel=true")
    assert rc == 0, text
    assert "stages.dpo.use_liger_kernel: deprecated in TRL 1.16 (removed in 2.0)" in " ".join(text.split())
    assert "use_kernels: true" in text
    rc, text = plan(capsys, "+stages.dpo.padding_free=false")  # off is what TRL does anyway: fine
    assert rc == 0, text


def test_plan_json_is_the_resolved_spec_for_other_tools(capsys):
    import json

    rc = main(["plan", "--json", "recipe=rlhf-ppo", "stages.ppo.kl_target=2"])
    blob = json.loads(capsys.readouterr().out)
    assert rc == 0 and blob["plan_format"] == 1 and blob["recipe"] == "rlhf-ppo"
    stages = {s["name"]: s for s in blob["stages"]}
    assert list(stages) == ["sft", "rm", "rm_audit", "rm_b", "ppo"]
    ppo = stages["ppo"]
    assert ppo["kind"] == "ppo" and ppo["args"]["kl_target"] == 2 and ppo["links"]["audit"]["stage"] == "rm_audit"
    assert ppo["links"]["reward.2"]["stage"] == "rm_b"  # the ensemble's second member
    assert ppo["monitors"]["length_corr"] == 0.7 and ppo["eval"]["reward"] == "rm_audit"
    rc, text = plan(capsys, "--json", "stages.dpo.beta=-1")  # a mistake: the usual one-line message, exit 2
    assert rc == 2 and "stages.dpo.beta" in text
