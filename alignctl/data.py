"""The one place that loads data (the spec's keys and the cheap plan-time checks are alignctl.config.data_checks).

A data set spec (``configs/data/*.yaml``) names a Hub id (with ``name``/``split``)
or local JSON/JSONL/Parquet/CSV files (a file, or a folder of ``<split>.<ext>``
files), an optional column mapping, its layout (``format``: public data sets such as
Anthropic/hh-rlhf, ShareGPT, Alpaca, Orca or PKU-SafeRLHF are recognised and converted
to TRL's formats by :mod:`alignctl.formats`), what to do with system turns
(``system_turns``), and its held-out split: a named one (``eval_split``) or one carved
out of the training split (``eval_size``, ``seed``).

``check`` is cheap (reads a file's first record, no torch, never a whole file) and runs
at plan time; ``load`` returns ``(train, eval)`` datasets in TRL's formats and repeats the
checks on the real data, before any model is loaded. Every problem a user can cause is a
:class:`ConfigError` naming the key, file or column. Local files are read through a datasets
cache keyed by their content digest and full stat signatures, never by path and mtime alone, and by the code that
prepares them (:func:`_code_key`); the rows converted to TRL's format are cached there under a fingerprint of their
input, the conversion's settings and that code, so a re-run or a sweep point converts (and TRL tokenizes) nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from pathlib import Path

from alignctl import formats
from alignctl.config.data_checks import EXTENSIONS, Unreadable, as_messages, check_columns, split_files
from alignctl.config.types import DataSpec
from alignctl.errors import ConfigError, suggest

log = logging.getLogger("alignctl")

_NOTED: set[tuple[str, str]] = set()  # (data label, note) already said in the log


# -- loading -------------------------------------------------------------------------------------------------------
def _apply_columns(ds, columns: dict):
    for target, source in (columns or {}).items():
        if isinstance(source, list):
            def join(ex, target=target, sources=source):
                return {target: "\n\n".join(str(ex[s]) for s in sources if ex[s] not in (None, ""))}
            ds = ds.map(join, remove_columns=[s for s in source if s != target])
        elif source != target:
            if target in ds.column_names:
                ds = ds.remove_columns(target)
            ds = ds.rename_column(source, target)
    return ds


def _first_bad_line(file: str) -> str:
    """Where a JSON / JSON Lines file stops being valid (only called after datasets failed to read it)."""
    try:
        if Path(file).suffix == ".json":
            with open(file, encoding="utf-8") as f:
                head = f.read(64).lstrip("\ufeff \t\r\n")
            if head.startswith("["):  # one JSON array: where it breaks
                try:
                    json.loads(Path(file).read_text(encoding="utf-8"))
                except json.JSONDecodeError as e:
                    return f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); is the file cut off?"
                except UnicodeDecodeError as e:
                    return f"not UTF-8 text (byte offset {e.start}); save the file as UTF-8"
                return ""
        with open(file, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    return f"line {number} is not UTF-8 text; save the file as UTF-8"
                if line.strip():
                    try:
                        if not isinstance(json.loads(line), dict):
                            return f"line {number} is not a JSON object"
                    except json.JSONDecodeError as e:
                        return f"line {number} is not valid JSON ({e.msg}); fix or remove it"
    except OSError as e:
        return e.strerror or str(e)
    return ""


def _read_error(label: str, files: list[str], error: Exception) -> ConfigError:
    """A one-line message for a local file datasets could not read."""
    for file in files:
        where = _first_bad_line(file) if Path(file).suffix in (".jsonl", ".json") else ""
        if where:
            return ConfigError([f"{label}: cannot read {file}: {where}"])
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if isinstance(cause, UnicodeDecodeError):
        text = "not UTF-8 text; save it as UTF-8"
    return ConfigError([f"{label}: cannot read {', '.join(files)}: {text[:300]}"])


def _local_cache(spec: DataSpec, stage: str) -> tuple[str, list]:
    """Where the datasets library caches a local data set, and its files' stat signatures now. The library keys a
    local file by path and mtime only, so a file replaced with the same mtime (tar, cp -p, rsync -a, touch -r) would
    be read from the old cache; this folder is keyed by the content digest the run fingerprinted and by the files'
    full signatures (inode and ctime cannot be set back), so only the very files that were hashed can hit it."""
    import hashlib

    from alignctl import digests

    files = digests.data_files(spec.path, spec.local)
    now = digests.signatures(files)
    recorded = spec.check.to_dict() if spec.check is not None else None
    if recorded and now != recorded["files"] and not digests.files_unchanged(recorded, files, spec.cache_dir):
        raise digests.data_changed(stage, spec.label or spec.path)
    key = hashlib.sha256(json.dumps([(recorded or {}).get("content"), now, _code_key()]).encode()).hexdigest()[:20]
    if spec.cache_dir:
        root = Path(spec.cache_dir) / "datasets"
    else:  # a load outside a run's stages (e.g. evaluation prompts): keyed by the signatures and the code
        import datasets

        root = Path(datasets.config.HF_DATASETS_CACHE) / "alignctl"
    return str(root / key), now


def _fingerprint(ds, *what) -> str:
    """The datasets fingerprint of a transform of ``ds`` done by alignctl's code: the input's, what the transform is,
    and :func:`_code_key` (so a changed alignctl or TRL is never served an old transform's rows from the cache)."""
    import hashlib

    return hashlib.sha256(json.dumps([ds._fingerprint, what, _code_key()], default=str).encode()).hexdigest()[:16]


@functools.cache
def _code_key() -> list:
    """What else decides the rows cached under a data set's folder: alignctl's source (the conversions,
    formats.convert among them) and the libraries whose functions prepare them (TRL's tokenization). The datasets
    library hashes a mapped function by its name, not its body, so without this a changed conversion would be served
    from the cache of the old one."""
    from importlib import metadata

    from alignctl import digests

    versions = []
    for pkg in ("datasets", "transformers", "trl"):
        try:
            versions.append(metadata.version(pkg))
        except metadata.PackageNotFoundError:
            versions.append(None)
    return [digests.tree_hash(Path(__file__).resolve().parent), *versions]


def _check_read(spec: DataSpec, stage: str, cache: str, before: list) -> None:
    """The files must not have changed while they were read (the rows would be a mix, or not the hashed bytes)."""
    import shutil

    from alignctl import digests

    if digests.signatures(digests.data_files(spec.path, spec.local)) != before:
        shutil.rmtree(cache, ignore_errors=True)
        raise digests.data_changed(stage, spec.label or spec.path, "while alignctl read it")


def _raw_split(spec: DataSpec, split: str, label: str, key: str, cache_dir: str | None = None):
    import datasets
    from datasets.exceptions import DatasetGenerationError

    if spec.local:
        try:
            files = split_files(spec.path)
        except Unreadable as e:
            raise ConfigError([f"{label}.path: {e}"]) from None
        if split not in files:
            raise ConfigError([f"{label}.{key}: no split '{split}' in {spec.path}{suggest(split, files)} "
                               f"(found {', '.join(files) or 'no data files'})"])
        for file in files[split]:
            if Path(file).stat().st_size == 0:
                raise ConfigError([f"{label}: {file}: empty file"])
        builder = EXTENSIONS[Path(files[split][0]).suffix]
        quiet = logging.getLogger("datasets")  # its JSON reader logs an ERROR line before raising: we say it better
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            return datasets.load_dataset(builder, data_files=files[split], split="train", cache_dir=cache_dir)
        except (DatasetGenerationError, ValueError, OSError, TypeError) as e:
            raise _read_error(label, files[split], e) from None
        finally:
            quiet.setLevel(level)
    hub = spec.path + (f" (config {spec.name})" if spec.name else "")
    try:
        return datasets.load_dataset(spec.path, spec.name, split=split, revision=spec.revision)
    except ConnectionError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or "Offline" in str(e)
        why = "is not in the local cache and HF_HUB_OFFLINE is set" if offline else "cannot be reached on the Hub"
        raise ConfigError([f"{label}.path: data set {hub} {why}; download it once with network access (or point "
                           f"{label}.path at local files)"]) from None
    except ValueError as e:
        if "split" in str(e).lower():
            raise ConfigError([f"{label}.{key}: no split '{split}' in {hub}: {str(e).splitlines()[0][:200]}"]) from None
        raise ConfigError([f"{label}: cannot load {hub}: {str(e).splitlines()[0][:200]}"]) from None
    except (FileNotFoundError, DatasetGenerationError) as e:
        raise ConfigError([f"{label}.path: cannot load data set {hub}: {str(e).splitlines()[0][:200]}"]) from None


def _carve(train, spec: DataSpec, label: str):
    """(train, held-out) carved out of the training split per eval_size/seed, or a ConfigError saying what to set."""
    size, n = spec.eval_size, len(train)
    held = int(size) if size >= 1 else math.ceil(size * n)
    if n < 2:
        raise ConfigError([f"{label}.eval_size: {size!r} of {n} rows in split '{spec.split}': {held} held-out rows "
                           f"leave no training rows; add rows, name a held-out split ({label}.eval_split) or set "
                           f"{label}.eval_size=0 (no held-out set)"])
    if held >= n:
        raise ConfigError([f"{label}.eval_size: {size!r} of {n} rows in split '{spec.split}': {held} held-out rows "
                           f"leave no training rows; set {label}.eval_size to a count below {n} or a fraction in "
                           f"(0, 1) (0 = no held-out set)"])
    parts = train.train_test_split(test_size=held, seed=spec.seed)
    return parts["train"], parts["test"]


def _note_once(label: str, note: str) -> None:
    if (label, note) not in _NOTED:
        _NOTED.add((label, note))
        log.info("%s: %s", label, note)


ROWS_PER_PROC = 20_000  # below this many rows per process, starting a process costs more than it saves


def tokenize_procs(rows: int) -> int:
    """Processes for preparing ``rows`` rows (alignctl's conversion; TRL's tokenization, ``dataset_num_proc``, when
    the stage leaves it unset): the cores this process may use, one per :data:`ROWS_PER_PROC` rows (a small data set
    stays in this process)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, rows // ROWS_PER_PROC))


NOTE = "__alignctl_note"  # the conversion's note of each row (formats.convert), a column until it is read


def _map_batch(batch: dict, indices: list[int], layout: str, data_kind: str, system: str, where: str) -> dict:
    """A batch of rows to TRL's format (formats.convert), each row's note in the :data:`NOTE` column: in the rows,
    the notes reach this process from the datasets worker processes and come back with rows served from the cache."""
    outs, notes = [], []
    for j, index in enumerate(indices):
        try:
            out, note = formats.convert({k: v[j] for k, v in batch.items()}, layout, data_kind, system)
        except formats.FormatError as e:
            raise ConfigError([f"{where}, row {index}): {e}"]) from None
        outs.append(out)
        notes.append(note or "")
    columns = list(outs[0]) if outs else []
    if any(set(o) != set(columns) for o in outs):
        raise TypeError(f"rows converted to different columns: {sorted(set().union(*outs))}")
    return {**{c: [o[c] for o in outs] for c in columns}, NOTE: notes}


def _convert(ds, spec: DataSpec, data_kind: str, label: str, stage: str, split: str):
    """Every record to the TRL format of ``data_kind`` (formats.convert), extra columns dropped."""
    if spec.to_messages:
        ds = ds.map(as_messages, remove_columns=[c for c in ("prompt", "completion") if c in ds.column_names],
                    new_fingerprint=_fingerprint(ds, "as_messages"))
    layout, system = spec.format, spec.system_turns
    if data_kind == "sft" and "label" in ds.column_names and ds.features["label"].dtype == "bool":
        ds = ds.filter(lambda ex: ex["label"])  # unpaired KTO data: SFT on the desirable completions only
        _note_once(label, f"{stage} trains on the desirable rows only (label true)")
        if len(ds) == 0:
            raise ConfigError([f"{label} (split {split}): no row has label true, nothing to train {stage} on"])
    try:
        first, _ = formats.convert(ds[0], layout, data_kind, system)
    except formats.FormatError as e:
        raise ConfigError([f"{label} (split {split}, row 0): {e}"]) from None
    problems = check_columns(first, data_kind, label, stage, f"split {split}")
    if problems:
        raise ConfigError(problems)
    try:  # served from the datasets cache when these very rows were converted before by this code
        settings = dict(layout=layout, data_kind=data_kind, system=system, where=f"{label} (split {split}")
        procs = tokenize_procs(len(ds))  # this machine's cores for a large data set (as TRL's tokenization)
        ds = ds.map(_map_batch, with_indices=True, batched=True, remove_columns=ds.column_names, fn_kwargs=settings,
                    num_proc=procs if procs > 1 else None, new_fingerprint=_fingerprint(ds, "convert", settings))
    except ConfigError:
        raise
    except Exception as e:  # pyarrow: rows whose converted columns disagree in type
        import pyarrow as pa

        read = spec.split if split == "held-out" else split
        if isinstance(e, UnicodeDecodeError) and spec.local:  # a bad byte datasets only met while reading rows
            raise _read_error(label, split_files(spec.path).get(read, []), e) from None
        if not isinstance(e, (pa.ArrowException, TypeError, ValueError)):
            raise
        files = ", ".join(split_files(spec.path).get(read, [])) if spec.local else spec.path
        raise ConfigError([f"{label} (split {split}, {files}): rows differ in layout or column types "
                           f"({str(e)[:160]}); name the layout with {label}.format or fix the rows"]) from None
    for note in sorted(n for n in ds.unique(NOTE) if n):
        _note_once(label, f"{stage} {note}")
    return ds.remove_columns(NOTE)


def load(spec: DataSpec, data_kind: str, stage: str):
    """Return ``(train, eval_or_None)`` in TRL's formats; raises ConfigError on any data problem. A local data set
    is read through a cache keyed by its content (:func:`_local_cache`); when the spec carries the run's
    ``check``, files that differ from it raise :class:`alignctl.errors.DataChanged`, as do files that change
    while they are read."""
    label = spec.label or spec.path
    cache, before = _local_cache(spec, stage) if spec.local else (None, None)
    train = _raw_split(spec, spec.split, label, "split", cache)
    try:
        train = _apply_columns(train, spec.columns)
    except ValueError as e:
        raise ConfigError([f"{label}.columns: {e}"]) from None
    evalset = None
    if spec.eval_split:
        evalset = _apply_columns(_raw_split(spec, spec.eval_split, label, "eval_split", cache), spec.columns)
    elif spec.eval_size:
        if len(train) == 0:
            raise ConfigError([f"{label} (split {spec.split}): no rows"])
        train, evalset = _carve(train, spec, label)
    if cache is not None:
        _check_read(spec, stage, cache, before)
    out = []
    for ds, split in ((train, spec.split), (evalset, spec.eval_split or "held-out")):
        if ds is None:
            out.append(None)
            continue
        if len(ds) == 0:
            raise ConfigError([f"{label} (split {split}): no rows"])
        ds = _convert(ds, spec, data_kind, label, stage, split)
        problems = check_columns(ds[0], data_kind, label, stage, f"split {split}")
        if data_kind == "unpaired" and "label" in ds.column_names and ds.features["label"].dtype != "bool":
            problems.append(f"{label} (split {split}): column 'label' must be boolean for {stage}, "
                            f"has type {ds.features['label'].dtype}")
        if problems:
            raise ConfigError(problems)
        if data_kind in ("preference", "unpaired") and "prompt" not in ds.column_names:
            from trl.data_utils import maybe_extract_prompt

            ds = ds.map(maybe_extract_prompt)
        if data_kind == "prompt" and "prompt" not in ds.column_names:
            ds = ds.rename_column("messages", "prompt")  # prompt-only conversations: TRL's on-policy trainers read it
        out.append(ds)
    return out[0], out[1]
