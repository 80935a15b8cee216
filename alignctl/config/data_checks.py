"""Data set specs at plan time (no torch, no datasets): their keys and defaults (:func:`normalize`), and cheap checks
of local files (:func:`check`: files exist, hold rows, and their first record fits the stage's data kind; a file's
first record is read, never a whole file). Loading is alignctl.data (run time), which repeats the checks on the real
data.

A data set spec (``configs/data/*.yaml``) names a Hub id (with ``name``/``split``) or local JSON/JSONL/Parquet/CSV
files (a file, or a folder of ``<split>.<ext>`` files), an optional column mapping, its layout (``format``,
alignctl.formats), what to do with system turns (``system_turns``), and its held-out split.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from alignctl import formats
from alignctl.config.types import DataSpec
from alignctl.errors import suggest

BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "assets" / "data"
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
    "format": "layout of the rows: " + " | ".join(formats.LAYOUTS),
    "system_turns": "keep | merge (into the first user turn) | drop: for chat templates that refuse a system role",
    "revision": "Hub revision",
}
# What each data kind must hold (after conversion): any one of the alternatives.
REQUIRED = {
    "sft": [("messages",), ("text",), ("prompt", "completion")],
    "preference": [("prompt", "chosen", "rejected"), ("chosen", "rejected")],
    "prompt": [("prompt",), ("messages",)],
    "unpaired": [("prompt", "completion", "label"), ("prompt", "chosen", "rejected"), ("chosen", "rejected")],
}
HELP = {
    "sft": "messages, text, or prompt+completion",
    "preference": "prompt+chosen+rejected, or chosen+rejected with the prompt inside them",
    "prompt": "prompt (a pair set's prompts work too)",
    "unpaired": "prompt+completion+label (boolean), or preference pairs to unpair",
}
COMPLETION_COLUMNS = ("completion", "chosen", "rejected", "response")
PEEK_BYTES = 1 << 20  # a .json array is read this much at a time at plan time, up to PEEK_LIMIT, never whole
PEEK_LIMIT = 64 << 20




def looks_local(path: str) -> bool:
    p = str(path)
    return (p.startswith(("/", "./", "../", "~", BUILTIN_PREFIX)) or Path(p).suffix in EXTENSIONS
            or Path(p).expanduser().exists())


def local_path(path: str) -> Path:
    if path.startswith(BUILTIN_PREFIX):
        return BUILTIN_DIR / path[len(BUILTIN_PREFIX):]
    return Path(path).expanduser().absolute()


# -- the spec ------------------------------------------------------------------------------------------------------
def normalize(spec: Any, label: str) -> tuple[dict, list[str]]:
    """The spec with defaults filled in, and the problems with its keys and values (types, ranges, choices)."""
    if not isinstance(spec, dict):
        shown = f"{spec!r}" if len(repr(spec)) < 80 else type(spec).__name__
        return {"path": None}, [f"{label}: must be a mapping with at least `path` (e.g. {label}.path=/data/x.jsonl), "
                                f"got {shown}"]
    problems = [f"{label}: unknown key '{k}'" + suggest(k, DATA_KEYS) for k in spec if k not in DATA_KEYS]
    if not spec.get("path"):
        problems.append(f"{label}.path: not set")
        return dict(spec), problems
    out = {"name": None, "split": "train", "eval_split": None, "eval_size": 0.1, "seed": 42, "columns": {},
           "to_messages": False, "format": "auto", "system_turns": "keep", "revision": None, **spec}
    if not isinstance(out["path"], str):
        problems.append(f"{label}.path: must be a string (a Hub id, file or folder), got {out['path']!r}")
        return out, problems
    for key in ("name", "split", "eval_split", "revision"):
        if out[key] is not None and not isinstance(out[key], str):
            problems.append(f"{label}.{key}: must be a string, got {out[key]!r}")
    if not out["split"]:
        problems.append(f"{label}.split: must name the training split")
    out["local"] = looks_local(out["path"])
    if out["local"]:
        out["path"] = str(local_path(out["path"]))
    size = out["eval_size"]
    if not isinstance(size, (int, float)) or isinstance(size, bool) or not math.isfinite(size) or size < 0 or \
            (size >= 1 and size != int(size)):
        problems.append(f"{label}.eval_size: must be a fraction in [0, 1) or a whole count of rows, got {size!r}")
    if not isinstance(out["seed"], int) or isinstance(out["seed"], bool):
        problems.append(f"{label}.seed: must be an integer, got {out['seed']!r}")
    columns = out["columns"] if out["columns"] is not None else {}
    out["columns"] = columns
    if not isinstance(columns, dict):
        problems.append(f"{label}.columns: must be a mapping target -> source column (e.g. "
                        f"{{prompt: instruction, completion: output}}), got {columns!r}")
    else:
        for target, source in columns.items():
            sources = source if isinstance(source, list) else [source]
            if not sources or not all(isinstance(s, str) and s for s in sources):
                problems.append(f"{label}.columns.{target}: must be a column name or a list of them, got {source!r}")
    if not isinstance(out["to_messages"], bool):
        problems.append(f"{label}.to_messages: must be true or false, got {out['to_messages']!r}")
    if not isinstance(out["format"], str) or out["format"] not in formats.LAYOUTS:
        hint = suggest(str(out["format"]), formats.LAYOUTS)
        problems.append(f"{label}.format: unknown format {out['format']!r}{hint}"
                        f"; choose one of: {', '.join(formats.LAYOUTS)}")
    if not isinstance(out["system_turns"], str) or out["system_turns"] not in formats.SYSTEM_TURNS:
        problems.append(f"{label}.system_turns: must be one of {', '.join(formats.SYSTEM_TURNS)}, "
                        f"got {out['system_turns']!r}")
    return out, problems


# -- cheap plan-time checks ------------------------------------------------------------------------------------------
class Unreadable(Exception):
    """A local file whose first record cannot be read; the message says why."""


def split_files(path: str) -> dict[str, list[str]]:
    """Split name -> files of a local data set's path (raises Unreadable for a path that is neither file nor
    folder)."""
    p = Path(path)
    if p.is_file():
        if p.suffix not in EXTENSIONS:
            raise Unreadable(f"{p}: not a {'/'.join(EXTENSIONS)} file")
        return {"train": [str(p)]}
    if not p.is_dir():
        raise Unreadable(f"{p} is neither a data file nor a folder of <split>.<ext> files")
    try:
        entries = sorted(p.iterdir())
    except OSError as e:
        raise Unreadable(f"cannot read folder {p}: {e.strerror or e}") from None
    splits: dict[str, list[str]] = {}
    for f in entries:
        if f.suffix in EXTENSIONS and f.is_file():
            splits.setdefault(f.stem, []).append(str(f))
    return splits


def _json_value(text: str, what: str, file: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise Unreadable(f"{file}: {what} is not valid JSON ({e.msg} at column {e.colno})") from None


def _peek_jsonl(file: str) -> dict | None:
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                row = _json_value(line, f"line {number}", file)
                if not isinstance(row, dict):
                    raise Unreadable(f"{file}: line {number} is {_json_type(row)} ({_short(row)}), not a JSON object "
                                      "(each line must be one record, e.g. {\"prompt\": ...})")
                return row
    return None


def _peek_json(file: str) -> dict | None:
    """The first record of a .json file (an array of records, one columnar object, or JSON Lines) without reading a
    large file whole: the array's first element is decoded from the file's first bytes."""
    decoder = json.JSONDecoder()
    size = Path(file).stat().st_size
    with open(file, encoding="utf-8") as f:
        text = f.read(PEEK_BYTES)
        while True:
            body = text.lstrip("\ufeff \t\r\n")
            complete = len(text) >= size or f.tell() >= size
            try:
                if body.startswith("["):
                    inner = body[1:].lstrip()
                    if inner.startswith("]"):
                        return None
                    row, _ = decoder.raw_decode(inner)
                    if not isinstance(row, dict):
                        raise Unreadable(f"{file}: the array's first element is {_json_type(row)} ({_short(row)}), "
                                          "not a record (a JSON object)")
                    return row
                if body.startswith("{"):
                    obj, end = decoder.raw_decode(body)
                    rest = body[end:].lstrip()
                    if rest.startswith("{"):  # JSON Lines in a .json file
                        return obj
                    if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
                        if not any(obj.values()):
                            return None
                        return {k: (v[0] if v else None) for k, v in obj.items()}
                    return obj
                if not body and complete:
                    raise Unreadable(f"{file}: empty file")
                raise Unreadable(f"{file}: not a JSON array of records, a JSON object or JSON Lines "
                                  f"(starts with {body[:20]!r})")
            except json.JSONDecodeError as e:
                if complete:
                    raise Unreadable(f"{file}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
                if len(text) >= PEEK_LIMIT:
                    return {}  # a first record over 64 MB: leave the check to load()
                text += f.read(len(text))


def _peek(file: str) -> dict | None:
    """First record of a local file (columns and values), cheaply; None when the file holds no rows."""
    suffix = Path(file).suffix
    try:
        if Path(file).stat().st_size == 0:
            raise Unreadable(f"{file}: empty file")
        if suffix == ".jsonl":
            return _peek_jsonl(file)
        if suffix == ".json":
            return _peek_json(file)
        if suffix == ".csv":
            with open(file, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                row = next(reader, None)
            return dict(row) if row else None
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(file)
        except pa.ArrowException as e:
            raise Unreadable(f"{file}: not a readable Parquet file ({e})") from None
        if pf.metadata.num_rows == 0:
            return None
        return next(pf.iter_batches(batch_size=1)).to_pylist()[0]
    except UnicodeDecodeError as e:
        raise Unreadable(f"{file}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}); "
                          "save it as UTF-8") from None
    except OSError as e:
        raise Unreadable(f"cannot read {file}: {e.strerror or e}") from None


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _mapped_columns(first: dict[str, Any], columns: dict) -> dict[str, Any]:
    row = dict(first)
    for target, source in (columns or {}).items():
        sources = source if isinstance(source, list) else [source]
        if all(s in first for s in sources):
            if isinstance(source, list):
                row[target] = "\n\n".join(str(first[s]) for s in sources if first[s] not in (None, ""))
            else:
                row[target] = first[source]
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


def _type_problem(column: str, value: Any) -> str | None:
    """What is wrong with the type of a TRL column's value, or None."""
    text_or_turns = "a string or a list of {role, content} messages"
    if column == "messages" and not formats.is_conversation(value):
        return f"column 'messages' must be a list of {{role, content}} messages, got {_type_name(value)}"
    if column == "text" and not isinstance(value, str):
        return f"column 'text' must be a string, got {_type_name(value)}"
    if column in ("prompt", "completion", "chosen", "rejected") and value is not None and \
            not isinstance(value, str) and not formats.is_conversation(value):
        return f"column '{column}' must be {text_or_turns}, got {_type_name(value)}"
    if column in ("messages", "prompt", "completion", "chosen", "rejected") and isinstance(value, list):
        for i, turn in enumerate(value):  # chat templates render unknown roles silently, or fail on null content
            if isinstance(turn, dict) and turn.get("role") not in CHAT_ROLES:
                return (f"column '{column}': message {i} has role {turn.get('role')!r}; roles are "
                        f"{', '.join(CHAT_ROLES)} (map other names first, or for ShareGPT data set format: sharegpt)")
            if isinstance(turn, dict) and not isinstance(turn.get("content"), (str, list)) and \
                    not turn.get("tool_calls"):
                return f"column '{column}': message {i} ({turn.get('role')}) has content {turn.get('content')!r}, " \
                       "not text"
    return None


