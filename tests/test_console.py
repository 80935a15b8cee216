"""The console of a run: one line per stage's training (non-TTY), alignctl's own lines, the summary table last;
per-step metrics, library warnings and progress bars only in alignctl.log; `plan` never wraps a line."""

from __future__ import annotations

import pytest

from conftest import run_cli


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("console")
    run_dir = work / "run"
    proc = run_cli(["run", f"hydra.run.dir={run_dir}", f"output_root={work}/outputs"], cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc


def test_default_run_fits_one_screen(default_run):
    run_dir, proc = default_run
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    text = "\n".join(lines)
    # No library progress bars or warnings, no per-step metric dictionaries.
    for noise in ("Map:", "it/s]", "UserWarning", "FutureWarning", "bitsandbytes", "[sft] step", "[dpo] step"):
        assert noise not in text, noise
    # One line per stage's training with its loss and key metric; the evaluation line; the summary table last.
    assert any(line.startswith("[sft] trained 144/144 steps") and "loss" in line for line in lines), text
    assert any(line.startswith("[dpo] trained 72/72 steps") and "rewards/accuracies" in line for line in lines), text
    assert any(line.startswith("[dpo] held-out answers (32 prompts") and "KL" in line for line in lines), text
    assert lines[-1].startswith("manifest: ") and any("eval_pref_accuracy_norm" in line for line in lines[-8:])


def test_the_run_log_keeps_what_the_console_leaves_out(default_run):
    run_dir, _ = default_run
    log = (run_dir / "alignctl.log").read_text()
    assert "[sft] step 10: loss=" in log and "[dpo] step 72: " in log  # every logging step's metrics
    assert "py.warnings" in log and "UserWarning" in log  # library warnings are kept


def test_default_run_manifest_shows_kl_and_both_accuracies(default_run):
    from conftest import read_manifest

    dpo = read_manifest(default_run[0])["stages"][1]["metrics"]
    assert dpo["before"]["eval_kl"] == 0 and dpo["after"]["eval_kl"] > 0
    for key in ("eval_pref_accuracy", "eval_pref_accuracy_norm", "eval_rewards/accuracies"):
        assert dpo["after"][key] >= 0.9, key
    assert "eval_win_rate" not in dpo["after"]  # no reward model in the default recipe


def test_plan_never_wraps_a_line(tmp_path):
    long_dir = tmp_path / ("a-rather-long-directory-name-" * 4)
    proc = run_cli(["plan", f"hydra.run.dir={long_dir}/run"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert any(str(long_dir) in line for line in proc.stdout.splitlines())  # the path on one line, unbroken
    settings = [line for line in proc.stdout.splitlines() if line.strip().startswith("settings")]
    assert settings and all("learning_rate=" in line and "save_strategy=" in line for line in settings)
