"""``python -m alignctl.cli``: the ``alignctl`` command."""

from alignctl.cli import entry

entry()
