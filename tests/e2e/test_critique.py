"""Critique stages (alignctl.stages.critique, Constitutional AI): the principle reaches the critic's prompts, a
revision identical to its original yields no row, the `constitutional` recipe trains SFT on the revisions and DPO on
(revision > original) with the share the reward model preferred in the report, and a re-run reuses every stage."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from alignctl.critique import CritiqueJob
from alignctl.errors import StageFailed
from alignctl.stages.critique import CritiqueConfig
from conftest import one_thread_collecting_log

pytestmark = pytest.mark.slow

LOG: list[str] = []
PRINCIPLES = ["the answer must be warm and kind", "the answer must be clear and calm"]


@pytest.fixture(scope="module", autouse=True)
def single_thread_and_log():
    with one_thread_collecting_log(LOG):
        yield


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, cache_root):
    from alignctl import pipeline
    from alignctl.config.compose import compose
    from alignctl.config.resolve import resolve

    root = tmp_path_factory.mktemp("cai")
    out = []
    for n in (1, 2):  # the second run finds every stage in the store
        ov = ["recipe=constitutional", f"output_root={cache_root}", f"store={root / 'store'}"]
        out.append((root / f"run{n}", pipeline.run(resolve(compose(ov), root / f"run{n}"), ov)))
    return out


class EchoCritic:
    """A critic that answers every request with the principle its last request names: what reaches its prompt comes
    back as the critique and as the revision."""

    def __init__(self, tokenizer):
        import torch

        self.tok, self.seen, self.training = tokenizer, [], False
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=4096)

    def parameters(self):
        return iter([self.weight])

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def generate(self, input_ids, attention_mask, generation_config):
        import torch

        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            text = self.tok.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
            self.seen.append(text)
            named = max(PRINCIPLES, key=lambda p: text.rfind(p))
            rows.append(ids.tolist() + self.tok(named, add_special_tokens=False)["input_ids"] +
                        [self.tok.eos_token_id])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.tok.eos_token_id] * (width - len(r)) for r in rows])


class EchoJob(CritiqueJob):
    def __init__(self, tokenizer, **args):
        spec = SimpleNamespace(args={"temperature": 0.0, "max_new_tokens": 24, **args}, name="cai", options={},
                               links={}, link=lambda name: None)
        super().__init__(SimpleNamespace(spec=spec, tokenizer=tokenizer), CritiqueConfig)
        self.critic = EchoCritic(tokenizer)

    def _critic(self):
        return self.critic, self.ctx.tokenizer


def _tokenizer(recipe_run):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(recipe_run[0][0] / "sft" / "final")


def test_the_principle_reaches_the_critique_and_the_revision_request(recipe_run):
    tok = _tokenizer(recipe_run)
    job = EchoJob(tok, revisions=2)
    prompts = [[{"role": "user", "content": f"tell me about the {w} ."}] for w in ("lake", "bridge", "song", "road")]
    originals = ["the lake is cold .", "the bridge is harsh .", "the song is gloomy .", "the road is rude ."]
    triples = job._revise(prompts, originals, PRINCIPLES)
    assert len(job.critic.seen) == 4 * 2 * 2  # prompts x rounds x (critique, revision)
    drawn = set()
    for t in triples:
        assert len(t["rounds"]) == 2
        for r in t["rounds"]:  # the echo: what the critic was asked about is the principle of that round
            assert r["critique"] == r["principle"] == r["revision"]
            drawn.add(r["principle"])
        assert t["final"] == t["rounds"][-1]["revision"] and t["changed"]
    assert drawn == set(PRINCIPLES)  # drawn per prompt and round with the stage's seed
    first = job.critic.seen[0]  # the critique request follows the prompt and the policy's own answer
    assert "tell me about the lake" in first and "the lake is cold" in first and "say where the answer falls" in first
    assert EchoJob(tok, revisions=2)._revise(prompts, originals, PRINCIPLES) == triples  # seeded: the same again


def test_a_revision_identical_to_its_original_yields_no_pair(recipe_run):
    tok = _tokenizer(recipe_run)
    job = EchoJob(tok)
    prompts = ["describe the lake .", "describe the song ."]
    originals = ["the lake is cold .", PRINCIPLES[0]]  # the critic's revision of the second is its original
    triples = job._revise(prompts, originals, PRINCIPLES[:1])
    (train, test), files = job._rows(prompts, triples, None)
    assert [t["changed"] for t in triples] == [True, False] and test is None
    assert train == [{"prompt": "describe the lake .", "chosen": PRINCIPLES[0], "rejected": "the lake is cold ."}]
    assert files["sft"] == [{"prompt": "describe the lake .", "completion": PRINCIPLES[0]}]
    # with a scorer that prefers the original, nothing is kept: the stage fails, naming what to change
    with pytest.raises(StageFailed, match="1 revised, 0 preferred by the scorer, 0 held out"):
        job._rows(prompts, triples, [[1.0, 0.0], [0.0, 0.0]])


def test_constitutional_trains_sft_on_revisions_and_dpo_on_revision_over_original(recipe_run):
    run_dir, m = recipe_run[0]
    stages = {s["name"]: s for s in m["stages"]}
    assert m["status"] == "completed" and list(stages) == ["sft", "rm", "rm_audit", "cai", "sft_rev", "dpo"]
    data = stages["cai"]["metrics"]["data"]
    final = run_dir / "cai" / "final"
    pairs = [json.loads(line) for line in (final / "pairs.jsonl").read_text().splitlines()]
    sft = [json.loads(line) for line in (final / "sft.jsonl").read_text().splitlines()]
    triples = [json.loads(line) for line in (final / "triples.jsonl").read_text().splitlines()]
    assert len(triples) == data["prompts"] == 128 and data["pairs"] == len(pairs) > 0
    assert data["preferred"] == sum(t["kept"] for t in triples) and 0 < data["preferred_share"] < 1
    audit = data["audit"]  # the independent judge scored every revised answer, and selected nothing
    assert audit["model"] == "rm_audit" and audit["revised"] == data["revised"] == sum(t["changed"] for t in triples)
    assert 0 <= audit["preferred"] <= audit["revised"] and audit["score_revision"] is not None
    for p in pairs:  # every pair: a revision the reward model scored above its original
        assert p["score_chosen"] > p["score_rejected"] and p["chosen"] != p["rejected"]
    assert all(s["messages"][-1]["role"] == "assistant" for s in sft) and len(sft) == len(pairs)
    assert {s["messages"][-1]["content"] for s in sft} == {p["chosen"][-1]["content"] for p in pairs}
    assert stages["sft_rev"]["status"] == stages["dpo"]["status"] == "completed"
    report = (run_dir / "report.md").read_text()
    assert "## Critiques and revisions" in report and "it preferred the revision to the original for" in report
    assert "Audit rm_audit (never used to select): it prefers the revision for" in report
    assert "| prompt | original | principle | critique | revision |" in report


def test_a_re_run_reuses_every_stage(recipe_run):
    (_, first), (_, second) = recipe_run
    assert second["status"] == "completed"
    assert all(s["reused_from"] for s in second["stages"]), [(s["name"], s["reused_from"]) for s in second["stages"]]
    a, b = (next(s for s in m["stages"] if s["name"] == "cai")["metrics"]["data"]["pairs"] for m in (first, second))
    assert a == b


def test_a_judge_scores_revisions_in_both_orders_beside_the_reward_model(recipe_run, cache_root, tmp_path):
    """judge: a causal LM (here the SFT model) compares original and revision under the stage's principles, in both
    orders; its decisive wins add to the reward model's scores, and its statistics reach the manifest."""
    from alignctl import pipeline
    from alignctl.config.compose import compose
    from alignctl.config.resolve import resolve

    ov = ["recipe=constitutional", f"output_root={cache_root}", f"store={tmp_path / 'store'}", "stages.cai.judge=sft",
          "stages.cai.num_prompts=32", "stages.cai.eval_size=0"]
    m = pipeline.run(resolve(compose(ov), tmp_path / "run"), ov)
    d = next(s for s in m["stages"] if s["name"] == "cai")["metrics"]["data"]
    assert d["scorers"] == ["rm", "judge sft"] and d["judge"]["comparisons"] == d["prompts"] == 32
    assert d["judge"]["decisive"] + d["judge"]["ties"] == 32


