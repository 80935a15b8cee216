"""Runtime behaviour of runs and sweeps (issue 17: F14, F27, F29, F31, F32): a failed sweep point does not end the
sweep; dead points are reported as died; the worker's test hook never fails a real run; the launcher's exit, not
its output, ends a stage; SIGHUP stops a run like SIGTERM; the pre-flight checks under torchrun / accelerate leave
the orchestrator's GPU alone; an accelerate launch whose port was taken is retried."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignctl import launch, pipeline, report, worker
from alignctl.config import launcher as launch_config
from alignctl.errors import StageFailed
from conftest import read_manifest, run_cli

ONE_SFT = ("data:\n  chat: {path: builtin:sft.jsonl, eval_size: 16}\n"
           "stages:\n  sft: {trainer: sft, data: chat, max_steps: 2, per_device_train_batch_size: 4}\n")


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def alignctl_log():
    logger, handler = logging.getLogger("alignctl"), Collect()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


# -- F14: a failed sweep point is recorded and the sweep goes on ---------------------------------------------------
def test_a_failed_sweep_point_is_recorded_and_the_next_point_runs(tmp_path):
    """learning_rate 1e30 diverges at training time (the stage fails after training two steps); the second point
    still runs, the failed one gets a manifest and a report.md saying which stage failed and why, and the sweep
    ends with exit code 1 and the failed point named in its last lines."""
    recipe = tmp_path / "one.yaml"
    recipe.write_text(ONE_SFT)
    sweep = tmp_path / "sweep"
    proc = run_cli(["run", "-m", f"recipe={recipe}", "stages.sft.learning_rate=1e30,1e-4", f"hydra.sweep.dir={sweep}",
                    f"output_root={tmp_path}/out", "eval.enabled=false"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    failed, ok = read_manifest(sweep / "0"), read_manifest(sweep / "1")
    assert ok["status"] == "completed" and ok["stages"][0]["status"] == "completed"
    assert failed["status"] == "failed" and failed["stages"][0]["status"] == "failed"
    assert "training diverged" in failed["error"]
    text = (sweep / "0" / "report.md").read_text()
    assert text.startswith("# one — failed") and "**failed** in stage sft (sft): stage sft failed (training diverged)" \
        in text and "Final model: none" in text
    last = proc.stderr.strip().splitlines()[-2:]
    assert last[0] == "alignctl: 1 of 2 sweep points failed:"
    assert last[1].startswith("  #0 stages.sft.learning_rate=1e+30: stage sft failed (training diverged)")
    assert last[1].endswith(f"({sweep / '0'})") and "Traceback" not in proc.stderr
    _, _, rows = report.sweep_report(sweep)
    assert [r["status"] for r in rows] == ["failed", "completed"]


def test_sweep_exit_code_is_2_only_when_every_failure_was_a_configuration_error(capsys):
    from alignctl.cli import run as cli_run

    def point(job, code):
        return {"job": job, "overrides": ["recipe=r", f"++x={job}"], "code": code, "reason": f"why {job}",
                "run_dir": f"/s/{job}"}

    assert cli_run._sweep_summary([point(0, 0), point(1, 0)]) == 0 and capsys.readouterr().err == ""
    assert cli_run._sweep_summary([point(0, 2), point(1, 0), point(2, 2)]) == 2
    assert capsys.readouterr().err.splitlines() == ["alignctl: 2 of 3 sweep points failed:",
                                                   "  #0 x=0: why 0 (/s/0)", "  #2 x=2: why 2 (/s/2)"]
    assert cli_run._sweep_summary([point(0, 2), point(1, 1)]) == 1


def _manifest(run_dir: Path, status: str) -> None:
    run_dir.mkdir(parents=True)
    stage = {"name": "sft", "trainer": "sft", "status": "running" if status == "running" else "completed",
             "metrics": {}}
    (run_dir / "manifest.json").write_text(json.dumps({
        "recipe": "r", "status": status, "run_dir": str(run_dir), "final_model": str(run_dir / "sft" / "final"),
        "overrides": [f"++x={run_dir.name}"], "stages": [stage]}))


def test_sweep_report_marks_running_points_whose_process_is_gone_as_died(tmp_path):
    """A point killed with kill -9 leaves its manifest at "running" and its run-directory lock behind."""
    from alignctl import fsutil

    sweep = tmp_path / "sweep"
    for name, status in (("0", "running"), ("1", "running"), ("2", "running"), ("3", "completed")):
        _manifest(sweep / name, status)
    # 0: its holder was killed (a process that took the lock and died without releasing it)
    code = ("import os, sys; from alignctl import fsutil; fsutil.FileLock(sys.argv[1], timeout=0).acquire(); "
            "os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(sweep / "0" / ".alignctl.lock")], check=True, timeout=60)
    old = time.time() - 2 * fsutil.lock_settings()["stale"]
    os.utime(sweep / "0" / ".alignctl.lock", (old, old))  # and its heartbeat stopped long ago
    # 1: still running (this process holds its lock); 2: no lock at all (a run ends by removing it)
    live = fsutil.FileLock(sweep / "1" / ".alignctl.lock", timeout=0)
    live.acquire()
    try:
        _, _, rows = report.sweep_report(sweep)
    finally:
        live.release()
    assert [(r["job"], r["status"]) for r in rows] == [("0", "died"), ("1", "running"), ("2", "died"),
                                                       ("3", "completed")]


def test_run_report_of_an_interrupted_run_names_the_stage(tmp_path):
    m = {"recipe": "r", "status": "interrupted", "run_dir": str(tmp_path), "final_model": "x", "error": "signal SIGHUP",
         "stages": [{"name": "sft", "trainer": "sft", "status": "completed", "metrics": {}},
                    {"name": "dpo", "trainer": "dpo", "status": "interrupted", "metrics": {}}]}
    text = report.write_run_report(m).read_text()
    assert "**interrupted** in stage dpo (dpo): signal SIGHUP. Re-run the same command to resume" in text
    m.update(status="failed", error="stages.sft.data: no such file", stages=[{**m["stages"][0], "status": "pending"}])
    assert "**failed** before any stage ran: stages.sft.data: no such file" in report.write_run_report(m).read_text()


# -- F27: the worker's test hook -----------------------------------------------------------------------------------
def test_a_malformed_fail_hook_is_ignored_with_one_warning(monkeypatch, alignctl_log):
    for value in ("x", "1:", "one:sft", "1:sft:extra", "-1"):
        monkeypatch.setenv(launch.FAIL_HOOK, value)
        alignctl_log.clear()
        worker._test_hook(0, "sft")  # never raises
        worker._test_hook(1, "sft")
        assert alignctl_log == [f"ignoring {launch.FAIL_HOOK}={value!r}: a test hook, expected <rank>[:<stage>]"]
    monkeypatch.setenv(launch.FAIL_HOOK, "1:dpo")
    worker._test_hook(1, "sft")
    worker._test_hook(0, "dpo")
    with pytest.raises(RuntimeError, match="failure injected on rank 1"):
        worker._test_hook(1, "dpo")
    monkeypatch.setenv(launch.FAIL_HOOK, "0")
    with pytest.raises(RuntimeError):
        worker._test_hook(0, "anything")


# -- F29: the launcher's exit ends the stage; SIGHUP ---------------------------------------------------------------
FAKE_LAUNCHER = """\
import json, subprocess, sys
from pathlib import Path
launch_dir = Path(sys.argv[-1]).parent / "launch"
# a descendant that leaves the process group and keeps the launcher's stdout open
child = subprocess.Popen(["sleep", "120"], start_new_session=True)
Path(sys.argv[1]).write_text(str(child.pid))
print("alignctl[rank0]: fake rank done", flush=True)
(launch_dir / "result.json").write_text(json.dumps({"metrics": {"after": {"x": 1.0}}, "world_size": 1}))
"""


def _fake_launcher(tmp_path: Path, kind: str, script: str, *args: str) -> dict:
    (tmp_path / "fake.py").write_text(script)
    node = {"kind": kind, "prefix": [sys.executable, str(tmp_path / "fake.py"), *args]}
    node.update({"nproc_per_node": 1} if kind == "torchrun" else {"config_file": "ddp", "num_processes": 1})
    resolved, problems = launch_config.resolve(node)
    assert not problems
    return resolved


def _work(name: str, tmp_path):
    """The least of a stage spec the launcher reads (the fake ranks read nothing)."""
    from conftest import stage_spec

    return stage_spec(name, source="earlier", run_dir=tmp_path, attempt="a1", precision="fp32",  # no model to build
                      entry_dir=str(tmp_path / name))


def test_the_launchers_exit_ends_the_stage_even_if_a_descendant_holds_its_output(tmp_path, alignctl_log):
    pid_file = tmp_path / "orphan.pid"
    node = _fake_launcher(tmp_path, "torchrun", FAKE_LAUNCHER, str(pid_file))
    spec = tmp_path / "sft" / "spec.json"
    spec.parent.mkdir()
    t0 = time.monotonic()
    try:
        result = launch.run_stage(_work("sft", tmp_path), spec, node)
        elapsed = time.monotonic() - t0
    finally:
        if pid_file.is_file():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert result["metrics"] == {"after": {"x": 1.0}}
    assert elapsed < 30, f"waited {elapsed:.0f} s for a process that outlived the launcher"  # it sleeps 120 s
    assert "fake rank done" in alignctl_log  # the output written before the launcher exited was read
    assert "fake rank done" in (tmp_path / "sft" / "launch" / "output.log").read_text()


def test_sighup_stops_a_run_like_sigterm():
    """An ssh connection that drops (no tmux) sends SIGHUP: the stage and the run are marked interrupted."""
    before = signal.getsignal(signal.SIGHUP)
    with pipeline._stop_on_sigterm():
        handler = signal.getsignal(signal.SIGHUP)
        assert handler not in (signal.SIG_DFL, signal.SIG_IGN, before)  # checked before sending: SIG_DFL would kill
        assert handler == signal.getsignal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt, match="SIGHUP"):
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(5)  # the handler runs at once; this is not reached
    assert signal.getsignal(signal.SIGHUP) == before


# -- F31: the pre-flight checks under torchrun / accelerate stay off the orchestrator's GPU -------------------------
def test_preflight_under_torchrun_initialises_neither_cuda_nor_accelerate_here(cache_root, tmp_path, alignctl_log,
                                                                             monkeypatch):
    """Building a TRL config creates accelerate's PartialState (GPU 0 selected) and resolving precision auto
    initialises CUDA: under torchrun both happen in a short-lived process, not in the orchestrator (this one).
    On a machine without GPUs the checks run in the orchestrator (nothing to protect): forced here as with a GPU."""
    import torch
    from accelerate.state import PartialState

    from alignctl import probe
    from alignctl.config.compose import compose
    from alignctl.config.resolve import resolve
    from alignctl.errors import ConfigError

    def stages(*extra):
        resolved = resolve(compose([f"output_root={cache_root}", "launcher=torchrun", "launcher.nproc_per_node=1",
                                         *extra]), tmp_path / "run", run=True)
        return pipeline.stage_specs(resolved), resolved.launcher

    had_training_args = "transformers.training_args" in sys.modules
    saved = dict(PartialState._shared_state)  # an earlier test in this process may have trained here
    PartialState._shared_state.clear()
    monkeypatch.setattr(probe, "no_gpu", lambda: False)
    try:
        prepared = pipeline.preflight(*stages())
        assert PartialState._shared_state == {}
        with pytest.raises(ConfigError, match="stages.dpo: trl.DPOConfig rejects the settings"):
            pipeline.check_configs(*stages("stages.dpo.loss_weights=[1.0,2.0,3.0]"))
        assert PartialState._shared_state == {}
    finally:
        PartialState._shared_state.clear()
        PartialState._shared_state.update(saved)
    assert not torch.cuda.is_initialized()
    if not had_training_args:
        assert "transformers.training_args" not in sys.modules
    assert sum("checked in a separate process" in line for line in alignctl_log) == 2
    want = "fp32" if not torch.cuda.is_available() else None
    assert [s.precision_setting for s in prepared] == ["auto", "auto"]
    assert want is None or [s.precision for s in prepared] == [want, want]


def test_no_gpu_reads_the_visible_devices_without_torch(monkeypatch):
    from alignctl import probe

    monkeypatch.setattr("shutil.which", lambda name: None)  # no nvidia-smi, rocm-smi, amd-smi
    for k in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        monkeypatch.delenv(k, raising=False)
    assert probe.no_gpu()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert not probe.no_gpu()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "0")
    assert not probe.no_gpu()


# -- F32: a single-machine accelerate launch whose port was taken is retried ---------------------------------------
PORT_TAKEN = """\
import json, sys
from pathlib import Path
calls = Path(sys.argv[1])
port = sys.argv[sys.argv.index("--main_process_port") + 1]
n = len(calls.read_text().split()) if calls.exists() else 0
calls.write_text((calls.read_text() if calls.exists() else "") + port + "\\n")
if n < int(sys.argv[2]):
    print(sys.argv[3].format(port=port), flush=True)
    sys.exit(1)
