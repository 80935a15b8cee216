"""Shared fixtures: run recipes in-process (compose -> resolve -> pipeline.run) or through the real CLI."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def one_thread_collecting_log(lines: list[str]):
    """One torch thread (a ~70k-parameter model gains nothing from two, and with other processes on the same cores
    OpenMP's spinning makes each op ~10x slower), and the messages of the alignctl log appended to ``lines``."""
    import torch

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logger = logging.getLogger("alignctl")
    level, handler = logger.level, Collect()
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def user_key(tmp_path_factory):
    """One key for the whole test session (alignctl.trust), never ~/.config's; spawned CLIs inherit it."""
    path = tmp_path_factory.mktemp("alignctl-key") / "key"
    before = os.environ.get("ALIGNCTL_KEY_FILE")
    os.environ["ALIGNCTL_KEY_FILE"] = str(path)
    yield path
    if before is None:
        os.environ.pop("ALIGNCTL_KEY_FILE", None)
    else:
        os.environ["ALIGNCTL_KEY_FILE"] = before


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    """One output root per test session, so the built-in tiny models are built once."""
    return tmp_path_factory.mktemp("alignctl-outputs")


@pytest.fixture
def run_recipe(cache_root):
    """Run a recipe in-process with overrides; returns the manifest dict."""

    def _run(overrides: list[str], run_dir: Path) -> dict:
        from alignctl import pipeline
        from alignctl.config.compose import compose
        from alignctl.config.resolve import resolve

        # 8 held-out prompts for the evaluation of every stage (default 32): tests that assert evaluation results
        # (test_evaluation.py, test_generate.py) run their own recipes; an override given here still wins.
        overrides = [f"output_root={cache_root}", f"store={Path(run_dir).parent / 'store'}", "eval.max_prompts=8",
                     *overrides]
        resolved = resolve(compose(overrides), run_dir)
        return pipeline.run(resolved, overrides)

    return _run


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real `alignctl` CLI in a fresh process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "alignctl.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def read_manifest(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "manifest.json").read_text())


def read_spec(path: Path):
    """A stage's spec.json as its ranks read it (alignctl.config.types.StageSpec)."""
    from alignctl.config.types import StageSpec

    return StageSpec.from_json(Path(path).read_text())


def stage_spec(name: str = "sft", kind: str = "sft", source: str | None = None, run_dir: Path | str = "run",
               **fields):
    """A small typed stage spec for tests of the store and the pipeline: no data, no TRL fields; ``source``: the
    earlier stage it starts from (else the built-in tiny model)."""
    from alignctl.config.types import LinkSpec, StageSpec

    run_dir = Path(run_dir)
    path = str(run_dir / source / "final") if source else "tiny:llama"
    links = {"from": LinkSpec("from", path, stage=source), **fields.pop("links", {})}
    return StageSpec(name=name, kind=kind, links=links, data=None, args={}, run_dir=str(run_dir),
                     stage_dir=str(run_dir / name), **fields)


def run_spec(run_dir: Path, store_dir: Path, *stages):
    """A typed run spec of these stage specs (see :func:`stage_spec`)."""
    from alignctl.config.types import ModelSpec, RunSpec

    return RunSpec(recipe="r", stages=tuple(stages), model=ModelSpec("tiny:llama"), launcher={"kind": "local"},
                   run_dir=str(run_dir), store_dir=str(store_dir))
