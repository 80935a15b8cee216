"""Public data sets exactly as published (fixtures in tests/fixtures/public: their column names, nesting, types and
splits, alignctl's own texts) each normalise to the TRL structure its stage kinds read (training on them:
tests/e2e/test_public_learning.py)."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from alignctl import data
from alignctl.config import data_checks
from alignctl.config.compose import compose
from alignctl.config.resolve import resolve
from alignctl.config.types import DataSpec
from alignctl.errors import ConfigError
from conftest import REPO

sys.path.insert(0, str(REPO / "tests" / "fixtures" / "public"))
import make_fixtures  # noqa: E402
from published import PAIR_SETS, PUBLIC, PUBLISHED, SPECS, data_spec  # noqa: E402


def typed(s: dict) -> DataSpec:
    """The typed data spec of a normalized one (labelled by its path, as a load without a label was)."""
    return data_checks.to_spec({"label": s["path"], **s})


def load(key: str, kind: str, **extra):
    s, problems = data_checks.normalize(data_spec(key, **extra), f"data.{key.split(':')[0]}")
    assert not problems
    assert data_checks.check(s, kind, s["path"], "stages.x") == []  # the plan-time check on the first record agrees
    return data.load(typed(s), kind, "stages.x")


def raw(key: str) -> list[dict]:
    name, split = key.split(":")[0], SPECS[key].get("split", "train")
    return make_fixtures.rows_of(name)[split]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def canon(rows) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in rows)


# -- the fixtures keep the published schemas --------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_fixture_has_the_published_columns_and_splits_and_matches_its_generator(name, tmp_path):
    import pyarrow.parquet as pq

    columns, splits = PUBLISHED[name]
    ext = make_fixtures.SETS[name][2]
    assert sorted(p.stem for p in (PUBLIC / name).iterdir()) == sorted(splits)
    make_fixtures.write(name, tmp_path)
    for split in splits:
        path = PUBLIC / name / f"{split}.{ext}"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if ext == "jsonl" else \
            pq.read_table(path).to_pylist()
        assert list(rows[0]) == columns, (name, split)
        fresh = tmp_path / name / path.name
        assert fresh.read_bytes() == path.read_bytes() if ext == "jsonl" else pq.read_table(fresh).equals(
            pq.read_table(path)), f"{path} is stale: run python tests/fixtures/public/make_fixtures.py"


# -- (a) normalisation to TRL's structures ----------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["ultrachat_200k", "no_robots", "capybara"])
def test_messages_sets_train_on_their_messages_only(key):
    train, held = load(key, "sft")
    assert train.column_names == ["messages"] and held.column_names == ["messages"]
    # unchanged, multi-turn and system turns included
    assert list(train["messages"]) == [r["messages"] for r in raw(key)]
    assert any(len(m) > 2 for m in list(train["messages"]))


def test_alpaca_becomes_a_user_assistant_conversation():
    train, held = load("alpaca", "sft")
    expected = [[user(r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")), assistant(r["output"])]
                for r in raw("alpaca")]
    assert train.column_names == ["messages"] and len(held) == 24
    assert canon(list(train["messages"]) + list(held["messages"])) == canon(expected)


def test_sharegpt_turns_become_messages_with_chat_roles():
    train, held = load("openhermes", "sft")
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    expected = [[{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]]
                for r in raw("openhermes")]
    assert train.column_names == ["messages"]
    assert canon(list(train["messages"]) + list(held["messages"])) == canon(expected)
    assert any(m[0]["role"] == "system" for m in list(train["messages"]))


def test_prompt_completion_strings_pass_through():
    train, _ = load("tldr", "sft")
    assert train.column_names == ["prompt", "completion"]
    rows = raw("tldr")
    assert train[:] == {"prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]}


@pytest.mark.parametrize("key", ["ultrafeedback_binarized", "trl_ultrafeedback_binarized"])
def test_ultrafeedback_pairs_get_a_conversational_prompt_and_assistant_only_answers(key):
    for kind in ("preference", "unpaired"):
        train, held = load(key, kind)
        assert set(train.column_names) == {"prompt", "chosen", "rejected"} and len(held) == 32
        for got, r in zip(train, raw(key)):
            assert got["prompt"] == [user(r["chosen"][0]["content"])] == r["chosen"][:1]
            assert got["chosen"] == r["chosen"][1:] and got["rejected"] == r["rejected"][1:]
            if "prompt" in r:
                assert got["prompt"][0]["content"] == r["prompt"]


def test_hh_transcripts_become_conversations_with_every_turn_before_the_last_answer_as_prompt():
    train, _ = load("hh_rlhf", "preference")
    assert set(train.column_names) == {"prompt", "chosen", "rejected"}
    names = {"user": "Human", "assistant": "Assistant"}
    for got, r in zip(train, raw("hh_rlhf")):
        assert got["prompt"][-1]["role"] == "user" and [m["role"] for m in got["chosen"]] == ["assistant"]
        for side in ("chosen", "rejected"):  # the conversation spells out the published transcript exactly
            assert "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in got["prompt"] + got[side]) == r[side]
    assert max(len(p) for p in list(train["prompt"])) == 5  # multi-turn prompts: user, assistant, user, assistant, user


def test_orca_system_and_question_become_the_prompt():
    train, held = load("orca_dpo_pairs", "preference")
    expected = [{"prompt": ([{"role": "system", "content": r["system"]}] if r["system"] else [])
                 + [user(r["question"])],
                 "chosen": [assistant(r["chosen"])], "rejected": [assistant(r["rejected"])]}
                for r in raw("orca_dpo_pairs")]
    assert canon(list(train) + list(held)) == canon(expected)
    assert any(p[0]["role"] == "system" for p in list(train["prompt"]))


def test_pku_pairs_are_chosen_by_better_response_id():
    train, _ = load("pku_saferlhf", "preference")
    assert set(train.column_names) == {"prompt", "chosen", "rejected"}
    for got, r in zip(train, raw("pku_saferlhf")):
        better = r["better_response_id"]
        assert got == {"prompt": [user(r["prompt"])], "chosen": [assistant(r[f"response_{better}"])],
                       "rejected": [assistant(r[f"response_{1 - better}"])]}
    # safer_response_id instead: map it onto better_response_id
    train, _ = load("pku_saferlhf", "preference", columns={"better_response_id": "safer_response_id"})
    r = raw("pku_saferlhf")[0]
    assert train[0]["chosen"] == [assistant(r[f"response_{r['safer_response_id']}"])]


def test_kto_mix_passes_through():
    train, held = load("kto_mix_14k", "unpaired")
    assert train[:] == {k: [r[k] for r in raw("kto_mix_14k")] for k in ("prompt", "completion", "label")}
    assert train.features["label"].dtype == "bool" and len(held) == 32


@pytest.mark.parametrize("key,kind", [(k, "sft") for k in PAIR_SETS])
def test_pair_sets_serve_sft_with_their_chosen_conversations(key, kind):
    train, _ = load(key, kind)
    assert train.column_names == ["messages"]
    assert all(m[-1]["role"] == "assistant" and m[-2]["role"] == "user" for m in list(train["messages"]))


def test_kto_mix_serves_sft_with_its_desirable_completions_only():
    train, held = load("kto_mix_14k", "sft")
    good = [r for r in raw("kto_mix_14k") if r["label"]]
    assert train.column_names == ["prompt", "completion"] and len(train) == len(good) == 64
    assert list(train["completion"]) == [r["completion"] for r in good]


@pytest.mark.parametrize("key,expected", [
    ("ultrafeedback_prompt", lambda r: r["prompt"]),
    ("ultrafeedback_binarized:gen", lambda r: [user(r["prompt"])]),       # a pair set's train_gen split
    ("trl_ultrafeedback_binarized", lambda r: r["chosen"][:1]),
    ("hh_rlhf", None),
    ("orca_dpo_pairs", None),
    ("pku_saferlhf", lambda r: [user(r["prompt"])]),
    ("ultrachat_200k:gen", lambda r: r["messages"][:-1]),                  # conversations: turns before the last answer
    ("tldr", lambda r: r["prompt"]),                                       # prompt/completion: the prompt
    ("kto_mix_14k", lambda r: r["prompt"]),                                # unpaired: the prompt
    ("no_robots", lambda r: r["messages"][:-1]),
    ("capybara", lambda r: r["messages"][:-1]),
    ("alpaca", None),
    ("openhermes", None),
])
def test_every_layout_serves_as_a_prompt_set(key, expected, caplog):
    caplog.set_level(logging.INFO, logger="alignctl")
    data._NOTED.clear()  # what the log has said so far in this process
    train, held = load(key, "prompt")
    assert "prompt" in train.column_names and "prompt" in held.column_names
    assert not {"chosen", "rejected", "completion", "messages", "label"} & set(train.column_names)
    for got in list(train["prompt"]):
        assert isinstance(got, str) or got[-1]["role"] == "user"
    if expected and SPECS[key].get("eval_size") is None:  # (carved sets are shuffled)
        assert list(train["prompt"]) == [expected(r) for r in raw(key)]
    load(key, "prompt")  # loaded again (pre-flight, then the stage): the log says it once
    notes = [r.getMessage() for r in caplog.records if "used its prompts only" in r.getMessage()]
    assert len(notes) == (0 if key == "ultrafeedback_prompt" else 1), notes


@pytest.mark.parametrize("how", ["keep", "merge", "drop"])
def test_system_turns_keep_merge_or_drop(how):
    train, _ = load("no_robots", "sft", system_turns=how)
    originals = [r["messages"] for r in raw("no_robots")]
    with_system = [i for i, m in enumerate(originals) if m[0]["role"] == "system"]
    assert with_system
    for i in with_system:
        got, orig = train[i]["messages"], originals[i]
        if how == "keep":
            assert got == orig
        elif how == "drop":
            assert got == orig[1:]
        else:
            assert got[0] == user(f"{orig[0]['content']}\n\n{orig[1]['content']}") and got[1:] == orig[2:]
    train, _ = load("orca_dpo_pairs", "preference", system_turns="merge")
    assert all(p[0]["role"] == "user" and len(p) == 1 for p in list(train["prompt"]))


@pytest.mark.parametrize("key,kind,needle", [
    ("ultrachat_200k", "preference", "missing column 'chosen', 'rejected'"),
    ("tldr", "preference", "missing column 'chosen', 'rejected'"),
    ("kto_mix_14k", "preference", "missing column 'chosen', 'rejected'"),
    ("ultrafeedback_prompt", "sft", "missing column 'messages'"),
    ("alpaca", "unpaired", "missing column"),
])
def test_sets_that_do_not_fit_a_stage_kind_say_what_is_missing(key, kind, needle):
    s, _ = data_checks.normalize(data_spec(key), "data.mine")
    problems = data_checks.check(s, kind, "data.mine", "stages.x")
    assert len(problems) == 1 and needle in problems[0] and "data.mine" in problems[0] and "stages.x" in problems[0]
    with pytest.raises(ConfigError) as e:
        data.load(typed(s), kind, "stages.x")
    assert needle in str(e.value)


@pytest.mark.parametrize("layout,key", [("hh", "orca_dpo_pairs"), ("pku", "hh_rlhf"), ("sharegpt", "alpaca")])
def test_a_named_format_that_does_not_fit_names_its_columns(layout, key):
    s, _ = data_checks.normalize(data_spec(key, format=layout), "data.mine")
    problems = data_checks.check(s, "preference", "data.mine", "stages.x")
    assert len(problems) == 1
    assert f"format {layout} needs column" in problems[0] or "not an HH transcript" in problems[0]


def test_unknown_format_names_the_choices():
    _, problems = data_checks.normalize({"path": "x.jsonl", "format": "sharegtp"}, "data.mine")
    assert problems == ["data.mine.format: unknown format 'sharegtp' (did you mean 'sharegpt'?); choose one of: "
                        "auto, trl, hh, sharegpt, alpaca, orca, pku"]


@pytest.mark.parametrize("recipe", ["default", "rlhf-ppo", "rlhf-grpo", "kto", "simpo"])
def test_hh_rlhf_data_group_serves_every_role_of_every_tiny_recipe(recipe, tmp_path):
    """configs/data/hh-rlhf.yaml names Anthropic/hh-rlhf for sft, prefs, prompts and unpaired; pointed at files of its
    layout, every role of every recipe passes the plan checks (SFT on the chosen conversations, pairs, prompts)."""
    paths = [f"data.{role}.path={PUBLIC / 'hh_rlhf'}" for role in ("sft", "prefs", "prompts", "unpaired")]
    resolved = resolve(compose([f"recipe={recipe}", "data=hh-rlhf", *paths]), tmp_path)
    assert all(s.data.path == str(PUBLIC / "hh_rlhf") for s in resolved.stages)


class _Template:
    """A chat template rendering turns as '<role>: content' lines (enough to see what _texts formats)."""

    def apply_chat_template(self, turns, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>: {m['content']}\n" for m in turns)
        return text + ("<assistant>: " if add_generation_prompt else "")


@pytest.mark.parametrize("prompt,completion", [
    ("describe the lake .", [assistant("the lake is calm and kind .")]),    # string prompt, conversational answer
    ([user("describe the lake .")], "the lake is calm and kind ."),        # conversational prompt, string answer
    ([user("describe the lake .")], [assistant("the lake is calm and kind .")]),
])
def test_preference_evaluation_formats_mixed_string_and_conversational_pairs(prompt, completion):
    """The held-out preference evaluation cannot crash on a string prompt beside conversational completions (the
    UltraFeedback layout before conversion): both sides go through the chat template."""
    from alignctl.evaluate import _texts

    p, full = _texts(_Template(), prompt, completion)
    assert p == "<user>: describe the lake .\n<assistant>: "
    assert full == "<user>: describe the lake .\n<assistant>: the lake is calm and kind .\n"
    assert _texts(_Template(), "q ", "a") == ("q ", "q a")  # plain strings stay plain
