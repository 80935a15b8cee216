"""What identifying local data and a local model folder by content costs at a run's start, first run vs re-run.

Writes a ``--size-gb`` JSON Lines data file and a model folder of the same size (two safetensors-sized shards of
random bytes plus a config), then fingerprints both the way ``alignctl run`` does before anything trains
(``fingerprint.data_check`` and ``fingerprint.model_check`` with the digest cache in ``<output_root>/.cache``):

* first run: nothing cached, every byte is read and hashed (SHA-256);
* re-run: the files are unchanged, so each digest comes from the cache by the file's full stat signature;
* replaced: the data file rewritten with other bytes of the same size and its mtime restored (what tar, ``cp -p`` or
  ``rsync -a`` leave): the cache misses (inode or ctime moved) and the new content is hashed.

    python benchmarks/digest_cache.py [--size-gb 1] [--repeats 5] [--dir /fast/disk]

Prints median seconds and the ratio first run / re-run. The page cache is warm after writing the files, so the
first-run figure is the hashing cost, not the disk's read speed (which only makes a cold first run slower).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def _write(path: Path, size: int, rows: bool) -> None:
    """``size`` bytes of random content (no file-system compression or dedup flatters the numbers); ``rows``: as
    JSON Lines of ~1 KB rows of hex text."""
    with open(path, "wb") as f:
        written = 0
        while written < size:
            block = os.urandom(2**23)
            if rows:
                text = block.hex()
                block = "".join(f'{{"text": "{text[i:i + 1000]}"}}\n' for i in range(0, len(text), 1000)).encode()
            block = block[: size - written]
            f.write(block)
            written += len(block)


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write the files (default: a temporary folder)")
    args = ap.parse_args()

    from alignctl import fingerprint
    from alignctl.config import data_checks

    size = int(args.size_gb * 2**30)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        data = tmp / "train.jsonl"
        _write(data, size, rows=True)
        model = tmp / "model"
        model.mkdir()
        for i in (1, 2):
            _write(model / f"model-0000{i}-of-00002.safetensors", size // 2, rows=False)
        (model / "config.json").write_text('{"model_type": "llama"}')
        normalized, problems = data_checks.normalize({"path": str(data)}, "data.bench")
        assert not problems, problems
        spec = data_checks.to_spec({"label": "data.bench", **normalized})
        cache = tmp / "out" / ".cache"

        t0 = time.perf_counter()
        first_data = fingerprint.data_check(spec, cache)
        first_data_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        fingerprint.model_check(str(model), cache)
        first_model_s = time.perf_counter() - t0
        rerun_data_s = _time(lambda: fingerprint.data_check(spec, cache), args.repeats)
        rerun_model_s = _time(lambda: fingerprint.model_check(str(model), cache), args.repeats)

        st = data.stat()
        with open(data, "r+b") as f:  # other bytes, same size, mtime restored
            f.write(b'{"text": "replaced"}\n')
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
        t0 = time.perf_counter()
        replaced = fingerprint.data_check(spec, cache)
        replaced_s = time.perf_counter() - t0
        assert replaced.content != first_data.content, "a replaced file must get a new digest"

    gb = size / 2**30
    print(f"data file {gb:.2f} GB: first run {first_data_s:.2f} s, re-run {rerun_data_s * 1000:.2f} ms "
          f"(ratio {first_data_s / rerun_data_s:.0f}x), replaced with the same size and mtime {replaced_s:.2f} s "
          "(hashed again)")
    print(f"model folder {gb:.2f} GB (3 files): first run {first_model_s:.2f} s, re-run {rerun_model_s * 1000:.2f} ms "
          f"(ratio {first_model_s / rerun_model_s:.0f}x)")


if __name__ == "__main__":
    main()
