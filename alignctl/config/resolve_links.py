"""Resolve a stage's links (config/links.py names them): ``from`` (always: an earlier stage, else the base model),
``ref``, and the links that may name a model outside the recipe (reward, value, judge: a folder, a Hub id
``org/repo[@revision]`` with its own revision, a built-in tiny model), each checked like the base model and never run
with remote code unless the stage consents (``trust_remote_code_links``). No torch."""

from __future__ import annotations

from pathlib import Path

from alignctl import tiny
from alignctl.config import links as link_table
from alignctl.config.data_checks import looks_local
from alignctl.config.model_checks import PKG_PREFIX
from alignctl.config.resolve_context import Context
from alignctl.config.types import LinkSpec
from alignctl.errors import suggest
from alignctl.stages import STAGES, StageKind


def resolve_links(raw: dict, kind: StageKind, name: str, ctx: Context, where: str
                  ) -> tuple[dict[str, LinkSpec], list[str]]:
    """The stage's links: ``from`` always, then each link its kind takes, in the link table's order. An unset link
    that defaults to another (Link.defaults_to: the value model to the reward model) takes that link's model and,
    once the other's remote code is settled, its load settings."""
    src, problems = _source(raw, kind, ctx, where)
    base = ctx.model.name_or_path
    links = {"from": LinkSpec("from", str(ctx.run_dir / src / "final") if src else base, stage=src)}
    if "ref" in kind.links:
        links["ref"], more = _ref(raw.get("ref", src), src, base, ctx, where)
        problems += more
    for link in link_table.EXTERNAL:
        if link.name in kind.links:
            members, more = _members(raw.get(link.name), link, kind, where)
            problems += more
            for i, value in enumerate(members):
                key = link_table.member_key(link.name, i)
                links[key], more = _model_link(value, link, where, name, ctx, key)
                problems += more
    unset = [row for row in link_table.EXTERNAL
             if row.name in kind.links and raw.get(row.name) is None and row.defaults_to in links]
    for row in unset:  # checked once, as the link it defaults to
        links[row.name] = LinkSpec(row.name, links[row.defaults_to].path, stage=links[row.defaults_to].stage)
    links, more = _remote_code(raw, links, kind, ctx, where)
    problems += more
    for row in unset:
        links[row.name] = links[row.defaults_to].replace(kind=row.name)
    return links, problems + _audit_problems(links, where)


def _audit_problems(links: dict[str, LinkSpec], where: str) -> list[str]:
    """An audit measures what the stage optimises or selects by its reward: it must be another model."""
    audit = links.get("audit")
    if audit is None or not audit.path:
        return []
    named = audit.stage or audit.path
    if any((links[k].stage or links[k].path) == named for k in link_table.member_keys(links, "reward")):
        return [f"{where}.audit: '{named}' is also the stage's reward; an audit must be independent of it: name a "
                "reward model trained apart (another seed, other pairs) or drop audit"]
    return []


def _source(raw: dict, kind: StageKind, ctx: Context, where: str) -> tuple[str | None, list[str]]:
    """Chaining: `from` names an earlier stage; the stage's initial weights are its final/."""
    src, earlier = raw.get("from"), ctx.earlier()
    if src is not None and not isinstance(src, str):
        return None, [f"{where}.from: must name one earlier stage, got {src!r}"]
    if src is not None and src not in earlier:
        return None, [f"{where}.from: '{src}' names no earlier stage (earlier stages: {', '.join(earlier) or 'none'})"]
    if src is not None and STAGES[earlier[src]].output != link_table.CAUSAL_LM and kind.output == link_table.CAUSAL_LM:
        return src, [f"{where}.from: '{src}' is a {earlier[src]} stage (a classifier); a {kind.name} stage must "
                     "start from a language model"]
    return src, []


