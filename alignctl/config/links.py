"""The links of a stage to other models: one table that every module handling links reads (no torch, no TRL).

A stage names the models it uses with links: ``from`` (its initial weights), ``ref`` (the reference), ``reward``,
``value``, ``judge``, ``critic`` and ``audit``. :data:`LINKS` says of each what it must point at, whether it may name
a model outside the recipe (a folder, a Hub id ``org/repo[@revision]`` or a built-in tiny model), whether such a
model runs remote code only with the stage's ``trust_remote_code_links`` consent, whether it counts in the upstream
digest (alignctl.pipeline), its row label in ``alignctl plan`` and the key of its model folder's content check
(``StageSpec.model_check``). The resolvers (alignctl.config.resolve_links), fingerprint.py, store.py, pipeline.py,
views.py, launch.py and the stage lifecycle (alignctl.train) iterate this table instead of listing names
(tests/unit/test_links.py checks that no other module lists them).

An external link (not a stage of the recipe) loads with its own settings, recorded at plan time under the stage
spec's links (:class:`alignctl.config.types.LinkSpec`: ``revision``, ``trust_remote_code``;
alignctl.models.link_model_spec): its own revision
(``org/repo@<revision>``; a local path never splits on ``@``), remote code only with consent, and its own
tokenizer's chat template (``model.chat_template`` is the base model's and the recipe's stages'). ``eval.reward``
is not a stage link; it loads the same way, and never with remote code (:data:`EVAL_REWARD`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignctl import tiny
from alignctl.config import checks
from alignctl.config.data_checks import looks_local
from alignctl.config.model_checks import PKG_PREFIX, pkg_dir

if TYPE_CHECKING:
    from alignctl.config.types import StageSpec

CAUSAL_LM, CLASSIFIER = "causal_lm", "classifier"


@dataclass(frozen=True)
class Link:
    name: str  # the stage key: from, ref, reward, value, judge
    path_key: str  # the key of StageSpec.model_check for its model folder (the old spec key of its path)
    points_at: str  # what it must be: a language model (causal_lm) or a one-output classifier (classifier)
    external: bool  # may name a model folder, a Hub id or a built-in tiny model, not only an earlier stage
    consent: bool  # as an external model, runs remote code only when trust_remote_code_links lists it
    upstream: bool  # the linked stage's completed files count in the stage's upstream digest
    label: str  # its row in `alignctl plan`
    # a classifier link that also accepts a language model (its head then starts fresh): the plan note saying so
    causal_lm_note: str | None = None
    # may list several models (an ensemble: ``reward: [rm_a, rm_b]``) for the kinds that read them
    # (StageKind.ensemble_links); its members are the links ``reward``, ``reward.2``, ... (:func:`member_key`)
    many: bool = False
    # unset, the link takes the model of this other link (the reference: the `from` weights; the value model: the
    # reward model, with its load settings)
    defaults_to: str | None = None


LINKS: tuple[Link, ...] = (
    Link("from", "init_path", CAUSAL_LM, external=False, consent=False, upstream=True, label="policy"),
    Link("ref", "ref_path", CAUSAL_LM, external=False, consent=False, upstream=True, label="reference",
         defaults_to="from"),
    Link("reward", "reward_path", CLASSIFIER, external=True, consent=True, upstream=True, label="reward", many=True),
    Link("value", "value_path", CLASSIFIER, external=True, consent=True, upstream=True, label="value",
         causal_lm_note="is a language model: the value model starts from its weights with a freshly initialised "
                        "value head (as expected for PPO)", defaults_to="reward"),
    Link("judge", "judge_path", CAUSAL_LM, external=True, consent=True, upstream=True, label="judge"),
    # the language model that critiques and revises answers against principles (a critique stage; default: the
    # policy itself, as in Constitutional AI)
    Link("critic", "critic_path", CAUSAL_LM, external=True, consent=True, upstream=True, label="critic"),
    # an independent reward model that only measures (each update's answers, the held-out win rates), never trains
    Link("audit", "audit_path", CLASSIFIER, external=True, consent=True, upstream=True, label="audit reward"),
)
# `eval.reward`: the evaluation's reward model (alignctl.evaluate), loaded like an external reward link but never
# with remote code: evaluation settings are outside the fingerprint and have no consent key of their own.
EVAL_REWARD = Link("eval.reward", "reward_path", CLASSIFIER, external=True, consent=False, upstream=False,
                   label="eval reward")
BY_NAME: dict[str, Link] = {link.name: link for link in LINKS}
NAMES: tuple[str, ...] = tuple(BY_NAME)
EXTERNAL: tuple[Link, ...] = tuple(link for link in LINKS if link.external)
CONSENT: tuple[str, ...] = tuple(link.name for link in LINKS if link.consent)
UPSTREAM: tuple[str, ...] = tuple(link.name for link in LINKS if link.upstream)


def member_key(name: str, i: int) -> str:
    """The key in StageSpec.links of member ``i`` (from 0) of a link that lists several models: ``reward``,
    ``reward.2``, ``reward.3``, ... (the first member is the link itself: what a single model would be)."""
    return name if i == 0 else f"{name}.{i + 1}"


def row_of(key: str) -> Link:
    """The table row of a key of StageSpec.links (``reward.2`` -> reward)."""
    return BY_NAME[key.partition(".")[0]]


def member_keys(links: Mapping[str, Any], name: str) -> list[str]:
    """The keys of link ``name``'s models in a stage's links, in order (one for a single model, none when unset)."""
    return [k for k in links if k == name or k.startswith(name + ".")]


def path_key_of(key: str) -> str:
    """The key of a link's model folder in StageSpec.model_check (``reward_path``; a member: ``reward.2_path``)."""
    row = row_of(key)
    return row.path_key.replace("_path", key[len(row.name):] + "_path")


