"""A critique stage at plan time: principles as a list or a file (its text fingerprinted), each mistake one line
naming the key; the stage's two outputs reach the stages that read them (SFT rows, pairs)."""

from __future__ import annotations

import pytest

from alignctl import fingerprint
from alignctl.config.compose import compose
from alignctl.config.resolve import resolve
from alignctl.errors import ConfigError


def problems(overrides: list[str], tmp_path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        resolve(compose(["recipe=constitutional", *overrides]), tmp_path / "run")
    return e.value.problems


def stages(overrides: list[str], tmp_path) -> dict:
    return {s.name: s for s in resolve(compose(["recipe=constitutional", *overrides]), tmp_path / "run").stages}


@pytest.mark.parametrize("override,expected", [
    ("stages.cai.principles=[]", "stages.cai.principles: must be a non-empty list of principles (text), got []"),
    ("stages.cai.principles=[1,2]", "stages.cai.principles: must be a non-empty list of principles (text), got [1, 2]"),
    ("stages.cai.principles=['']", "stages.cai.principles: must be a non-empty list of principles (text), got ['']"),
    ("stages.cai.principles=/no/such/principles.txt", "stages.cai.principles: no file /no/such/principles.txt (give "
                                                      "a list of principles, or the path of a file with one per line)"),
    ("+stages.cai.critique_template='Critique it.'", "stages.cai.critique_template: must contain {principle}"),
    ("stages.cai.revisions=0", "stages.cai.revisions: must be"),
    ("stages.cai.audit=rm", "stages.cai.audit: 'rm' is also the stage's reward; an audit must be independent"),
    ("+stages.cai.constitution=[x]", "stages.cai: unknown key 'constitution'"),
])
def test_a_bad_critique_setting_is_one_line_naming_its_key(override, expected, tmp_path):
    found = problems([override], tmp_path)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_a_file_of_principles_is_read_at_plan_time_and_its_text_fingerprinted(tmp_path):
    text = tmp_path / "principles.txt"
    text.write_text("# ours\nbe warm\n\nbe clear\n")
    assert stages([f"stages.cai.principles={text}"], tmp_path)["cai"].options["principles"] == ["be warm", "be clear"]
    listed = tmp_path / "principles.yaml"
    listed.write_text("- be warm\n- be clear\n")
    assert stages([f"stages.cai.principles={listed}"], tmp_path)["cai"].options["principles"] == ["be warm",
                                                                                                  "be clear"]

    def fp(path_or_list: str) -> str:
        return fingerprint.fingerprints(list(stages([f"stages.cai.principles={path_or_list}"], tmp_path).values()),
                                        env={})["cai"]

    same = fp(str(text))
    assert fp(str(listed)) == same == fp("[be warm,be clear]")  # the text counts, not where it was written
    text.write_text("be warm\nbe brief\n")
    assert fp(str(text)) != same
    bad = tmp_path / "bad.yaml"
    bad.write_text("principle: be warm\n")
    assert problems([f"stages.cai.principles={bad}"], tmp_path) == [
        f"stages.cai.principles: {bad} must hold a list of principles, got dict"]


def test_each_consumer_reads_the_output_its_kind_trains_on(tmp_path):
    from alignctl.stages.critique import DEFAULT_PRINCIPLES

    assert stages(["~stages.cai.principles"], tmp_path)["cai"].options["principles"] == list(DEFAULT_PRINCIPLES)
    s = stages([], tmp_path)
    assert s["sft_rev"].data.split == "sft" and s["sft_rev"].data.eval_split == "sft_test"
    assert s["dpo"].data.split == "pairs" and s["dpo"].data.eval_split == "pairs_test"
    assert s["cai"].link("critic") is not None and not s["cai"].link("critic").path  # the policy critiques itself
    with pytest.raises(ConfigError) as e:
        resolve(compose(["recipe=constitutional", "+stages.kto={trainer: kto, from: sft, data: cai}"]),
                tmp_path / "run")
    assert e.value.problems == ["stages.kto.data: 'cai' writes sft and preference data; a kto stage needs unpaired "
                                "data"]
