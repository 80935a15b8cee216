"""The one place that loads and checks data.

A data set spec (``configs/data/*.yaml``) names a Hub id (with ``name``/``split``)
or local JSON/JSONL/Parquet/CSV files (a file, or a folder of ``<split>.<ext>``
files), an optional column mapping, and its held-out split: a named one
(``eval_split``) or one carved out of the training split (``eval_size``, ``seed``).

``check`` is cheap (reads a file header or first record, no torch) and runs at plan
time; ``load`` returns ``(train, eval)`` datasets in TRL's formats and repeats the
column checks on the real data, before any model is loaded.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from alignctl.errors import ConfigError, suggest

BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).parent / "assets" / "data"
EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
DATA_KEYS = {
    "path": "Hub id, local file or folder, or builtin:<file>",
    "name": "Hub config name",
    "split": "training split",
    "eval_split": "named held-out split (null: carve one out with eval_size)",
    "eval_size": "held-out size carved from the training split: a fraction < 1 or a count; 0 = none",
    "seed": "seed of the held-out carve-out",
    "columns": "mapping target column -> source column (or list of sources joined by a blank line)",
    "to_messages": "turn string prompt/completion into user/assistant messages",
    "revision": "Hub revision",
}
# What each data kind must hold: any one of the alternatives.
REQUIRED = {
    "sft": [("messages",), ("text",), ("prompt", "completion")],
    "preference": [("prompt", "chosen", "rejected"), ("chosen", "rejected")],
    "prompt": [("prompt",), ("messages",)],
    "unpaired": [("prompt", "completion", "label"), ("prompt", "chosen", "rejected"), ("chosen", "rejected")],
}
HELP = {
    "sft": "messages, text, or prompt+completion",
    "preference": "prompt+chosen+rejected, or chosen+rejected with the prompt inside them",
    "prompt": "prompt (and no completions)",
    "unpaired": "prompt+completion+label (boolean), or preference pairs to unpair",
}
COMPLETION_COLUMNS = ("completion", "chosen", "rejected", "response")


def looks_local(path: str) -> bool:
    p = str(path)
    return (p.startswith(("/", "./", "../", "~", BUILTIN_PREFIX)) or Path(p).suffix in EXTENSIONS
            or Path(p).expanduser().exists())


def local_path(path: str) -> Path:
    if path.startswith(BUILTIN_PREFIX):
        return BUILTIN_DIR / path[len(BUILTIN_PREFIX):]
    return Path(path).expanduser().absolute()


def normalize(spec: dict, label: str) -> tuple[dict, list[str]]:
    problems = [f"{label}: unknown key '{k}'" + suggest(k, DATA_KEYS) for k in spec if k not in DATA_KEYS]
    if not spec.get("path"):
        problems.append(f"{label}.path: not set")
        return spec, problems
    out = {"name": None, "split": "train", "eval_split": None, "eval_size": 0.1, "seed": 42,
           "columns": {}, "to_messages": False, "revision": None, **spec}
    out["local"] = looks_local(str(out["path"]))
    if out["local"]:
        out["path"] = str(local_path(str(out["path"])))
    size = out["eval_size"]
    if not isinstance(size, (int, float)) or isinstance(size, bool) or size < 0:
        problems.append(f"{label}.eval_size: must be a fraction in [0, 1) or a count, got {size!r}")
    return out, problems


def _files(spec: dict) -> dict[str, list[str]]:
    """Split name -> files, for a local spec."""
    p = Path(spec["path"])
    if p.is_file():
        return {"train": [str(p)]}
    splits: dict[str, list[str]] = {}
    for f in sorted(p.iterdir()):
        if f.suffix in EXTENSIONS:
            splits.setdefault(f.stem, []).append(str(f))
    return splits


def _peek(file: str) -> dict[str, Any]:
    """First record of a local file (columns and value types), cheaply."""
    suffix = Path(file).suffix
    if suffix == ".jsonl":
        with open(file) as f:
            for line in f:
                if line.strip():
                    return json.loads(line)
        return {}
    if suffix == ".json":
        obj = json.loads(Path(file).read_text())
        if isinstance(obj, list):
            return obj[0] if obj else {}
        if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
            return {k: (v[0] if v else None) for k, v in obj.items()}
        return obj
    if suffix == ".csv":
        with open(file, newline="") as f:
            row = next(csv.DictReader(f), None)
        return dict(row or {})
    import pyarrow.parquet as pq

    return {name: None for name in pq.read_schema(file).names}


def _mapped_columns(first: dict[str, Any], columns: dict) -> dict[str, Any]:
    row = dict(first)
    for target, source in (columns or {}).items():
        sources = source if isinstance(source, list) else [source]
        if all(s in first for s in sources):
            row[target] = first[sources[0]]
            for s in sources:
                if s != target:
                    row.pop(s, None)
    return row


def _missing_sources(first: dict, columns: dict) -> list[str]:
    out = []
    for source in (columns or {}).values():
        for s in source if isinstance(source, list) else [source]:
            if s not in first:
                out.append(s)
    return out


def check_columns(row: dict[str, Any], data_kind: str, label: str, stage: str, where: str) -> list[str]:
    """Problems with the columns of one (mapped) record for a stage of this data kind."""
    cols = set(row)
    if not any(set(alt) <= cols for alt in REQUIRED[data_kind]):
        best = min(REQUIRED[data_kind], key=lambda alt: len(set(alt) - cols))
        missing = ", ".join(repr(c) for c in best if c not in cols)
        return [f"{label} ({where}): missing column {missing} needed by {stage}; has {sorted(cols)}. "
                f"A {data_kind} data set needs {HELP[data_kind]}; map other names with {label}.columns"]
    problems = []
    if data_kind == "prompt":
        held = [c for c in COMPLETION_COLUMNS if c in cols]
        prompt = row.get("prompt", row.get("messages"))
        if held:
            problems.append(f"{label} ({where}): {stage} needs prompts only, but the data holds completions "
                            f"(column {', '.join(repr(c) for c in held)})")
        elif isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
            problems.append(f"{label} ({where}): {stage} needs prompts only, but the prompt messages end with an "
                            "assistant turn (a completion)")
    if data_kind == "unpaired" and "label" in cols and row.get("label") is not None and not isinstance(row["label"], bool):
        problems.append(f"{label} ({where}): column 'label' must be boolean (true = desirable) for {stage}, "
                        f"got {row['label']!r}")
    return problems


def check(spec: dict, data_kind: str, label: str, stage: str) -> list[str]:
    """Cheap checks at plan time: local files exist and their columns fit the stage."""
    if not spec["local"]:
        return []  # Hub data: columns are checked after download, before any model loads
    p = Path(spec["path"])
    if not p.exists():
        return [f"{label}.path: data file not found: {p}"]
    files = _files(spec)
    if not files:
        return [f"{label}.path: no {'/'.join(EXTENSIONS)} files in {p}"]
    problems = []
    if spec["split"] not in files:
        problems.append(f"{label}.split: no split '{spec['split']}' in {p} (found {', '.join(files)})")
    if spec["eval_split"] and spec["eval_split"] not in files:
        problems.append(f"{label}.eval_split: no split '{spec['eval_split']}' in {p} (found {', '.join(files)})")
    if problems:
        return problems
    for split in filter(None, (spec["split"], spec["eval_split"])):
        file = files[split][0]
        try:
            first = _peek(file)
        except (OSError, ValueError) as e:
            problems.append(f"{label}: cannot read {file}: {e}")
            continue
        missing = _missing_sources(first, spec["columns"])
        if missing:
            problems.append(f"{label}.columns: source column {', '.join(repr(m) for m in missing)} not in {file} "
                            f"(has {sorted(first)})")
            continue
        row = _mapped_columns(first, spec["columns"])
        problems += check_columns(_to_messages(row) if spec["to_messages"] else row, data_kind, label, stage, file)
    return problems


def _to_messages(row: dict) -> dict:
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        row = dict(row)
        row["messages"] = [{"role": "user", "content": row.pop("prompt")},
                           {"role": "assistant", "content": row.pop("completion")}]
    return row


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


def _raw_split(spec: dict, split: str):
    import datasets

    if spec["local"]:
        files = _files(spec)
        if split not in files:
            raise FileNotFoundError(f"no split {split!r} in {spec['path']}")
        builder = EXTENSIONS[Path(files[split][0]).suffix]
        return datasets.load_dataset(builder, data_files=files[split], split="train")
    return datasets.load_dataset(spec["path"], spec.get("name"), split=split, revision=spec.get("revision"))


def load(spec: dict, data_kind: str, stage: str):
    """Return ``(train, eval_or_None)`` in TRL's formats; raises ConfigError on column problems."""
    label = spec.get("label", spec["path"])
    train = _apply_columns(_raw_split(spec, spec["split"]), spec["columns"])
    evalset = None
    if spec["eval_split"]:
        evalset = _apply_columns(_raw_split(spec, spec["eval_split"]), spec["columns"])
    elif spec["eval_size"]:
        size = spec["eval_size"]
        size = int(size) if size >= 1 else float(size)
        parts = train.train_test_split(test_size=size, seed=spec["seed"])
        train, evalset = parts["train"], parts["test"]
    out = []
    for ds, split in ((train, spec["split"]), (evalset, spec["eval_split"] or "held-out")):
        if ds is None:
            out.append(None)
            continue
        if spec["to_messages"]:
            ds = ds.map(_to_messages, remove_columns=[c for c in ("prompt", "completion") if c in ds.column_names])
        if len(ds) == 0:
            raise ConfigError([f"{label} (split {split}): no rows"])
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
            ds = ds.rename_column("messages", "prompt")  # prompt-only conversations: TRL's on-policy trainers read `prompt`
        out.append(ds)
    return out[0], out[1]
