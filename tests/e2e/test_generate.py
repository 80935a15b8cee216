"""Generate stages (alignctl.stages.generate): iterative DPO and RLAIF recipes, the judge's order swap, store reuse."""

from __future__ import annotations

import json
import logging

import pytest

from alignctl import generation, judge
from alignctl.errors import ConfigError
from alignctl.stages import generate

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def single_thread(monkeypatch):
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stage(manifest: dict, name: str) -> dict:
    return next(s for s in manifest["stages"] if s["name"] == name)


# -- the judge: both orders asked, order-dependent verdicts are ties and yield no pair ------------------------------
def test_judge_asks_both_orders_and_drops_position_ties():
    asked = []

    def position_biased(items):  # always prefers whatever stands in position A
        asked.extend(items)
        return [1.0] * len(items)

    prompts, answers = ["q1"], [["warm one", "cold one", "warm two"]]
    wins, stats = judge.round_robin(position_biased, prompts, answers)
    for i, a in enumerate(answers[0]):  # every pair asked in both orders
        for b in answers[0][i + 1:]:
            assert ("q1", a, b) in asked and ("q1", b, a) in asked
    assert len(asked) == 6 and stats == {"comparisons": 3, "decisive": 0, "ties": 3, "position_consistency": 0.0}
    cfg = generate.GenerateConfig(pairs="all")
    assert generation.pairs_of("q1", answers[0], wins[0], cfg) == []  # ties dropped: no pair

    def content(items):  # prefers the warm answer wherever it stands
        return [("warm" in a) - ("warm" in b) + 0.0 for _, a, b in items]

    wins, stats = judge.round_robin(content, prompts, answers)
    assert wins == [[1.0, 0.0, 1.0]] and stats["decisive"] == 2 and stats["ties"] == 1
    rows = generation.pairs_of("q1", answers[0], wins[0], cfg)
    assert {(r["chosen"], r["rejected"]) for r in rows} == {("warm one", "cold one"), ("warm two", "cold one")}


def test_lm_judge_verdicts_do_not_depend_on_batching(cache_root):
    """The LM judge reads log P(" A") - log P(" B") after the shared prefix of both letters; batched (left-padded)
    prompts of different lengths give the verdicts each prompt gives alone."""
    from alignctl import models
    from alignctl.config.types import ModelSpec

    spec = ModelSpec("tiny:llama")
    path = models.materialize("tiny:llama", str(cache_root / ".cache"), spec)
    tok = models.load_tokenizer(path, spec)
    lm = models.load_causal_lm(path, spec, "fp32", tok)
    j = judge.LMJudge(lm, tok, ["be warm"], batch_size=3)
    a, b = (tok(f" {x}", add_special_tokens=False)["input_ids"] for x in "AB")
    assert j.prefix + j.letters[:1] == a and j.prefix + j.letters[1:] == b
    items = [("q", "the cat is warm .", "the cat is cold ."), ("q", "the cat is cold .", "the cat is warm ."),
             ("describe the old tower by the lake .", "it is warm .", "the tower is cold and bitter .")]
    batched = j(items)
    alone = [j([it])[0] for it in items]
    assert batched == pytest.approx(alone, abs=1e-4) and len(set(round(v, 5) for v in alone)) == 3


# -- rounds: N -> named stages ----------------------------------------------------------------------------------------
def test_rounds_expand_into_named_stages_chained_by_policy():
    problems = []
    out = generate.expand_rounds({"sft": {"trainer": "sft"}, "loop": {
        "rounds": 3, "gen": {"trainer": "generate", "from": "sft", "temperature": 1.0},
        "dpo": {"trainer": "dpo", "ref": "sft"}, "round2": {"gen": {"temperature": 0.7}}}}, problems)
    assert problems == [] and list(out) == ["sft", "gen1", "dpo1", "gen2", "dpo2", "gen3", "dpo3"]
    assert [out[f"gen{i}"]["from"] for i in (1, 2, 3)] == ["sft", "dpo1", "dpo2"]
    assert [out[f"dpo{i}"]["from"] for i in (1, 2, 3)] == ["sft", "dpo1", "dpo2"]
    assert [out[f"dpo{i}"]["data"] for i in (1, 2, 3)] == ["gen1", "gen2", "gen3"]
    assert [out[f"gen{i}"]["temperature"] for i in (1, 2, 3)] == [1.0, 0.7, 1.0]
    generate.expand_rounds({"loop": {"rounds": 0, "gen": {"trainer": "generate"}, "dpo": {}}}, problems)
    assert problems and "rounds" in problems[0]


def test_plan_resolves_generated_data_by_name(tmp_path):
    from alignctl.config.compose import compose
    from alignctl.config.resolve import resolve

    resolved = resolve(compose(["recipe=iterative-dpo", f"output_root={tmp_path}"]), tmp_path / "run")
    by = {s.name: s for s in resolved.stages}
    assert list(by) == ["sft", "rm", "gen1", "dpo1", "gen2", "dpo2"]
    assert by["dpo2"].data.stage == "gen2" and by["dpo2"].data.path == str(tmp_path / "run/gen2/final")
    assert by["gen2"].source.path == str(tmp_path / "run/dpo1/final") and by["dpo2"].links["ref"].stage == "sft"
    with pytest.raises(ConfigError) as e:  # KTO-style output named by a DPO stage
        resolve(compose(["recipe=iterative-dpo", f"output_root={tmp_path}", "stages.round.gen.pairs=kto"]),
                     tmp_path / "run")
    assert "stages.dpo1.data: 'gen1' writes unpaired data" in str(e.value)


