"""Bad user input: the error every check raises, and close-match suggestions for mistyped names."""

from __future__ import annotations

import difflib


class ConfigError(Exception):
    """Bad user input; ``problems`` is a list of one-line messages, each naming the key, file or column."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def suggest(key: str, candidates) -> str:
    close = difflib.get_close_matches(str(key), sorted(candidates), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