def test_hh_rlhf_as_published_on_qwen2_multi_turn_prompts_keep_their_history(cache_root, tmp_path):
    """The critique stage on HH-RLHF's published layout (implicit-prompt pairs, "Human:/Assistant:" transcripts,
    train/test splits) with the Qwen2 architecture: multi-turn prompts keep every earlier turn in the SFT rows and
    pairs, and the SFT and DPO stages train on them."""
    from pathlib import Path

    from alignctl import pipeline
    from alignctl.config.compose import compose
    from alignctl.config.resolve import resolve

    hh = Path(__file__).resolve().parents[1] / "fixtures" / "public" / "hh_rlhf"
    ov = ["recipe=constitutional", "model=tiny-qwen2", f"output_root={cache_root}", f"store={tmp_path / 'store'}",
          f"stages.cai.data={{path: '{hh}', split: train, eval_split: test}}", "stages.cai.num_prompts=64"]
    m = pipeline.run(resolve(compose(ov), tmp_path / "run"), ov)
    assert m["status"] == "completed" and all(s["status"] == "completed" for s in m["stages"])
    final = tmp_path / "run" / "cai" / "final"
    sft = [json.loads(line) for line in (final / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (final / "pairs.jsonl").read_text().splitlines()]
    assert sft and len(sft) == len(pairs)
    for row, pair in zip(sft, pairs):  # the same conversation: every earlier turn, then the final revision
        assert row["messages"][:-1] == pair["prompt"] and row["messages"][-1] == pair["chosen"][-1]
        assert pair["prompt"][-1]["role"] == "user" and pair["chosen"][-1]["role"] == "assistant"
    assert any(sum(t["role"] == "user" for t in p["prompt"]) > 1 for p in pairs)  # multi-turn prompts among them
