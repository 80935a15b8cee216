"""The store and run-directory locks (issue 17: N3, N4, N5, N13): a holder is identified by host, boot id and pid
namespace, not by host name alone; a holder that loses its lock stops before it writes; ``store gc/rm`` work only
under the entry's lock; bad ALIGNCTL_LOCK_* values are one clean line. Lock files, threads and small subprocesses;
one tiny training run (the pipeline-level loss of a lock)."""

from __future__ import annotations

import _thread
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from alignctl import errors, fsutil, store
from alignctl.cli import store as store_cli
from conftest import REPO, read_spec, run_spec, stage_spec

DEAD_PID = 4_000_000  # above the kernel's pid_max: no process has it


def write_lock(path: Path, **fields) -> dict:
    """A lock file as another process would have written it: our identity unless ``fields`` say otherwise."""
    info = {**fsutil.identity(), "pid": DEAD_PID, "proc_start": "1", "user": "someone", "started": "earlier",
            "token": "other-holder", **fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info))
    return info


class Toucher:
    """Touch a lock file every ``every`` seconds from a thread (the heartbeat of a holder we cannot see)."""

    def __init__(self, path: Path, every: float = 0.1):
        self.path, self.every, self.stop = path, every, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(self.every):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def complete_entry(root: Path, name: str = "sft", days_unused: float = 10) -> store.Entry:
    e = store.Entry(root, name, (name.encode().hex() + "0" * 64)[:64])
    e.final.mkdir(parents=True)
    (e.final / "model.safetensors").write_bytes(b"w" * 1000)
    e.mark_complete({"train": {"train_loss": 1.0}}, extra={"stage": name})
    os.utime(e.dir / ".last_used", (time.time() - days_unused * 86400,) * 2)
    return e


def run_store(capsys, *args) -> tuple[int, str]:
    rc = store_cli.run(list(args))
    out = capsys.readouterr()
    return rc, out.out + out.err


# -- N3: who holds a lock -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("other", [{"pid_ns": 1}, {"boot_id": "00000000-0000-0000-0000-000000000000"}, {"old": 1}],
                         ids=["other-pid-namespace", "other-boot", "no-identity-recorded"])
def test_a_holder_of_another_pid_space_with_a_moving_heartbeat_is_never_taken_over(tmp_path, other):
    path = tmp_path / "e" / ".lock"
    info = write_lock(path, **other)
    if "old" in other:  # a lock file that names only the host (alignctl before issue 17)
        path.write_text(json.dumps({k: info[k] for k in ("host", "pid", "proc_start", "token")}))
    with Toucher(path):
        t0 = time.monotonic()
        with pytest.raises(errors.LockTimeout, match="locked by .* judged by its heartbeat"):
            fsutil.FileLock(path, "entry e", timeout=1.5).acquire()
        assert time.monotonic() - t0 >= 1.5
        assert fsutil.lock_is_live(fsutil.read_lock(path), 600)
    assert json.loads(path.read_text())["token"] == "other-holder", "the lock was taken over"


def test_store_gc_and_rm_leave_an_entry_held_in_another_pid_namespace(tmp_path, capsys):
    root = tmp_path / "store"
    e = complete_entry(root)
    (e.dir / "final.abcd1234.partial").mkdir()  # what its holder is writing right now
    write_lock(e.dir / ".lock", pid_ns=1)
    with Toucher(e.dir / ".lock"):
        rc, out = run_store(capsys, "gc", "--store", str(root), "--older-than", "0")
        assert rc == 0 and f"skip {e.dir.name}: locked by" in out, out
        rc, out = run_store(capsys, "rm", "--store", str(root), e.fingerprint[:12])
        assert rc == 1 and f"skip {e.dir.name}: locked by" in out, out
        rc, out = run_store(capsys, "ls", "--store", str(root))
        assert "locked by" in out
    assert e.complete() and (e.dir / "final.abcd1234.partial").is_dir()
    assert json.loads((e.dir / ".lock").read_text())["token"] == "other-holder"


HOLDER = """
import sys, time
from alignctl import fsutil
lock = fsutil.FileLock(sys.argv[1], "entry e", heartbeat=0.1).acquire()
print("held", flush=True)
time.sleep(60)
"""


