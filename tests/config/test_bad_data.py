"""Bad data files and data specs (issue 10's data part): each stops with exit code 2 and a one-line message naming
the file, column or key and what to do; no traceback, nothing trained. Cases the cheap plan-time check can see run
``alignctl plan``; the others (a bad line deep in a file, too few rows for the held-out carve-out, Hub data that is
not cached offline) run ``alignctl run``, whose pre-flight loads the data before any model loads."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from alignctl import data
from alignctl.cli import main
from alignctl.config import data_checks

SYNTHETIC = Path(data_checks.BUILTIN_DIR)
GOOD_SFT = [json.loads(line) for line in (SYNTHETIC / "sft.jsonl").read_text().splitlines()[:40]]


def fails(capsys, tmp_path, command: str, *args: str) -> str:
    out_root = tmp_path / "out"
    extra = [f"hydra.run.dir={tmp_path / 'run'}"] if command == "run" else []
    try:
        rc = main([command, f"output_root={out_root}", *extra, *args])
    except SystemExit as e:  # `run` is a Hydra app: its errors leave through sys.exit
        rc = e.code
    out = capsys.readouterr()
    text = out.err + out.out
    assert rc == 2, text
    assert "Traceback" not in text and "Nothing was trained." in out.err, text
    assert not (tmp_path / "run" / "manifest.json").exists() or '"completed"' not in (
        tmp_path / "run" / "manifest.json").read_text()
    lines = [line for line in out.err.splitlines() if line.startswith("  - ")]
    assert lines, text
    return "\n".join(lines)


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# Each maker writes the bad input under tmp and returns the overrides; needles must all appear in the message.
def empty_jsonl(t):
    return [f"data.sft.path={write(t / 'empty.jsonl', '')}"]


def empty_json(t):
    return [f"data.sft.path={write(t / 'empty.json', '')}"]


def header_only_csv(t):
    path = write(t / "head.csv", "prompt,completion\n")
    return [f"data.sft.path={path}"]


def zero_row_parquet(t):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), t / "zero.parquet")
    return [f"data.sft.path={t / 'zero.parquet'}"]


def empty_json_array(t):
    return [f"data.sft.path={write(t / 'none.json', '[]')}"]


def first_line(value):
    def make(t):
        return [f"data.sft.path={write(t / 'first.jsonl', json.dumps(value) + chr(10))}"]
    return make


def json_array_of_strings(t):
    return [f"data.sft.path={write(t / 'strings.json', json.dumps(['a', 'b']))}"]


def invalid_first_line(t):
    return [f"data.sft.path={write(t / 'broken.jsonl', '{messages: nope}' + chr(10))}"]


LATIN1_LINE = b'{"text": "caf' + bytes([0xE9]) + b'"}\n'  # "café" in Latin-1, not UTF-8


def not_utf8_at_start(t):
    path = write(t / "latin1.jsonl", LATIN1_LINE)
    return [f"data.sft.path={path}"]


def messages_as_string(t):
    return [f"data.sft.path={jsonl(t / 'm.jsonl', [{'messages': 'hello there'}] * 4)}"]


def chosen_as_number(t):
    return [f"data.prefs.path={jsonl(t / 'p.jsonl', [{'prompt': 'q', 'chosen': 3, 'rejected': 'no'}] * 4)}"]


def label_as_string(t):
    rows = [{"prompt": "q", "completion": "a", "label": "yes"}] * 4
    return ["recipe=kto", f"data.unpaired.path={jsonl(t / 'u.jsonl', rows)}", "stages.kto.data=unpaired"]


def folder_without_train(t):
    (t / "d").mkdir()
    jsonl(t / "d" / "test.jsonl", GOOD_SFT)
    return [f"data.sft.path={t / 'd'}"]


def eval_split_typo(t):
    (t / "d").mkdir()
    jsonl(t / "d" / "train.jsonl", GOOD_SFT)
    jsonl(t / "d" / "test.jsonl", GOOD_SFT)
    return [f"data.sft.path={t / 'd'}", "data.sft.eval_split=tset"]


def folder_without_data(t):
    (t / "d").mkdir()
    write(t / "d" / "notes.txt", "hi")
    return [f"data.sft.path={t / 'd'}"]


def wrong_extension(t):
    return [f"data.sft.path={write(t / 'rows.txt', 'hello')}"]


def unreadable_folder(t):
    (t / "locked").mkdir()
    jsonl(t / "locked" / "train.jsonl", GOOD_SFT)
    os.chmod(t / "locked", 0)
    return [f"data.sft.path={t / 'locked'}"]


def spec_key(*overrides):
    def make(t):
        return list(overrides)
    return make


def hh_format_on_messages(t):
    return ["data.sft.format=hh"]


def pku_bad_index(t):
    row = {"prompt": "q", "response_0": "a", "response_1": "b", "better_response_id": 2, "safer_response_id": 0}
    return [f"data.prefs.path={jsonl(t / 'pku.jsonl', [row] * 8)}", "data.prefs.eval_size=0"]


def sharegpt_unknown_role(t):
    row = {"conversations": [{"from": "narrator", "value": "once"}, {"from": "gpt", "value": "upon"}]}
    return [f"data.sft.path={jsonl(t / 'sg.jsonl', [row] * 8)}"]


def messages_rows(turns):
    def make(t):
        return [f"data.sft.path={jsonl(t / 'msg.jsonl', [{'messages': turns}] * 8)}"]
    return make


def huge_json_array_peeked(t):
    """A .json array whose first record is fine and whose tail is cut off: plan peeks at the first record only (it
    never reads the whole file), so the check passes plan and the truncation is reported by run's pre-flight."""
    body = json.dumps(GOOD_SFT)[:-200]
    return [f"data.sft.path={write(t / 'big.json', body)}"]