def _ref(ref, src: str | None, base: str, ctx: Context, where: str) -> tuple[LinkSpec, list[str]]:
    """The reference: an earlier language-model stage, by default the `from` stage (or the base model)."""
    earlier, problems = ctx.earlier(), []
    if ref is not None and not isinstance(ref, str):
        problems.append(f"{where}.ref: must name one earlier stage, got {ref!r}")
        ref = src
    elif ref is not None and ref != src and ref not in earlier:
        problems.append(f"{where}.ref: '{ref}' names no earlier stage")
    elif ref is not None and ref in earlier and STAGES[earlier[ref]].output != link_table.CAUSAL_LM:
        lms = [n for n, k in earlier.items() if STAGES[k].output == link_table.CAUSAL_LM]
        problems.append(f"{where}.ref: '{ref}' is a {earlier[ref]} stage (a classifier with a score head, not a "
                        f"language model); the reference must be a language-model stage (earlier: "
                        f"{', '.join(lms) or 'none'}) or omitted (the `from` stage)")
    return LinkSpec("ref", str(ctx.run_dir / ref / "final") if ref else base, stage=ref), problems


def _members(value, link: link_table.Link, kind: StageKind, where: str) -> tuple[list, list[str]]:
    """The models a link names: one (or None: unset), or for a link the kind reads as an ensemble, a list of them
    (``reward: [rm_a, rm_b]``), each named once."""
    if not isinstance(value, (list, tuple)):
        return [value], []
    key = f"{where}.{link.name}"
    if link.name not in kind.ensemble_links:
        takes = [k for k, s in STAGES.items() if link.name in s.ensemble_links]
        return [None], [f"{key}: names one model; a list (an ensemble) is read by {', '.join(takes) or 'no'} stages "
                        f"only, not by a {kind.name} stage"]
    if not value or any(not isinstance(v, str) or not v for v in value):
        return [None], [f"{key}: an ensemble must list one or more reward stages or models by name, got {value!r}"]
    twice = sorted({v for v in value if value.count(v) > 1})
    if twice:
        return [None], [f"{key}: {', '.join(twice)} listed twice; an ensemble names each reward model once"]
    return list(value), []


def _model_link(value, link: link_table.Link, where: str, name: str, ctx: Context, key: str | None = None
                ) -> tuple[LinkSpec, list[str]]:
    """A link that may name a model outside the recipe (reward, value, judge): an earlier stage's final/, or a model
    path / Hub id (``external``, with the Hub id's own revision); unset: a link with no path. ``key``: the member's
    key in the stage's links (an ensemble's ``reward.2``), by default the link's name."""
    key, earlier = key or link.name, ctx.earlier()
    if value is None:
        return LinkSpec(key, None), []
    value = str(value)
    if value in earlier:
        return LinkSpec(key, str(ctx.run_dir / value / "final"), stage=value), _stage_kind_problems(
            value, link, where, ctx)
    if value in ctx.entries:
        what = "is this stage itself" if value == name else "comes later in the recipe"
        return LinkSpec(key, None, stage=value), [f"{where}.{key}: '{value}' {what}; a {key} link must name an "
                                                  "earlier stage"]
    if tiny.is_tiny(value):
        if tiny.tiny_arch(value) not in tiny.TINY_ARCHS:
            return LinkSpec(key, value, external=True), [
                f"{where}.{key}: unknown built-in tiny model '{value}'; choose from "
                f"{', '.join(tiny.TINY_PREFIX + a for a in tiny.TINY_ARCHS)}"]
        return LinkSpec(key, value, external=True), []
    if not looks_local(value) and "/" in value:  # a Hub id, `org/repo@revision` pinning its own revision
        repo, rev = link_table.hub_ref(value)
        if rev == "" or "/" not in repo:
            return LinkSpec(key, None), [f"{where}.{key}: '{value}' is not a Hub id (org/repo, or "
                                         "org/repo@<revision> to pin one)"]
        return LinkSpec(key, repo, external=True, revision=rev), []
    if looks_local(value) and Path(value).expanduser().exists():
        return LinkSpec(key, str(Path(value).expanduser().absolute()), external=True), []
    return LinkSpec(key, None), [f"{where}.{key}: '{value}' names no stage of this recipe{suggest(value, ctx.entries)}"
                                 f" and no existing model path (earlier stages: {', '.join(earlier) or 'none'})"]


