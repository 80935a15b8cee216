"""Data: formats, column mapping, held-out splits, and column checks before any model loads."""

from __future__ import annotations

import csv
import json

import pytest

from alignctl import data
from alignctl.config import data_checks
from alignctl.config.types import DataSpec
from alignctl.errors import ConfigError


def typed(s: dict) -> DataSpec:
    """The typed data spec of a normalized one (labelled by its path, as a load without a label was)."""
    return data_checks.to_spec({"label": s["path"], **s})


def spec_for(path, **kw):
    s, problems = data_checks.normalize({"path": str(path), **kw}, "data.x")
    assert not problems
    return s


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca_columns_map_into_messages(tmp_path):
    rows = [{"instruction": f"add {i} and 1", "input": "" if i % 2 else "show work", "output": str(i + 1)}
            for i in range(20)]
    f = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    s = spec_for(f, columns={"prompt": ["instruction", "input"], "completion": "output"}, to_messages=True,
                 eval_size=4)
    assert data_checks.check(s, "sft", "data.x", "stages.sft") == []
    train, held = data.load(typed(s), "sft", "stages.sft")
    assert len(train) == 16 and len(held) == 4
    row = next(r for r in train if r["messages"][0]["content"].startswith("add 0"))
    assert row["messages"] == [{"role": "user", "content": "add 0 and 1\n\nshow work"},
                               {"role": "assistant", "content": "1"}]
    assert set(train.column_names) == {"messages"}


def test_implicit_prompt_preference_data_gets_prompt_extracted(tmp_path):
    """String pairs that hold their prompt: TRL's extraction splits it off; HH transcripts become conversations."""
    rows = [{"chosen": f"Q{i}: which? A: good {i}", "rejected": f"Q{i}: which? A: bad {i}"} for i in range(10)]
    s = spec_for(write_jsonl(tmp_path / "implicit.jsonl", rows), eval_size=0)
    assert data_checks.check(s, "preference", "data.x", "stages.dpo") == []
    train, held = data.load(typed(s), "preference", "stages.dpo")
    assert held is None
    assert train[0]["prompt"] == "Q0: which? A:" and train[0]["chosen"] == " good 0"

    hh = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: good {i}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad {i}"}
          for i in range(10)]
    train, _ = data.load(typed(spec_for(write_jsonl(tmp_path / "hh.jsonl", hh), eval_size=0)), "preference",
                         "stages.dpo")
    assert train[0] == {"prompt": [{"role": "user", "content": "q0"}],
                        "chosen": [{"role": "assistant", "content": "good 0"}],
                        "rejected": [{"role": "assistant", "content": "bad 0"}]}
    # Named explicitly, the same; `format: trl` keeps TRL's own string handling.
    train, _ = data.load(typed(spec_for(tmp_path / "hh.jsonl", eval_size=0, format="trl")), "preference", "stages.dpo")
    assert train[0]["prompt"] == "\n\nHuman: q0\n\nAssistant:"


def test_named_eval_split_from_a_folder_and_csv(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    for split, n in (("train", 12), ("test", 3)):
        with open(folder / f"{split}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["prompt", "chosen", "rejected"])
            w.writeheader()
            w.writerows({"prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(n))
    s = spec_for(folder, eval_split="test")
    train, held = data.load(typed(s), "preference", "stages.dpo")
    assert (len(train), len(held)) == (12, 3)
    bad = spec_for(folder, eval_split="validation")
    assert "no split 'validation'" in data_checks.check(bad, "preference", "data.x", "stages.dpo")[0]


def test_parquet_and_carved_split_is_seeded(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "sft.parquet"
    pq.write_table(pa.table({"text": [f"line {i}" for i in range(50)]}), f)
    s = spec_for(f, eval_size=0.2, seed=3)
    assert data_checks.check(s, "sft", "data.x", "stages.sft") == []
    a = data.load(typed(s), "sft", "stages.sft")[1]["text"]
    b = data.load(typed(s), "sft", "stages.sft")[1]["text"]
    c = data.load(typed(spec_for(f, eval_size=0.2, seed=4)), "sft", "stages.sft")[1]["text"]
    assert len(a) == 10 and a == b and a != c


@pytest.mark.parametrize("kind,row,needle", [
    ("sft", {"question": "q", "answer": "a"}, "missing column 'messages'"),
    ("preference", {"prompt": "q", "chosen": "a"}, "missing column 'rejected'"),
    ("prompt", {"completion": "a", "chosen": "b"}, "missing column 'prompt'"),
    ("prompt", {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "end with an assistant turn"),
    ("unpaired", {"prompt": "q", "completion": "a", "label": "yes"}, "'label' must be boolean"),
])
def test_column_checks_name_the_problem(tmp_path, kind, row, needle):
    f = write_jsonl(tmp_path / "rows.jsonl", [row] * 4)
    problems = data_checks.check(spec_for(f), kind, "data.x", "stages.s")
    assert len(problems) == 1 and needle in problems[0] and "rows.jsonl" in problems[0] and "stages.s" in problems[0]


def test_load_rechecks_columns_of_real_data(tmp_path):
    """Hub data is only checked once loaded: load() applies the same checks (here, integer labels)."""
    rows = [{"prompt": "q", "completion": "a", "label": i % 2} for i in range(6)]
    s = spec_for(write_jsonl(tmp_path / "kto.jsonl", rows), eval_size=0)
    with pytest.raises(ConfigError) as e:
        data.load(typed(s), "unpaired", "stages.kto")
    assert "'label' must be boolean" in str(e.value) and "stages.kto" in str(e.value)


def test_mapping_source_missing_is_reported(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}])
    problems = data_checks.check(spec_for(f, columns={"completion": "response"}), "sft", "data.x", "stages.sft")
    assert "source column 'response' not in" in problems[0]


def test_hub_ids_are_not_mistaken_for_files():
    assert not data_checks.looks_local("HuggingFaceH4/ultrachat_200k")
    assert all(data_checks.looks_local(p) for p in ("./x.jsonl", "builtin:sft.jsonl", "/a/b"))


def test_conversations_column_in_either_turn_style_becomes_messages(tmp_path):
    """`conversations` of {role, content} turns is read as `messages`; of {from, value} turns (ShareGPT) converted."""
    rows = [{"conversations": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}], "id": i}
            for i in range(6)]
    train, _ = data.load(typed(spec_for(write_jsonl(tmp_path / "c.jsonl", rows), eval_size=0)), "sft", "stages.sft")
    assert train.column_names == ["messages"] and train[0]["messages"][0] == {"role": "user", "content": "q0"}
    sharegpt = [{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": f"q{i}"},
                                   {"from": "gpt", "value": "a"}]} for i in range(6)]
    train, _ = data.load(typed(spec_for(write_jsonl(tmp_path / "s.jsonl", sharegpt), eval_size=0, system_turns="drop")),
                         "sft", "stages.sft")
    assert train[0]["messages"] == [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a"}]