CHAT_ROLES = ("system", "user", "assistant", "tool", "developer", "ipython", "function")


def _type_name(value: Any) -> str:
    if isinstance(value, list):
        return "an empty list" if not value else f"a list of {type(value[0]).__name__}"
    return type(value).__name__


def check_columns(row: dict[str, Any], data_kind: str, label: str, stage: str, where: str) -> list[str]:
    """Problems with the columns of one (converted) record for a stage of this data kind."""
    cols = set(row)
    if not any(set(alt) <= cols for alt in REQUIRED[data_kind]):
        best = min(REQUIRED[data_kind], key=lambda alt: len(set(alt) - cols))
        missing = ", ".join(repr(c) for c in best if c not in cols)
        return [f"{label} ({where}): missing column {missing} needed by {stage}; has {sorted(cols)}. "
                f"{'An' if data_kind[0] in 'aeiou' else 'A'} {data_kind} data set needs {HELP[data_kind]}; "
                f"map other names with {label}.columns "
                f"or name its layout with {label}.format ({', '.join(formats.LAYOUTS)})"]
    problems = [f"{label} ({where}): {p} (for {stage})" for c in sorted(cols) if (p := _type_problem(c, row[c]))]
    if problems:
        return problems
    if data_kind == "prompt":
        held = [c for c in COMPLETION_COLUMNS if c in cols]
        prompt = row.get("prompt", row.get("messages"))
        if held:
            problems.append(f"{label} ({where}): {stage} needs prompts only, but the data holds completions "
                            f"(column {', '.join(repr(c) for c in held)}) and no prompt column to use")
        elif isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict) and \
                prompt[-1].get("role") == "assistant":
            problems.append(f"{label} ({where}): {stage} needs prompts only, but the prompt messages end with an "
                            "assistant turn (a completion)")
    if data_kind == "unpaired" and "label" in cols and row.get("label") is not None and \
            not isinstance(row["label"], bool):
        problems.append(f"{label} ({where}): column 'label' must be boolean (true = desirable) for {stage}, "
                        f"got {row['label']!r}")
    return problems