def _stage_kind_problems(value: str, link: link_table.Link, where: str, ctx: Context) -> list[str]:
    """A link naming an earlier stage: that stage's output is what the link must point at (a value link also takes a
    language model, with a note)."""
    earlier = ctx.earlier()
    output = STAGES[earlier[value]].output
    if output == link_table.CAUSAL_LM and output != link.points_at and link.causal_lm_note:
        ctx.notes.append(f"{where}.{link.name}: stage '{value}' {link.causal_lm_note}")
        return []
    if output == link.points_at:
        return []
    fit = [n for n, k in earlier.items() if STAGES[k].output == link.points_at]
    if link.points_at == link_table.CLASSIFIER:
        return [f"{where}.{link.name}: '{value}' is a {earlier[value]} stage, not a reward stage; name a stage with "
                f"`trainer: reward` (earlier reward stages: {', '.join(fit) or 'none'})"]
    return [f"{where}.{link.name}: '{value}' is a {earlier[value]} stage, not a language model; name a "
            f"language-model stage (earlier: {', '.join(fit) or 'none'}) or a causal LM path"]


def _remote_code(raw: dict, links: dict[str, LinkSpec], kind: StageKind, ctx: Context, where: str
                 ) -> tuple[dict[str, LinkSpec], list[str]]:
    """Links to models outside the recipe (paths, Hub ids): checked like the base model (folder contents, Hub at the
    link's own revision, the kind of model in the folder), and never run with remote code unless the stage lists
    the link in ``trust_remote_code_links`` (model.trust_remote_code alone covers the base model and the stages
    trained from it only). Returns the links with each external one's remote-code setting."""
    consent, problems = _consent(raw.get("trust_remote_code_links"), kind, ctx, where)
    trusted = ctx.model.trust_remote_code is True
    out = dict(links)
    for name, link in links.items():
        if not link.external or not link.path or tiny.is_tiny(link.path) or link.path.startswith(PKG_PREFIX):
            continue  # a built-in tiny model (or an installed package's folder): no code of its own
        row = link_table.row_of(name)
        allowed = row.consent and row.name in consent and trusted
        out[name] = link.replace(trust_remote_code=allowed)
        if trusted and not allowed:
            problems.append(f"{where}.{name}: model.trust_remote_code is on and would also run code shipped with "
                            f"'{link.path}'; allow it explicitly with {where}.trust_remote_code_links=[{row.name}], or "
                            "use a model that needs no remote code")
        problems += external_model_problems(row, out[name], f"{where}.{name}", ctx,
                                            how=f"model.trust_remote_code=true and {where}.trust_remote_code_links="
                                                f"[{row.name}]")
    return out, problems


def _consent(consent, kind: StageKind, ctx: Context, where: str) -> tuple[set[str], list[str]]:
    """``trust_remote_code_links``: a list of the stage's own model links, only with model.trust_remote_code."""
    can = [name for name in link_table.CONSENT if name in kind.links]
    if consent is None:
        return set(), []
    if not isinstance(consent, list) or any(c not in can for c in consent):
        return set(), [f"{where}.trust_remote_code_links: must be a list of this stage's model links "
                       f"({', '.join(can) or 'none'}), got {consent!r}"]
    if ctx.model.trust_remote_code is not True:
        return set(consent), [f"{where}.trust_remote_code_links: remote code for {', '.join(consent)} also needs "
                              "model.trust_remote_code=true"]
    return set(consent), []


def external_model_problems(row: link_table.Link, link: LinkSpec, where: str, ctx: Context,
                            how: str | None) -> list[str]:
    """A model outside the recipe named by link ``row``: its location (folder contents; a Hub id at its own revision),
    and for a local folder the kind of model it holds and whether it needs remote code it is not allowed.
    ``how``: what allows remote code for this link (None: nothing does)."""
    path = link.path
    problems = link_table.model_problems(path, link.revision, where, ctx.run, ctx.notes)
    if problems or not Path(path).is_absolute():
        return problems
    config = link_table.folder_config(path)
    problems += link_table.folder_kind_problems(row, path, config, where, ctx.notes)
    if link_table.needs_remote_code(config) and not link.trust_remote_code:
        problems.append(f"{where}: {path} needs Python code shipped with it (config.json auto_map, model type "
                        f"{(config or {}).get('model_type')!r} unknown to transformers); "
                        + (f"allow it with {how}, or use a model transformers loads by itself" if how else
                           "alignctl never runs remote code for it: use a model transformers loads by itself"))
    return problems
