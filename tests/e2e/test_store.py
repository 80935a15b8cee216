"""Stage fingerprints, the stage store, sweeps that reuse shared stages, reports."""

from __future__ import annotations

import json

import pytest

from alignctl import fingerprint
from alignctl.cli import main
from alignctl.config.compose import compose
from alignctl.config.resolve import resolve
from alignctl.pipeline import stage_specs
from conftest import REPO, read_manifest, read_spec, run_cli

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fps(tmp_path, *overrides):
    return fingerprint.fingerprints(stage_specs(resolve(compose(list(overrides)), tmp_path / "run")))


def test_weight_relevant_change_refingerprints_stage_and_everything_after(tmp_path):
    base = fps(tmp_path)
    lr = fps(tmp_path, "stages.sft.learning_rate=1e-3")
    assert lr["sft"] != base["sft"] and lr["dpo"] != base["dpo"]
    beta = fps(tmp_path, "stages.dpo.beta=0.5")
    assert beta["sft"] == base["sft"] and beta["dpo"] != base["dpo"]
    data = tmp_path / "sft.jsonl"
    data.write_bytes((REPO / "alignctl/assets/data/sft.jsonl").read_bytes())
    same_content = fps(tmp_path, f"data.sft.path={data}")
    assert same_content == base  # the content, not the file name, identifies local data
    data.write_text(data.read_text().replace("river", "brook"))
    assert fps(tmp_path, f"data.sft.path={data}")["sft"] != base["sft"]


def test_logging_and_output_settings_do_not_refingerprint(tmp_path):
    base = fps(tmp_path)
    other = fps(tmp_path, "stages.sft.logging_steps=1", "stages.dpo.report_to=tensorboard",
                "stages.sft.save_strategy=steps", "stages.dpo.per_device_eval_batch_size=4", "output_root=/elsewhere")
    assert other == base
    assert fps(tmp_path / "another-run-dir") == base


def test_serial_sweep_trains_sft_once_and_reports(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    proc = run_cli(["run", "-m", "stages.dpo.beta=0.02,0.2,2.0", f"hydra.sweep.dir={sweep}",
                    f"output_root={tmp_path}/outputs", "stages.sft.num_train_epochs=2",
                    "stages.dpo.num_train_epochs=1"],
                   cwd=tmp_path, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ms = [read_manifest(sweep / str(i)) for i in range(3)]
    assert all(m["status"] == "completed" for m in ms)
    sft_trained = [m for m in ms if not m["stages"][0]["reused_from"]]
    assert len(sft_trained) == 1, "SFT must be trained exactly once across the sweep"
    assert len({m["stages"][0]["fingerprint"] for m in ms}) == 1
    assert all(not m["stages"][1]["reused_from"] for m in ms)
    margins = [m["stages"][1]["metrics"]["after"]["eval_rewards/margins"] for m in ms]
    assert len({round(x, 6) for x in margins}) == 3, margins
    # DPO's "before" evaluation by alignctl (answers, KL, preference accuracy of the shared SFT weights) is
    # measured at the first point and read back at the others: the same numbers, in no time
    before = [m["stages"][1]["metrics"]["before"] for m in ms]
    for key in ("eval_pref_accuracy", "eval_pref_margin_norm", "eval_completion_tokens", "eval_kl"):
        assert before[1][key] == before[2][key] == before[0][key], key
    read_back = ['"before" evaluation read back' in (sweep / str(i) / "alignctl.log").read_text() for i in range(3)]
    assert read_back == [False, True, True]
    answers = [[json.loads(line)["before"] for line in (sweep / str(i) / "dpo" / "samples.jsonl").read_text()
                .splitlines()] for i in range(3)]
    assert answers[0] == answers[1] == answers[2] and len(answers[0]) == 32
    # one manifest per point, each recording its own override, and each point's DPO spec holding its beta
    for i, beta in enumerate(("0.02", "0.2", "2.0")):
        assert any(o.endswith(f"beta={beta}") for o in ms[i]["overrides"]), ms[i]["overrides"]
        assert read_spec(sweep / str(i) / "dpo" / "spec.json").args["beta"] == float(beta)

    assert main(["report", str(sweep)]) == 0
    out = capsys.readouterr().out
    for beta in ("0.02", "0.2", "2.0"):
        assert beta in out
    text = (sweep / "report.md").read_text()
    assert "stages.dpo.beta" in text and text.count("| completed |") == 3
    assert (sweep / "sweep.png").read_bytes()[:8] == PNG_MAGIC
    # Each run also has its own report with training-curve plots.
    assert (sweep / "0" / "report.md").is_file() and (sweep / "0" / "dpo" / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_parallel_sweep_with_joblib_trains_sft_once(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    proc = run_cli(["run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "stages.dpo.beta=0.02,2.0",
                    f"hydra.sweep.dir={sweep}", f"output_root={tmp_path}/outputs", "stages.sft.num_train_epochs=2",
                    "stages.dpo.num_train_epochs=1"], cwd=tmp_path, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ms = [read_manifest(sweep / str(i)) for i in range(2)]  # two points started together race for the SFT entry
    assert all(m["status"] == "completed" for m in ms)
    assert sum(not m["stages"][0]["reused_from"] for m in ms) == 1
    assert len({round(m["stages"][1]["metrics"]["after"]["eval_rewards/margins"], 6) for m in ms}) == 2


def test_report_on_a_folder_without_runs_is_a_clean_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no */manifest.json" in capsys.readouterr().err