PLAN_CASES = {
    "empty-jsonl": (empty_jsonl, ["data.sft", "empty.jsonl", "empty file"]),
    "empty-json": (empty_json, ["data.sft", "empty.json", "empty file"]),
    "header-only-csv": (header_only_csv, ["data.sft", "head.csv", "holds no rows"]),
    "zero-row-parquet": (zero_row_parquet, ["data.sft", "zero.parquet", "holds no rows"]),
    "json-empty-array": (empty_json_array, ["data.sft", "none.json", "holds no rows"]),
    "jsonl-first-line-string": (first_line("hello"), ["first.jsonl", "line 1 is a string", "not a JSON object"]),
    "jsonl-first-line-null": (first_line(None), ["first.jsonl", "line 1 is null", "not a JSON object"]),
    "jsonl-first-line-array": (first_line([1, 2]), ["first.jsonl", "line 1 is an array", "not a JSON object"]),
    "json-array-of-strings": (json_array_of_strings, ["strings.json", "first element is a string", "not a record"]),
    "jsonl-invalid-first-line": (invalid_first_line, ["broken.jsonl", "line 1 is not valid JSON"]),
    "not-utf8": (not_utf8_at_start, ["latin1.jsonl", "not UTF-8", "save it as UTF-8"]),
    "messages-is-a-string": (messages_as_string, ["m.jsonl", "column 'messages' must be a list of {role, content}",
                                                  "got str", "stages.sft"]),
    "chosen-is-a-number": (chosen_as_number, ["p.jsonl", "column 'chosen' must be a string or a list", "got int"]),
    "label-not-boolean": (label_as_string, ["data.unpaired", "u.jsonl", "'label' must be boolean"]),
    "missing-train-split": (folder_without_train, ["data.sft.split", "no split 'train'", "found test"]),
    "eval-split-typo": (eval_split_typo, ["data.sft.eval_split", "no split 'tset'", "did you mean 'test'"]),
    "folder-without-data": (folder_without_data, ["data.sft.path", "no .json/.jsonl/.csv/.parquet files"]),
    "wrong-extension": (wrong_extension, ["data.sft.path", "rows.txt", "not a .json/.jsonl/.csv/.parquet file"]),
    "unreadable-folder": (unreadable_folder, ["data.sft.path", "cannot read folder", "locked"]),
    "dev-null": (spec_key("data.sft.path=/dev/null"), ["data.sft.path", "/dev/null", "neither a data file nor"]),
    "not-found": (spec_key("data.sft.path=/nonexistent/x.jsonl"), ["data.sft.path", "not found", "/nonexistent"]),
    "eval-size-inf": (spec_key("data.sft.eval_size=inf"), ["data.sft.eval_size", "got inf"]),
    "eval-size-nan": (spec_key("data.sft.eval_size=nan"), ["data.sft.eval_size", "got nan"]),
    "eval-size-negative": (spec_key("data.sft.eval_size=-3"), ["data.sft.eval_size", "got -3"]),
    "eval-size-fractional-count": (spec_key("data.sft.eval_size=2.5"), ["data.sft.eval_size", "whole count"]),
    "seed-abc": (spec_key("data.sft.seed=abc"), ["data.sft.seed", "must be an integer", "'abc'"]),
    "columns-as-list": (spec_key("data.sft.columns=[instruction,output]"), ["data.sft.columns", "must be a mapping"]),
    "data-spec-is-a-string": (spec_key("data.sft=/data/x.jsonl"), ["data.sft", "mapping", "path"]),
    "unknown-format": (spec_key("+data.sft.format=sharegtp"), ["data.sft.format", "did you mean 'sharegpt'",
                                                                "auto, trl, hh, sharegpt"]),
    "bad-system-turns": (spec_key("+data.sft.system_turns=fold"), ["data.sft.system_turns", "keep, merge, drop"]),
    "to-messages-not-bool": (spec_key("+data.sft.to_messages=maybe"), ["data.sft.to_messages", "true or false"]),
    "format-hh-on-messages": (hh_format_on_messages, ["data.sft", "format hh needs column 'chosen', 'rejected'"]),
    "pku-better-response-id-2": (pku_bad_index, ["data.prefs", "pku.jsonl", "'better_response_id' must be 0 or 1"]),
    "sharegpt-unknown-role": (sharegpt_unknown_role, ["data.sft", "sg.jsonl", "unknown ShareGPT role 'narrator'"]),
    # trained silently (the template rendered 'bot'), or blamed on the chat template (null content)
    "messages-unknown-role": (messages_rows([{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "yo"}]),
                              ["data.sft", "msg.jsonl", "message 0 has role 'bot'", "system, user, assistant"]),
    "messages-null-content": (messages_rows([{"role": "user", "content": None},
                                             {"role": "assistant", "content": "yo"}]),
                              ["data.sft", "msg.jsonl", "message 0 (user) has content None, not text"]),
}
def good_lines(n: int = 1) -> str:
    return "".join(json.dumps(r) + "\n" for r in GOOD_SFT * n)


