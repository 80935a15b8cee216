"""``alignctl recipes``: the recipes alignctl ships, with their descriptions."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from alignctl.config.compose import available_recipes, recipe_description


def run(_: list[str]) -> int:
    table = Table("recipe", "description", box=None, show_header=True)
    for name, path in available_recipes().items():
        table.add_row(escape(name), escape(recipe_description(path)))
    Console().print(table)
    return 0
