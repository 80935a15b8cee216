"""What checking a store entry costs when a stage is reused, on a 1 GB model folder.

Builds a store entry whose final/ holds ``--size-gb`` of weights (two safetensors-sized shards of random bytes plus
a config), seals it as a completed stage does (fsync, read-only, sizes and SHA-256 in COMPLETE), then reuses it
``--repeats`` times through the pipeline's own reuse path (``alignctl.pipeline._run_one``: entry lock, the cheap
check, placing final/ into a fresh run folder, manifest updates) and times the cheap check alone side by side:

    python benchmarks/store_verify.py [--size-gb 1] [--repeats 7]

Prints, for the placement this user gets by default (reflinks where the file system has them, else hard links, root
included) and for copies (``ALIGNCTL_STORE_LINKS=copy``, what root got before), the median times and the ratio
check / (reuse without the check) (the target <= 0.02 was set against a reuse that copies final/; a reuse by hard
links takes a few milliseconds, of which the check is under one), and the bytes a run folder adds beside the entry's
(files not sharing the entry's inodes), target <= 1 % by default.
Also prints what sealing the entry (full SHA-256 at completion) and ``alignctl store verify`` (full re-hash) cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dir", default=None, help="where to build the store (default: a temporary folder)")
    args = ap.parse_args()

    from alignctl import pipeline, placement, store
    from alignctl.cli import store as store_cli
    from alignctl.config.types import LinkSpec, ModelSpec, RunSpec, StageSpec

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        fp = "ab" * 32
        entry = store.Entry(tmp / "store", "sft", fp)
        entry.final.mkdir(parents=True)
        shard = int(args.size_gb * 2**30 / 2)
        for i in (1, 2):  # random bytes: no file-system compression or dedup flatters the numbers
            with open(entry.final / f"model-0000{i}-of-00002.safetensors", "wb") as f:
                for _ in range(shard // 2**24):
                    f.write(os.urandom(2**24))
        (entry.final / "config.json").write_text('{"model_type": "llama"}')
        t0 = time.perf_counter()
        entry.mark_complete({"train": {"train_loss": 1.0}}, extra={"stage": "sft"})
        seal = time.perf_counter() - t0
        entry_bytes = sum(f.stat().st_size for f in entry.dir.rglob("*") if f.is_file())

        results = {}
        for mode in ("auto", "copy"):  # this user's default placement, then copies (what root got before)
            os.environ[placement.PLACEMENT_ENV] = mode
            reuse, check = [], []
            for k in range(args.repeats):
                run_dir = tmp / f"run-{mode}{k}"
                run_dir.mkdir()
                s = StageSpec(name="sft", kind="sft", links={"from": LinkSpec("from", "tiny:llama")}, data=None,
                              args={}, run_dir=str(run_dir), stage_dir=str(run_dir / "sft"))
                manifest = pipeline.Manifest(RunSpec(recipe="bench", stages=(s,), model=ModelSpec("tiny:llama"),
                                                     launcher={"kind": "local"}, run_dir=str(run_dir),
                                                     store_dir=str(tmp / "store")), [])
                t0 = time.perf_counter()
                pipeline._run_one(s, entry, manifest)
                reuse.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                problems = entry.verify()
                check.append(time.perf_counter() - t0)
                assert not problems and manifest.stage("sft")["reused_from"], problems
                placed = manifest.stage("sft")["final_placed_by"]
                shared = {f.stat().st_ino for f in entry.final.iterdir()}
                added = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file() and not f.is_symlink()
                            and f.stat().st_ino not in shared)  # a reflink has its own inode but shares blocks
                if "reflink" in placed:
                    added -= sum(f.stat().st_size for f in (run_dir / "sft" / "final").iterdir())
                for f in (run_dir / "sft" / "final").iterdir():  # keep the disk use of the copy case bounded
                    f.unlink()
            results[mode] = (placed, statistics.median(reuse), statistics.median(check), added)
        t0 = time.perf_counter()
        assert store_cli.run(["verify", "--store", str(tmp / "store")]) == 0
        full = time.perf_counter() - t0

    print(f"final/ of {args.size_gb:g} GB, medians of {args.repeats} reuses each, uid {os.geteuid()}")
    for mode, (placed, r, c, added) in results.items():
        print(f"{mode:<4} final/ placed by {'+'.join(placed):<7}: reused stage (lock, check, place final/, manifest) "
              f"{r * 1000:7.1f} ms; the cheap check alone {c * 1000:5.2f} ms; "
              f"ratio check / (reuse without the check) {c / (r - c):.4f}; the run folder adds "
              f"{added / 1024:,.0f} KiB = {added / entry_bytes:.4%} of the entry (target <= 1 % by default)")
    print(f"sealing the entry at completion (fsync + full SHA-256): {seal:6.2f} s")
    print(f"alignctl store verify (full SHA-256 of every file):      {full:6.2f} s")


if __name__ == "__main__":
    main()
