"""Layouts of public data sets -> TRL's formats, one row at a time (only ``alignctl.data`` calls this).

``convert(row, layout, data_kind, system_turns)`` turns one record of a known layout into the
TRL format a stage of that data kind reads, and drops the columns the stage does not need (so
TRL does not misread them, e.g. UltraChat's string ``prompt`` next to its ``messages``). The
same function checks the first record at plan time and maps every record at load time.

Layouts (``format:`` of a data set; ``auto`` recognises them from the columns):

* ``trl``: TRL's own formats (``messages``, ``text``, ``prompt``/``completion``,
  ``prompt``/``chosen``/``rejected``, ``prompt``/``completion``/``label``), including the
  HuggingFaceH4 ones: UltraChat/no_robots (``prompt`` + ``messages``: the messages are used) and
  UltraFeedback-binarized (string ``prompt`` + ``chosen``/``rejected`` conversations that repeat it:
  the prompt is split off, so the completions hold the assistant turns only);
* ``hh``: Anthropic/hh-rlhf ``chosen``/``rejected`` transcripts of ``\\n\\nHuman:``/``\\n\\nAssistant:`` turns;
* ``sharegpt``: ``conversations`` of ``{from, value}`` turns (human/gpt/system), as teknium/OpenHermes-2.5;
* ``alpaca``: ``instruction``/``input``/``output`` (tatsu-lab/alpaca; its ``text`` column is ignored);
* ``orca``: ``system``/``question``/``chosen``/``rejected`` strings (Intel/orca_dpo_pairs);
* ``pku``: ``prompt``/``response_0``/``response_1``/``better_response_id`` (PKU-Alignment/PKU-SafeRLHF).

Everything that is conversational at the source (or HH) ends conversational, so every stage applies
the same chat template. No torch, no datasets: plain Python on dicts.
"""

from __future__ import annotations

import re
from typing import Any

LAYOUTS = {
    "auto": "recognise the layout from the columns (the default)",
    "trl": "TRL's formats as they are (UltraChat/no_robots messages, UltraFeedback-binarized pairs included)",
    "hh": "chosen/rejected transcripts of '\\n\\nHuman:' / '\\n\\nAssistant:' turns (Anthropic/hh-rlhf)",
    "sharegpt": "conversations of {from, value} turns, roles human/gpt/system (teknium/OpenHermes-2.5)",
    "alpaca": "instruction/input/output (tatsu-lab/alpaca)",
    "orca": "system/question/chosen/rejected strings (Intel/orca_dpo_pairs)",
    "pku": "prompt/response_0/response_1/better_response_id (PKU-Alignment/PKU-SafeRLHF)",
}
SYSTEM_TURNS = ("keep", "merge", "drop")
REQUIRED = {
    "hh": ("chosen", "rejected"),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "orca": ("question", "chosen", "rejected"),
    "pku": ("prompt", "response_0", "response_1", "better_response_id"),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system", "tool": "tool",
                  "function_call": "assistant", "observation": "tool"}
CONVERSATION_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected")
COMPLETION_COLUMNS = ("completion", "chosen", "rejected", "messages")
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ?")


class FormatError(ValueError):
    """A record that does not fit its layout; the message names the column."""