def malformed_later_line(t):
    path = write(t / "late.jsonl", good_lines() + '{"messages": [\n')
    return [f"data.sft.path={path}"]


def not_utf8_later_line(t):
    path = write(t / "late8.jsonl", good_lines(6).encode() + LATIN1_LINE)
    return [f"data.sft.path={path}"]


def one_row(t):
    return [f"data.sft.path={jsonl(t / 'one.jsonl', GOOD_SFT[:1])}"]


RUN_CASES = {
    "malformed-json-later-line": (malformed_later_line, ["data.sft", "late.jsonl", "line 41 is not valid JSON",
                                                         "fix or remove it"]),
    "not-utf8-later-line": (not_utf8_later_line, ["data.sft", "late8.jsonl", "line 241 is not UTF-8",
                                                  "save the file as UTF-8"]),
    "huge-json-array-truncated": (huge_json_array_peeked, ["data.sft", "big.json", "cannot read", "not valid JSON",
                                                           "cut off"]),
    "eval-size-above-rows": (spec_key("data.sft.eval_size=100000"), ["data.sft.eval_size", "100000 of 640 rows",
                                                                     "leave no training rows", "a count below 640"]),
    "one-row-default-carve-out": (one_row, ["data.sft.eval_size", "of 1 rows", "leave no training rows"]),
    "hub-data-not-cached-offline": (spec_key("data=ultra"), ["data.sft.path", "HuggingFaceH4/ultrachat_200k",
                                                             "not in the local cache", "HF_HUB_OFFLINE"]),
    "hub-split-typo-offline": (spec_key("data=ultra", "data.sft.split=train_sf"),
                               ["data.sft.path", "HuggingFaceH4/ultrachat_200k", "HF_HUB_OFFLINE"]),
}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # nothing cached: Hub data cannot be found offline


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_plan_stops_on_bad_data(case, capsys, tmp_path):
    if case == "unreadable-folder" and os.geteuid() == 0:
        pytest.skip("root reads any folder")
    make, needles = PLAN_CASES[case]
    try:
        msg = fails(capsys, tmp_path, "plan", *make(tmp_path))
    finally:
        if (tmp_path / "locked").exists():
            os.chmod(tmp_path / "locked", 0o700)
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_run_preflight_stops_on_bad_data_before_any_model_loads(case, capsys, tmp_path):
    make, needles = RUN_CASES[case]
    overrides = make(tmp_path)
    if case not in ("hub-data-not-cached-offline", "hub-split-typo-offline", "eval-size-above-rows",
                    "one-row-default-carve-out"):
        assert main(["plan", f"output_root={tmp_path / 'plan'}", *overrides]) == 0  # the cheap check cannot see it
        capsys.readouterr()
    msg = fails(capsys, tmp_path, "run", *overrides)
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert len(msg.splitlines()) <= 2  # one line per data set