def hub_ref(value: str) -> tuple[str, str | None]:
    """``org/repo@revision`` -> (``org/repo``, ``revision``); without ``@`` the revision is None (the default
    branch). Only for Hub ids: a local path is never split."""
    repo, at, revision = str(value).partition("@")
    return (repo, revision) if at else (str(value), None)


def load_settings(stage: StageSpec, name: str) -> dict | None:
    """The load settings {revision, trust_remote_code} of an external link, or None for a stage of the recipe (or
    the base model), or no such link."""
    link = stage.link(name)
    if link is None or not link.external:
        return None
    return {"revision": link.revision, "trust_remote_code": link.trust_remote_code}


# -- what a local model folder holds (its config.json) ------------------------------------------------------------
def folder_config(path: str | Path) -> dict | None:
    """A model folder's config.json, or None when it has none (or it is not JSON)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def output_of(config: dict | None) -> str | None:
    """causal_lm / classifier from a config's ``architectures`` (e.g. LlamaForCausalLM, GPT2LMHeadModel,
    LlamaForSequenceClassification), None when it does not say."""
    archs = [a for a in (config or {}).get("architectures") or [] if isinstance(a, str)]
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return CLASSIFIER
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return CAUSAL_LM
    return None


def needs_remote_code(config: dict | None) -> bool:
    """A config whose model transformers cannot build from its own code: an ``auto_map`` (code shipped with the
    model) for a model type transformers does not know. With a known type, transformers ignores the shipped code
    unless remote code is allowed."""
    cfg = config or {}
    if not cfg.get("auto_map"):
        return False
    return not _native_model_type(str(cfg.get("model_type") or ""))


def _native_model_type(model_type: str) -> bool:
    """Whether transformers has the model family (its models/<type> folder), found without importing it."""
    from importlib.util import find_spec

    spec = find_spec("transformers")
    if not model_type or spec is None or not spec.submodule_search_locations:
        return False
    return (Path(list(spec.submodule_search_locations)[0]) / "models" / model_type.replace("-", "_")).is_dir()


def folder_kind_problems(link: Link, shown: str, config: dict | None, where: str, notes: list[str]) -> list[str]:
    """A local folder named by ``link`` holds the right kind of model (from config.json's ``architectures``): a
    reward model needs a trained score head, so a causal LM is refused; a value link accepts one with a note; a
    judge must be a language model."""
    found = output_of(config)
    if found is None or found == link.points_at:
        return []
    arch = ", ".join((config or {}).get("architectures") or [])
    if found == CAUSAL_LM and link.causal_lm_note:
        notes.append(f"{where}: {shown} {link.causal_lm_note}")
        return []
    if link.points_at == CLASSIFIER:
        return [f"{where}: {shown} is a language model ({arch}), not a reward model: a reward model needs a trained "
                "score head; train a reward stage (trainer: reward) and name it, or point at a "
                "*ForSequenceClassification model"]
    return [f"{where}: {shown} is a classifier ({arch}), not a language model; a {link.name} must be a causal LM "
            "(a language-model stage of this recipe, or a *ForCausalLM model)"]


def model_problems(path: str, rev: str | None, where: str, run: bool, notes: list[str],
                   gguf_file: str | None = None) -> list[str]:
    """A model location as plan checks it: a built-in tiny model, an installed ``pkg:`` folder, a local folder
    (config.json, tokenizer, safetensors; or ``gguf_file``, the base model's) or a Hub id at ``rev`` (cached or
    reachable; offline: a note for plan, an error for ``run``)."""
    if tiny.is_tiny(path):
        ok = tiny.tiny_arch(path) in tiny.TINY_ARCHS
        return [] if ok else [f"{where}: unknown built-in tiny model '{path}'; choose from "
                              f"{', '.join(tiny.TINY_PREFIX + a for a in tiny.TINY_ARCHS)}"]
    if str(path).startswith(PKG_PREFIX):
        folder = pkg_dir(path)
        if folder is None:
            return [f"{where}: the package of {path} is not installed"] if run else []
        return checks.local_model_problems(folder, where, gguf_file)
    if Path(path).is_absolute() or looks_local(path):
        return checks.local_model_problems(Path(path).expanduser(), where, gguf_file)
    problems, hub_notes = checks.hub_model_problems(path, rev, where, run)
    notes += hub_notes
    return problems


def shown(stage: StageSpec, link: Link) -> str | None:
    """What plan shows for a link: the stage it names, else its model (with ``@revision`` when it has one)."""
    keys = member_keys(stage.links, link.name)
    if len(keys) > 1:  # an ensemble: its members, and how their scores combine
        members = [_shown_one(stage.links[k]) for k in keys]
        return f"{', '.join(m for m in members if m)} ({ensemble_rule(stage.args)})"
    return _shown_one(stage.link(link.name))


def ensemble_rule(args: Mapping[str, Any]) -> str:
    """How an ensemble's scores combine, as plan shows it (PPO's reward_aggregate / reward_std_coef)."""
    rule = args.get("reward_aggregate", "mean")
    return f"mean - {args.get('reward_std_coef', 1.0)} x std" if rule == "mean_minus_std" else rule


def _shown_one(ln) -> str | None:
    if ln is None:
        return None
    if ln.stage:
        return ln.stage
    if not ln.path:
        return None
    return f"{ln.path}@{ln.revision}" if ln.external and ln.revision else str(ln.path)
