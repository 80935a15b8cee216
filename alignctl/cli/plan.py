"""``alignctl plan [overrides...]``: compose and resolve the configuration as ``run`` would, print the stage graph;
trains nothing and never imports torch."""

from __future__ import annotations

from alignctl import views
from alignctl.config.compose import check_point, split_config_dir


def run(args: list[str]) -> int:
    config_dir, args = split_config_dir(args)  # `plan --config-dir DIR ...` composes as `run` would
    resolved = check_point(args, config_dir=config_dir)
    views.show(resolved, overrides=args)
    return 0
