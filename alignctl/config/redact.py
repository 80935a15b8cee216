"""Redaction of secrets, by key and by value pattern, for every file alignctl or Hydra writes (no torch).

:func:`redact` cleans a config or an override list before it is saved (config.yaml, the manifest's overrides,
multirun.yaml), :func:`redact_text` a string (launch/command.txt, log lines), :class:`RedactingFilter` the log
records of Hydra's launchers. Tokenizer and counting fields that merely mention tokens are left intact.
"""

from __future__ import annotations

import re
from typing import Any

_SECRET_KEY = re.compile(r"token|api_?key|password|passwd|passphrase|(^|_)pass$|secret|credential|private_key|"
                         r"access_key|account_?key$|shared_?access_?(key|signature)$|connection_?string|auth|"
                         r"(^|_)key$", re.I)
# Upper-case environment names ending in _TOKENS (GH_TOKENS, API_TOKENS): secrets, unlike the lower-case tokenizer
# and counting fields below (additional_special_tokens, max_new_tokens).
_SECRET_ENV_TOKENS = re.compile(r"^[A-Z0-9_]*_TOKENS$")
# Tokenizer and counting fields that merely mention tokens: never secrets.
_NOT_SECRET_KEY = re.compile(r"^(stop|pad|eos|bos|unk|sep|cls|mask|additional_special|special)_tokens?(_ids?)?$|"
                             r"tokens|token_id|tokenizer|chat_template|max_new_token|^author", re.I)
_SECRET_VALUES = [
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}"), "hf_***"),
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}"), "sk-***"),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "AKIA***"),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"), "gh_***"),
    (re.compile(r"\bgithub_pat_[A-Za-z0-9_]{30,}"), "github_pat_***"),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9\-]{10,}"), "xox-***"),
    # connection strings (Azure storage / service bus, ODBC): AccountKey=...;  SharedAccessSignature=...;  Pwd=...;
    # and a SAS URL's sig=...; also as Hydra escapes overrides of a multirun job (`AccountKey\=...`)
    (re.compile(r"((?:AccountKey|SharedAccessKey|SharedAccessSignature|Password|Pwd)\s*\\?=\s*)[^;\s'\"]+", re.I),
     r"\1***"),
    (re.compile(r"([?&;]sig\\?=)[^&;\s'\"]+"), r"\1***"),
    # user:password@host, also as Hydra writes overrides of a multirun job (`https\://u\:pw@host`)
    (re.compile(r"(\b[a-z][a-z0-9+.\-]*\\?://[^/\s:@\\]+)\\?:[^/\s@]+@"), r"\1:***@"),
]
# NAME=value or NAME: value inside a string (launcher prefix words, dict-form overrides)
_EMBEDDED = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*)(\s*[:=]\s*)([^\s,;{}\[\]'\"=]+)")


def secret_key(key: Any) -> bool:
    k = str(key).split(".")[-1].lstrip("+~")
    if _SECRET_ENV_TOKENS.match(k):
        return True
    return bool(_SECRET_KEY.search(k)) and not _NOT_SECRET_KEY.search(k)


def redact_text(text: str) -> str:
    """Secret-looking values inside a string: known token formats, URL passwords, NAME=value of secret names."""
    for pattern, repl in _SECRET_VALUES:
        text = pattern.sub(repl, text)
    return _EMBEDDED.sub(lambda m: m.group(1) + m.group(2) + "***" if secret_key(m.group(1)) and
                         m.group(3).strip("=") else m.group(0), text)


def redact(obj: Any) -> Any:
    """Redact a config / override list for saving: values of secret-named keys (``HF_TOKEN``, ``WANDB_API_KEY``,
    ``AWS_SECRET_ACCESS_KEY``, ``hub_token``, ...; not tokenizer fields such as ``stop_token``/``pad_token``),
    ``key=value`` override strings of such keys, and secret-looking values anywhere (``hf_...``, ``sk-...``,
    AWS key ids, ``https://user:password@host``)."""
    if isinstance(obj, dict):
        return {k: ("***" if secret_key(k) and v not in (None, "", False) and not isinstance(v, (dict, list))
                    else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        if "=" in obj and not obj.lstrip().startswith(("{", "[")):
            key, value = obj.split("=", 1)
            if secret_key(key) and value and " " not in key:
                return key + "=***"
        return redact_text(obj)
    return obj


class RedactingFilter:
    """A logging filter that redacts secrets from messages (Hydra's launchers log each job's overrides)."""

    def filter(self, record) -> bool:
        record.msg, record.args = redact_text(record.getMessage()), None
        return True