# -- the recipes end to end -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def iterative(tmp_path_factory, cache_root):
    """One run of iterative-dpo (seed 1: its RM score rises in both rounds), a re-run, and a run with round 2's
    temperature changed; one store."""
    from alignctl import pipeline
    from alignctl.config.compose import compose
    from alignctl.config.resolve import resolve

    logging.getLogger("alignctl").setLevel(logging.INFO)
    root = tmp_path_factory.mktemp("iterative")

    def run(name, *overrides):
        ov = ["recipe=iterative-dpo", "seed=1", f"output_root={cache_root}", f"store={root / 'store'}", *overrides]
        return pipeline.run(resolve(compose(ov), root / name), ov)

    return root, run("first"), run("again"), run("hot", "+stages.round.round2.gen.temperature=0.8")


def test_iterative_dpo_raises_the_reward_model_score_round_by_round(iterative):
    root, first, _, _ = iterative
    assert first["status"] == "completed"
    sft_score = stage(first, "dpo1")["metrics"]["before"]["eval_reward_mean"]
    r1 = stage(first, "dpo1")["metrics"]["after"]["eval_reward_mean"]
    r2 = stage(first, "dpo2")["metrics"]["after"]["eval_reward_mean"]
    assert r1 > sft_score and r2 >= r1, (sft_score, r1, r2)
    win_vs_sft = [stage(first, n)["metrics"]["after"]["eval_win_rate_ref"] for n in ("dpo1", "dpo2")]
    assert 0.5 < win_vs_sft[0] <= win_vs_sft[1], win_vs_sft
    assert stage(first, "dpo2")["metrics"]["before"]["eval_reward_mean"] == pytest.approx(r1)  # vs previous round
    # the generated data set loads like any data set and holds pairs the RM ranked
    from alignctl import data
    from conftest import read_spec

    spec = read_spec(root / "first/dpo2/spec.json")
    train, held = data.load(spec.data, "preference", "test")
    assert len(train) == stage(first, "gen2")["metrics"]["data"]["pairs"] > 50 and held is not None
    rows = [json.loads(x) for x in (root / "first/gen2/final/train.jsonl").read_text().splitlines()]
    assert all(r["score_chosen"] > r["score_rejected"] for r in rows)
    report = (root / "first/report.md").read_text()
    assert "## Generated data" in report and "dpo2 trained on it: held-out win rate vs its starting policy" in report
    assert report.count("| prompt | chosen | rejected | margin |") == 2
    # the reward-hacking monitors per round: each round's answers, and the round's drift from the reference
    for n in ("gen1", "gen2"):
        sig = stage(first, n)["metrics"]["data"]["monitor"]
        assert sig["monitor/reward_std"] > 0 and 0 < sig["monitor/length"] <= 16 and 0 <= sig["monitor/truncated"] <= 1
        assert -1 <= sig["monitor/length_corr"] <= 1
    assert report.count("Reward-hacking monitors per round") == 1
    table = report.split("Reward-hacking monitors per round", 1)[1].split("\n\n")[1].splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == ["| gen1", "| gen2"] and "| KL | fired |" in table[0]


def test_rerun_reuses_every_round_and_round2_temperature_regenerates_round2_only(iterative):
    _, first, again, hot = iterative
    assert all(s["reused_from"] for s in again["stages"])
    reused = {s["name"]: bool(s["reused_from"]) for s in hot["stages"]}
    assert reused == {"sft": True, "rm": True, "gen1": True, "dpo1": True, "gen2": False, "dpo2": False}
    assert stage(hot, "gen2")["fingerprint"] != stage(first, "gen2")["fingerprint"]


def test_rlaif_dpo_with_a_tiny_judge_runs_end_to_end(tmp_path, cache_root):
    from alignctl import pipeline
    from alignctl.config.compose import compose
    from alignctl.config.resolve import resolve

    ov = ["recipe=rlaif-dpo", f"output_root={cache_root}", f"store={tmp_path / 'store'}"]
    m = pipeline.run(resolve(compose(ov), tmp_path / "run"), ov)
    assert m["status"] == "completed"
    d = stage(m, "gen")["metrics"]["data"]
    assert d["judge"]["comparisons"] == d["prompts"] * 6  # k=4: 6 pairs per prompt, each asked in both orders
    assert 0 < d["judge"]["decisive"] <= d["judge"]["comparisons"] and d["pairs"] > 0
    assert (tmp_path / "run/gen/final/train.jsonl").is_file()
    again = pipeline.run(resolve(compose(ov), tmp_path / "run2"), ov)
    assert all(s["reused_from"] for s in again["stages"])


def test_bundled_judge_data_matches_its_generator():
    from alignctl.config.data_checks import BUILTIN_DIR

    pairs = [json.loads(x) for x in (BUILTIN_DIR / "prefs.jsonl").read_text().splitlines()]
    rows = [json.loads(x) for x in (BUILTIN_DIR / "judge.jsonl").read_text().splitlines()]
    assert rows == judge.training_rows(pairs), "judge.jsonl is stale: run `python -m alignctl.judge`"
    assert {r["completion"] for r in rows} == {" A", " B"} and len(rows) == 2 * len(pairs)