(Path(sys.argv[-1]).parent / "launch" / "result.json").write_text(json.dumps({"metrics": {"ok": 1}, "world_size": 1}))
"""


def _port_run(tmp_path: Path, fail_times: int, message: str) -> tuple[dict | Exception, list[str]]:
    calls = tmp_path / "calls.txt"
    node = _fake_launcher(tmp_path, "accelerate", PORT_TAKEN, str(calls), str(fail_times), message)
    spec = tmp_path / "dpo" / "spec.json"
    spec.parent.mkdir(exist_ok=True)
    try:
        result: dict | Exception = launch.run_stage(_work("dpo", tmp_path), spec, node)
    except StageFailed as e:
        result = e
    ports = calls.read_text().split()
    calls.unlink()
    return result, ports


TAKEN = ("torch.distributed.DistNetworkError: The server socket has failed to listen on any local network address. "
         "port: {port}, useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use")


def test_accelerate_launch_retries_with_a_fresh_port_when_its_port_was_taken(tmp_path, alignctl_log):
    result, ports = _port_run(tmp_path, 1, TAKEN)
    assert result == {"metrics": {"ok": 1}, "world_size": 1}
    assert len(ports) == 2 and ports[0] != ports[1]
    assert sum("launching again with a fresh port (retry 1 of 3)" in line for line in alignctl_log) == 1
    result, ports = _port_run(tmp_path, 10, TAKEN)  # taken every time: at most 3 retries
    assert isinstance(result, StageFailed) and "EADDRINUSE" in str(result.error) and len(ports) == 4
    result, ports = _port_run(tmp_path, 1, "RuntimeError: connection refused")  # another failure: not retried
    assert isinstance(result, StageFailed) and len(ports) == 1


def test_single_node_torchrun_picks_its_own_port():
    node, _ = launch_config.resolve({"kind": "torchrun", "nproc_per_node": 2})
    cmd = launch.command(node, "spec.json")
    assert "--standalone" in cmd and "--rdzv_endpoint" not in cmd and "--master_port" not in cmd