def _unshare() -> list[str] | None:
    """The unshare command that gives a child its own pid namespace here, or None where it is not permitted."""
    if not shutil.which("unshare") or not Path("/proc/self/ns/pid").exists():
        return None
    for cmd in (["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"],
                ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", "--kill-child"]):
        try:
            if subprocess.run([*cmd, "true"], capture_output=True, timeout=10).returncode == 0:
                return cmd
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


@pytest.mark.skipif(_unshare() is None, reason="unshare --pid is not permitted here")
def test_a_holder_in_a_real_other_pid_namespace_keeps_its_lock(tmp_path, capsys):
    root = tmp_path / "store"
    e = complete_entry(root)
    proc = subprocess.Popen([*_unshare(), sys.executable, "-c", HOLDER, str(e.dir / ".lock")], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        info = fsutil.read_lock(e.dir / ".lock")
        assert info["host"] == fsutil.identity()["host"] and info.get("pid_ns") != fsutil.identity()["pid_ns"]
        with pytest.raises(errors.LockTimeout):
            fsutil.FileLock(e.dir / ".lock", "entry e", timeout=1.5).acquire()
        assert store.holder(e) is not None
        rc, out = run_store(capsys, "gc", "--store", str(root), "--older-than", "0")
        assert f"skip {e.dir.name}" in out and e.complete()
    finally:
        proc.kill()
        proc.wait()


def test_a_dead_looking_pid_whose_heartbeat_moves_is_not_taken_over(tmp_path, caplog):
    caplog.set_level("INFO", logger="alignctl")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    path = tmp_path / ".lock"
    write_lock(path, pid=sleeper.pid, proc_start=fsutil._proc_start(sleeper.pid))
    dies = threading.Timer(0.6, lambda: (sleeper.kill(), sleeper.wait()))
    with Toucher(path):
        dies.start()
        try:
            with pytest.raises(errors.LockTimeout):  # watched it beat, then its pid died: still not taken over
                fsutil.FileLock(path, "entry e", timeout=2.5, poll=0.05).acquire()
        finally:
            dies.join()
    assert sleeper.poll() is not None and json.loads(path.read_text())["token"] == "other-holder"
    assert "looks dead (pid" in caplog.text and "not taking it over" in caplog.text


def test_a_dead_holder_in_this_pid_space_is_still_taken_over_at_once(tmp_path):
    """Regression guard: the old behaviour for a crashed run on this machine (kill -9, then a re-run)."""
    path = tmp_path / ".lock"
    write_lock(path)
    os.utime(path, (time.time() - 5,) * 2)
    t0 = time.monotonic()
    with fsutil.FileLock(path, "entry e", timeout=5) as lock:
        assert time.monotonic() - t0 < 1 and json.loads(path.read_text())["token"] == lock.token
        assert json.loads(path.read_text())["heartbeat"] == lock.heartbeat


def test_a_waiter_gives_the_holder_three_of_its_own_heartbeats(tmp_path):
    path = tmp_path / ".lock"
    write_lock(path, host="node-9", heartbeat=0.6)  # a holder on another node, beating every 0.6 s, gone silent
    t0 = time.monotonic()
    with fsutil.FileLock(path, "entry e", timeout=10, stale=0.3):  # the waiter's own setting is shorter
        assert time.monotonic() - t0 >= 1.8


# -- N4: a holder that lost its lock stops before it writes -----------------------------------------------------------
class FakeModel:
    def __init__(self, text: str):
        self.text = text

    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_text(self.text)


class FakeTokenizer:
    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer.json").write_text("{}")


def test_a_holder_that_lost_its_lock_is_told_at_once_and_cannot_replace_final(tmp_path):
    from alignctl import models, worker
    from alignctl.train.context import owner_guard

    entry = tmp_path / "entry"
    path = entry / ".lock"
    lost = threading.Event()
    mine = fsutil.FileLock(path, "entry", heartbeat=0.05, on_lost=lost.set).acquire()
    work = stage_spec("sft", entry_dir=str(entry), lock_token=mine.token)
    guard = owner_guard(work)
    models.save_final(FakeModel("mine"), FakeTokenizer(), entry / "final", guard)  # still ours: written
    path.unlink()  # forced takeover (e.g. this process was stopped for longer than `stale`)
    with fsutil.FileLock(path, "entry", timeout=1):
        (entry / "final" / "model.safetensors").write_text("the new holder's")
        t0 = time.monotonic()
        assert lost.wait(2) and time.monotonic() - t0 < 0.5 and mine.lost and not mine.owned()
        with pytest.raises(errors.LockLost, match="lost its store lock"):
            models.save_final(FakeModel("stale"), FakeTokenizer(), entry / "final", guard)
        with pytest.raises(errors.LockLost):  # a rank started for the old holder trains nothing
            worker._check_spec(work)
        mine.release()
        assert path.exists()
    assert (entry / "final" / "model.safetensors").read_text() == "the new holder's"
    assert not list(entry.glob("*.partial"))


def test_a_release_racing_a_takeover_never_removes_the_new_holders_lock(tmp_path, monkeypatch):
    path = tmp_path / ".lock"
    mine = fsutil.FileLock(path, "entry", heartbeat=60).acquire()
    real, took_over = fsutil.read_lock, []

    def takeover_right_after_a_read(p):
        """A waiter that judged us stale breaks the lock between our read and our unlink, as a waiter does:
        only while it holds the break file."""
        info = real(p)
        if not took_over:
            try:
                fd = os.open(str(path) + ".break", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                took_over.append(False)
                return info
            os.close(fd)
            path.unlink()
            write_lock(path, token="new-holder", pid=os.getpid(), proc_start=fsutil._proc_start(os.getpid()))
            os.unlink(str(path) + ".break")
            took_over.append(True)
        return info

    monkeypatch.setattr(fsutil, "read_lock", takeover_right_after_a_read)
    mine.release()
    monkeypatch.undo()
    assert took_over, "release read the lock file"
    assert path.exists() == took_over[0], "the new holder's lock was removed" if took_over[0] else "ours stayed"


@pytest.mark.skipif(sys.platform != "linux", reason="interrupting the main thread as on Linux")
def test_a_stage_whose_lock_is_taken_over_stops_and_writes_nothing(tmp_path, cache_root, monkeypatch):
    from alignctl import pipeline
    from alignctl.config.compose import compose
    from alignctl.config.resolve import resolve
    from alignctl.errors import StageFailed

    monkeypatch.setenv("ALIGNCTL_LOCK_HEARTBEAT", "0.1")
    recipe = tmp_path / "sft-only.yaml"
    recipe.write_text("name: sft-only\nstages:\n  sft: {trainer: sft, data: sft, max_steps: 100000, "
                      "per_device_train_batch_size: 2, save_strategy: 'no', logging_steps: 1000}\n")
    overrides = [f"recipe={recipe}", f"output_root={cache_root}", f"store={tmp_path / 'store'}", "eval.enabled=false"]
    resolved = resolve(compose(overrides), tmp_path / "run")
    spec_file = tmp_path / "run" / "sft" / "spec.json"
    swapped: list[float] = []

    def new_holder():  # another process takes the entry over once the stage has started
        while not spec_file.exists():
            time.sleep(0.05)
        time.sleep(1.0)
        work = read_spec(spec_file)
        final = Path(work.entry_dir) / "final"
        final.mkdir(parents=True, exist_ok=True)
        (final / "theirs.txt").write_text("the new holder's final/")
        lock = Path(work.entry_dir) / ".lock"
        lock.unlink()
        write_lock(lock, token="new-holder", pid=os.getpid(), proc_start=fsutil._proc_start(os.getpid()))
        swapped.append(time.monotonic())

    def watchdog():  # bounds the test where the stage would train on (100000 steps)
        while not swapped and not finished.is_set():
            time.sleep(0.1)
        if not finished.wait(30):
            _thread.interrupt_main()

    finished = threading.Event()
    for target in (new_holder, watchdog):
        threading.Thread(target=target, daemon=True).start()
    try:
        with pytest.raises(StageFailed, match="lost its store lock"):
            pipeline.run(resolved, overrides)
    except KeyboardInterrupt:
        pytest.fail("the stage went on training for 30 s after it lost its store lock")
    finally:
        finished.set()
    assert swapped and time.monotonic() - swapped[0] < 30
    entry = next((tmp_path / "store").glob("sft-*"))
    assert sorted(p.name for p in (entry / "final").iterdir()) == ["theirs.txt"], "final/ was replaced"
    assert not (entry / "COMPLETE").exists() and not (tmp_path / "run" / "sft" / "final").exists()
    assert json.loads((entry / ".lock").read_text())["token"] == "new-holder"
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["status"] == "failed" and m["stages"][0]["status"] == "failed"


def test_a_lost_lock_kills_the_launchers_process_group(tmp_path):
    """torchrun / accelerate stages: the orchestrator's heartbeat thread kills the launcher's group at once."""
    from alignctl import launch, pipeline

    stop = pipeline._StopWhenLost({"kind": "torchrun"})
    lock = fsutil.FileLock(tmp_path / ".lock", "entry", heartbeat=0.05, on_lost=stop).acquire()
    rc: list[int] = []
    launcher = threading.Thread(target=lambda: rc.append(launch._stream(
        [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), tmp_path / "output.log")))
    with stop.armed(lock):
        launcher.start()
        while not launch._LIVE:
            time.sleep(0.02)
        time.sleep(0.3)
        (tmp_path / ".lock").unlink()  # taken over
        launcher.join(10)
    assert rc == [-9] and lock.lost
    lock.release()


# -- N5: gc and rm work under the entry lock ------------------------------------------------------------------------
def test_store_gc_and_rm_skip_an_entry_a_run_takes_after_they_looked(tmp_path, capsys, monkeypatch):
    root = tmp_path / "store"
    e = complete_entry(root)
    (e.dir / "checkpoints").mkdir()  # a completed entry's leftover, cleaned only under the lock
    monkeypatch.setattr(store, "holder", lambda entry: None)  # gc/rm looked: free; the run takes it right after
    with e.lock(timeout=0):
        rc, out = run_store(capsys, "gc", "--store", str(root), "--older-than", "0")
        assert f"skip {e.dir.name}: locked by" in out and e.complete(), out
        rc, out = run_store(capsys, "gc", "--store", str(root))
        assert (e.dir / "checkpoints").is_dir(), out
        rc, out = run_store(capsys, "rm", "--store", str(root), e.dir.name)
        assert rc == 1 and e.complete(), out
    rc, out = run_store(capsys, "gc", "--store", str(root), "--older-than", "0")
    assert f"removed {e.dir.name}" in out and not e.dir.exists() and not list(root.iterdir()), out


def test_a_run_waiting_for_an_entry_that_gc_removes_gets_a_fresh_one(tmp_path, capsys):
    root = tmp_path / "store"
    e = complete_entry(root)
    gc_lock = e.lock(timeout=0).acquire()  # gc holds the entry while it moves it to the trash
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(e.lock(timeout=10).acquire()))
    waiter.start()
    time.sleep(0.5)
    gc_lock.stop_heartbeat()
    e.dir.rename(root / f".trash-{e.dir.name}-test")
    gc_lock.release()
    waiter.join()
    assert got and got[0].owned() and not e.complete()  # a fresh, empty entry: the run trains it
    got[0].release()
    rc, out = run_store(capsys, "ls", "--store", str(root))
    assert ".trash-" not in out
    rc, out = run_store(capsys, "gc", "--store", str(root))
    assert "left by an interrupted gc/rm" in out and not list(root.glob(".trash-*"))


# -- N13: the lock settings ---------------------------------------------------------------------------------------
BAD_SETTINGS = [({"ALIGNCTL_LOCK_STALE": "ten minutes"}, "ALIGNCTL_LOCK_STALE"),
                ({"ALIGNCTL_LOCK_STALE": "-1"}, "ALIGNCTL_LOCK_STALE"),
                ({"ALIGNCTL_LOCK_STALE": "0"}, "ALIGNCTL_LOCK_STALE"),
                ({"ALIGNCTL_LOCK_STALE": "nan"}, "ALIGNCTL_LOCK_STALE"),
                ({"ALIGNCTL_LOCK_HEARTBEAT": "300"}, "ALIGNCTL_LOCK_HEARTBEAT"),
                ({"ALIGNCTL_LOCK_STALE": "2", "ALIGNCTL_LOCK_HEARTBEAT": "1"}, "ALIGNCTL_LOCK_HEARTBEAT"),
                ({"ALIGNCTL_LOCK_HEARTBEAT": "0"}, "ALIGNCTL_LOCK_HEARTBEAT"),
                ({"ALIGNCTL_LOCK_TIMEOUT": "-5"}, "ALIGNCTL_LOCK_TIMEOUT"),
                ({"ALIGNCTL_LOCK_TIMEOUT": "soon"}, "ALIGNCTL_LOCK_TIMEOUT")]


@pytest.mark.parametrize("env,name", BAD_SETTINGS, ids=[" ".join(f"{k[14:]}={v}" for k, v in e.items())
                                                        for e, _ in BAD_SETTINGS])
def test_bad_lock_settings_are_one_line_naming_the_variable(tmp_path, capsys, monkeypatch, env, name):
    from alignctl.cli import main

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "store").mkdir()
    for args in (["plan", f"output_root={tmp_path}"], ["store", "ls", "--store", str(tmp_path / "store")]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        problems = [line for line in err.splitlines() if name in line]
        assert len(problems) == 1 and "Traceback" not in err and "ValueError" not in err, err


@pytest.mark.parametrize("value", ["never", "inf", "0", "2.5"])
def test_good_lock_timeouts_are_accepted(monkeypatch, value):
    monkeypatch.setenv("ALIGNCTL_LOCK_TIMEOUT", value)
    assert fsutil.lock_problems() == []
    assert fsutil.lock_settings()["timeout"] == (None if value in ("never", "inf") else float(value))


def test_a_lock_timeout_while_waiting_for_a_stage_is_one_line(tmp_path, monkeypatch):
    from alignctl import pipeline
    from alignctl.errors import StageFailed

    monkeypatch.setenv("ALIGNCTL_LOCK_TIMEOUT", "0.3")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stage = stage_spec("sft", run_dir=run_dir)
    manifest = pipeline.Manifest(run_spec(run_dir, tmp_path / "store", stage), [])
    entry = store.Entry(tmp_path / "store", "sft", "ab" * 32)
    with entry.lock(timeout=0):  # another run trains it
        with pytest.raises(StageFailed, match=r"waiting for its store entry.*locked by .* gave up after") as e:
            pipeline._run_one(stage, entry, manifest)
    assert "\n" not in e.value.report() and manifest.stage("sft")["status"] == "failed"
