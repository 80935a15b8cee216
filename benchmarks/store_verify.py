"""What checking a store entry costs when a stage is reused, on a 1 GB model folder.

Builds a store entry whose final/ holds ``--size-gb`` of weights (two safetensors-sized shards of random bytes plus
a config), seals it as a completed stage does (fsync, read-only, sizes and SHA-256 in COMPLETE), then reuses it
``--repeats`` times through the pipeline's own reuse path (``alignctl.pipeline._run_one``: entry lock, the cheap
check, placing final/ into a fresh run folder, manifest updates) and times the cheap check alone side by side:

    python benchmarks/store_verify.py [--size-gb 1] [--repeats 7]

Prints, for the placement this user gets by default (root: a copy, since read-only hard links do not stop root from
writing through them; other users: hard links; reflinks where the file system has them) and for hard links
(``ALIGNCTL_STORE_LINKS=link``, what non-root users get), the median times and the ratio
check / (reuse without the check); target <= 0.02.
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

        results = {}
        for mode in ("auto", "link"):  # this user's default placement, then hard links (what non-root users get)
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
                for f in (run_dir / "sft" / "final").iterdir():  # keep the disk use of the copy case bounded
                    f.unlink()
            results[mode] = (placed, statistics.median(reuse), statistics.median(check))
        t0 = time.perf_counter()
        assert store_cli.run(["verify", "--store", str(tmp / "store")]) == 0
        full = time.perf_counter() - t0

    print(f"final/ of {args.size_gb:g} GB, medians of {args.repeats} reuses each, uid {os.geteuid()}")
    for placed, r, c in results.values():
        print(f"final/ placed by {'+'.join(placed):<5}: reused stage (lock, check, place final/, manifest) "
              f"{r * 1000:7.1f} ms; the cheap check alone {c * 1000:5.2f} ms; "
              f"ratio check / (reuse without the check) {c / (r - c):.4f} (target <= 0.02)")
    print(f"sealing the entry at completion (fsync + full SHA-256): {seal:6.2f} s")
    print(f"alignctl store verify (full SHA-256 of every file):      {full:6.2f} s")


if __name__ == "__main__":
    main()