def _convert_first(first: dict, spec: dict, data_kind: str, label: str, stage: str, where: str) -> list[str]:
    missing = _missing_sources(first, spec["columns"])
    if missing:
        return [f"{label}.columns: source column {', '.join(repr(m) for m in missing)} not in {where} "
                f"(has {sorted(first)})"]
    row = _mapped_columns(first, spec["columns"])
    if spec["to_messages"]:
        row = as_messages(row)
    try:
        row, _ = formats.convert(row, spec["format"], data_kind, spec["system_turns"])
    except formats.FormatError as e:
        return [f"{label} ({where}): {e}"]
    return check_columns(row, data_kind, label, stage, where)


def check(spec: dict, data_kind: str, label: str, stage: str) -> list[str]:
    """Cheap checks at plan time: local files exist, hold rows, and their first record fits the stage."""
    if not spec["local"]:
        return []  # Hub data: checked after download (data.load), before any model loads
    p = Path(spec["path"])
    if not p.exists():
        return [f"{label}.path: data file not found: {p}"]
    try:
        files = split_files(spec["path"])
    except Unreadable as e:
        return [f"{label}.path: {e}"]
    if not files:
        return [f"{label}.path: no {'/'.join(EXTENSIONS)} files in {p}"]
    problems = []
    for key in ("split", "eval_split"):
        if spec[key] and spec[key] not in files:
            problems.append(f"{label}.{key}: no split '{spec[key]}' in {p}{suggest(spec[key], files)} "
                            f"(found {', '.join(files)})")
    if problems:
        return problems
    for split in filter(None, (spec["split"], spec["eval_split"])):
        if problems:
            break  # the held-out split would repeat the training split's problem
        for file in files[split]:
            try:
                first = _peek(file)
            except Unreadable as e:
                problems.append(f"{label}: {e}")
                continue
            if first is None:
                problems.append(f"{label}: {file} holds no rows; give it records or point {label}.path elsewhere")
            elif first:
                problems += _convert_first(first, spec, data_kind, label, stage, file)
            break  # the first file of a split tells its columns
    return problems


def as_messages(row: dict) -> dict:
    """``to_messages: true``: a row's string prompt/completion as user/assistant messages."""
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        row = dict(row)
        row["messages"] = [{"role": "user", "content": row.pop("prompt")},
                           {"role": "assistant", "content": row.pop("completion")}]
    return row


def to_spec(spec: dict, stage: str | None = None) -> DataSpec:
    """The typed form of a normalized data set spec (with its ``label``): local files, a Hub data set, or the output
    of the earlier stage ``stage`` (generated)."""
    source = "generated" if stage else "local" if spec["local"] else "hub"
    return DataSpec(source=source, path=spec["path"], label=spec["label"], split=spec["split"],
                    eval_split=spec["eval_split"], eval_size=spec["eval_size"], seed=spec["seed"],
                    columns=spec["columns"], to_messages=spec["to_messages"], format=spec["format"],
                    system_turns=spec["system_turns"], name=spec["name"], revision=spec["revision"], stage=stage)