def is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _is_hh(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip("\n").startswith("Human:") and "\n\nAssistant:" in value


def _is_from_value(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "from" in value[0] \
        and "value" in value[0]


def detect(row: dict[str, Any]) -> str:
    """The layout of a record, from its columns (and, for HH and ShareGPT, its values)."""
    cols = set(row)
    if _is_from_value(row.get("conversations")):
        return "sharegpt"
    if set(REQUIRED["pku"]) <= cols:
        return "pku"
    if set(REQUIRED["orca"]) <= cols and "prompt" not in cols:
        return "orca"
    if set(REQUIRED["alpaca"]) <= cols and not cols & {"messages", "prompt", "chosen"}:
        return "alpaca"
    if "prompt" not in cols and _is_hh(row.get("chosen")) and _is_hh(row.get("rejected")):
        return "hh"
    return "trl"


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def hh_turns(text: str, column: str) -> list[dict]:
    """An HH transcript as messages: Human -> user, Assistant -> assistant."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise FormatError(f"column '{column}' is not an HH transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...')")
    return [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
            for role, content in zip(parts[1::2], parts[2::2])]


def _split_last_answer(turns: list[dict], column: str) -> tuple[list[dict], list[dict]]:
    """(all turns before the last assistant turn, that turn and what follows)."""
    last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=None)
    if last is None:
        raise FormatError(f"column '{column}' has no assistant turn")
    return turns[:last], turns[last:]


def _split_pair(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen answer, rejected answer) of two conversations that share their first turns: the prompt is every
    turn before the last assistant turn; if the two differ earlier, the turns they share (TRL's rule)."""
    prompt, chosen_answer = _split_last_answer(chosen, "chosen")
    prompt_r, rejected_answer = _split_last_answer(rejected, "rejected")
    if prompt != prompt_r:
        n = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
        prompt, chosen_answer, rejected_answer = chosen[:n], chosen[n:], rejected[n:]
    return prompt, chosen_answer, rejected_answer


def _from_hh(row: dict) -> dict:
    prompt, chosen, rejected = _split_pair(hh_turns(row["chosen"], "chosen"), hh_turns(row["rejected"], "rejected"))
    return {**_rest(row, ("chosen", "rejected")), "prompt": prompt, "chosen": chosen, "rejected": rejected}


def _sharegpt_messages(turns: Any, column: str) -> list[dict]:
    if isinstance(turns, dict):
        turns = [turns]
    if not _is_from_value(turns):
        raise FormatError(f"column '{column}' is not a list of {{from, value}} turns")
    out = []
    for t in turns:
        role = SHAREGPT_ROLES.get(str(t.get("from")).lower())
        if role is None:
            raise FormatError(f"column '{column}': unknown ShareGPT role {t.get('from')!r} "
                              f"(known: {', '.join(sorted(SHAREGPT_ROLES))})")
        out.append({"role": role, "content": t.get("value") or ""})
    return out


def _from_sharegpt(row: dict) -> dict:
    out = _rest(row, ("conversations",))
    out["messages"] = _sharegpt_messages(row["conversations"], "conversations")
    for col in ("chosen", "rejected", "completion", "prompt"):
        if _is_from_value(row.get(col)) or (isinstance(row.get(col), dict) and "from" in row[col]):
            out[col] = _sharegpt_messages(row[col], col)
    if "chosen" in out and "rejected" in out and "prompt" not in out:
        out["prompt"] = out.pop("messages")  # pair sets in ShareGPT style: the conversation is the prompt
    return out


def _from_alpaca(row: dict) -> dict:
    text = str(row.get("instruction") or "")
    if row.get("input"):
        text = f"{text}\n\n{row['input']}"
    return {**_rest(row, ("instruction", "input", "output", "text")),
            "messages": _user(text) + _assistant(str(row.get("output") or ""))}


def _from_orca(row: dict) -> dict:
    prompt = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + _user(row["question"])
    return {**_rest(row, ("system", "question")), "prompt": prompt, "chosen": row["chosen"],
            "rejected": row["rejected"]}


def _from_pku(row: dict) -> dict:
    better = row["better_response_id"]
    if isinstance(better, bool) or better not in (0, 1):
        raise FormatError(f"column 'better_response_id' must be 0 or 1, got {better!r}")
    chosen, rejected = row[f"response_{better}"], row[f"response_{1 - better}"]
    return {**_rest(row, ("prompt", "response_0", "response_1", "better_response_id")), "prompt": _user(row["prompt"]),
            "chosen": chosen, "rejected": rejected}


def _rest(row: dict, used: tuple[str, ...]) -> dict:
    """What a converted layout keeps besides its TRL columns: a KTO label; its other columns are dropped."""
    return {k: v for k, v in row.items() if k not in used and k == "label"}


CONVERTERS = {"hh": _from_hh, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca, "orca": _from_orca,
              "pku": _from_pku}


def to_trl(row: dict[str, Any], layout: str) -> dict[str, Any]:
    """A record of ``layout`` in TRL's columns (other columns kept; ``shape`` drops them)."""
    if layout == "auto":
        layout = detect(row)
    if layout in CONVERTERS:
        missing = [c for c in REQUIRED[layout] if c not in row]
        if missing:
            raise FormatError(f"format {layout} needs column {', '.join(repr(c) for c in missing)}; "
                              f"has {sorted(row)}")
        return CONVERTERS[layout](row)
    row = dict(row)
    if "messages" not in row and is_conversation(row.get("conversations")):  # role/content turns under that name
        row["messages"] = row.pop("conversations")
    return row


def _wrap_answers(row: dict) -> dict:
    """Conversational prompt with string completions: the completions become assistant turns."""
    if is_conversation(row.get("prompt")):
        for col in ("completion", "chosen", "rejected"):
            if isinstance(row.get(col), str):
                row[col] = _assistant(row[col])
    return row


def _extract_prompt(row: dict) -> dict:
    """Pairs whose chosen/rejected repeat the prompt get it split off, also when a ``prompt`` column stands beside
    them (UltraFeedback-binarized: a string prompt and full conversations). String pairs without any prompt are
    left to TRL's ``maybe_extract_prompt`` (data.load runs it)."""
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if is_conversation(chosen) and is_conversation(rejected):
        if is_conversation(prompt):
            if chosen[:len(prompt)] == prompt and rejected[:len(prompt)] == prompt:
                row["chosen"], row["rejected"] = chosen[len(prompt):], rejected[len(prompt):]
        elif any(m["role"] != "assistant" for m in chosen):  # the conversations hold the prompt
            row["prompt"], row["chosen"], row["rejected"] = _split_pair(chosen, rejected)
        elif isinstance(prompt, str):  # a string prompt beside assistant-only answers: a user turn
            row["prompt"] = _user(prompt)
    elif isinstance(prompt, str) and prompt and isinstance(chosen, str) and isinstance(rejected, str) \
            and chosen.startswith(prompt) and rejected.startswith(prompt):
        row["chosen"], row["rejected"] = chosen[len(prompt):], rejected[len(prompt):]
    return row


def _prompt_of_messages(messages: list[dict]) -> list[dict]:
    """A conversation as a prompt: every turn before its last assistant turn."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
    return messages[:last]


def shape(row: dict[str, Any], data_kind: str) -> tuple[dict[str, Any], str | None]:
    """Keep what a stage of ``data_kind`` reads; returns (row, note) where the note says what was ignored (None when
    nothing worth saying). A row that fits no target is returned unchanged, for the column check to report."""
    cols = set(row)
    pair = {"chosen", "rejected"} <= cols
    row = _wrap_answers(_extract_prompt(dict(row)) if pair else dict(row))
    if data_kind == "sft":
        if "messages" in row:
            return {"messages": row["messages"]}, None
        if {"prompt", "completion"} <= cols:
            return {"prompt": row["prompt"], "completion": row["completion"]}, None
        if "text" in row:
            return {"text": row["text"]}, None
        if pair and "prompt" in row:
            if is_conversation(row["prompt"]) or is_conversation(row["chosen"]):
                return {"messages": list(row["prompt"]) + list(row["chosen"])}, "used the chosen answers for SFT"
            return {"prompt": row["prompt"], "completion": row["chosen"]}, "used the chosen answers for SFT"
        return row, None
    if data_kind == "preference" or (data_kind == "unpaired" and pair and "label" not in cols):
        if pair:
            return {k: row[k] for k in ("prompt", "chosen", "rejected") if k in row}, None
        return row, None
    if data_kind == "unpaired":
        if {"prompt", "completion", "label"} <= cols:
            return {k: row[k] for k in ("prompt", "completion", "label")}, None
        return row, None
    # prompt-only data (ppo, grpo, rloo): the prompt; completions are ignored, other columns kept (GRPO passes them
    # to reward functions, e.g. `solution`)
    held = [c for c in COMPLETION_COLUMNS if c in cols]
    if is_conversation(row.get("messages")) and not is_conversation(row.get("prompt")):
        prompt = _prompt_of_messages(row["messages"])  # UltraChat/no_robots: the conversation, not its string prompt
    elif "prompt" in row:
        prompt = row["prompt"]
    else:
        return row, None
    out = {k: v for k, v in row.items() if k not in COMPLETION_COLUMNS and k not in ("label", "prompt_id")}
    out["prompt"] = prompt
    note = f"used its prompts only (ignored: {', '.join(held)})" if held else None
    return out, note


def system_turns(row: dict[str, Any], how: str) -> dict[str, Any]:
    """keep | merge (fold a system turn into the first user turn) | drop (remove system turns)."""
    if how == "keep":
        return row
    row = dict(row)
    for col in CONVERSATION_COLUMNS:
        turns = row.get(col)
        if not is_conversation(turns) or not any(m["role"] == "system" for m in turns):
            continue
        system = "\n\n".join(str(m.get("content") or "") for m in turns if m["role"] == "system")
        rest = [dict(m) for m in turns if m["role"] != "system"]
        if how == "merge" and system:
            first_user = next((m for m in rest if m["role"] == "user"), None)
            if first_user is None:
                rest.insert(0, {"role": "user", "content": system})
            else:
                first_user["content"] = f"{system}\n\n{first_user.get('content') or ''}"
        row[col] = rest
    return row


def convert(row: dict[str, Any], layout: str, data_kind: str,
            system: str = "keep") -> tuple[dict[str, Any], str | None]:
    """One record -> the TRL format of ``data_kind``; raises FormatError naming the column on a bad record."""
    row, note = shape(to_trl(row, layout), data_kind)
    return system_turns(row, system), note