def test_large_json_array_is_peeked_not_read_whole(tmp_path, monkeypatch):
    """Plan reads a .json array's first record from the file's first bytes (PEEK_BYTES), not the whole file."""
    monkeypatch.setattr(data_checks, "PEEK_BYTES", 4096)
    rows = GOOD_SFT * 50  # ~200 KB
    path = write(tmp_path / "big.json", json.dumps(rows))
    reads = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            reads.append(n)
            return self.f.read(n)

        def tell(self):
            return self.f.tell()

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr("builtins.open", lambda *a, **k: Counting(real_open(*a, **k)) if str(a[0]) == str(path)
                        else real_open(*a, **k))
    s, _ = data_checks.normalize({"path": str(path)}, "data.big")
    assert data_checks.check(s, "sft", "data.big", "stages.sft") == []
    assert reads and all(0 < n <= 4096 for n in reads)
    assert path.stat().st_size > 40 * 4096


def test_csv_with_a_ragged_row_and_mixed_json_types_name_the_file(tmp_path):
    """Files the plan check passes (first record fine) but datasets cannot read: load() names the file."""
    from alignctl.errors import ConfigError

    with open(tmp_path / "mixed.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"prompt": "q" if i < 20 else [{"role": "user", "content": "q"}], "completion": "a"}))
            f.write("\n")
    s, _ = data_checks.normalize({"path": str(tmp_path / "mixed.jsonl"), "eval_size": 0}, "data.mixed")
    assert data_checks.check(s, "sft", "data.mixed", "stages.sft") == []
    with pytest.raises(ConfigError) as e:
        data.load(data_checks.to_spec({**s, "label": "data.mixed"}), "sft", "stages.sft")  # as resolve types it
    assert str(e.value).startswith("data.mixed") and "mixed.jsonl" in str(e.value)
    assert len(e.value.problems) == 1 and "\n" not in e.value.problems[0]

    with open(tmp_path / "ragged.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "completion"])
        w.writerows([["q", "a"]] * 5 + [["q", "a", "extra", "more"]])
    s, _ = data_checks.normalize({"path": str(tmp_path / "ragged.csv"), "eval_size": 0}, "data.ragged")
    assert data_checks.check(s, "sft", "data.ragged", "stages.sft") == []
    with pytest.raises(ConfigError) as e:
        data.load(data_checks.to_spec({**s, "label": "data.ragged"}), "sft", "stages.sft")
    assert str(e.value).startswith("data.ragged") and "ragged.csv" in str(e.value)
