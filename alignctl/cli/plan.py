"""``alignctl plan [--json] [overrides...]``: compose and resolve the configuration as ``run`` would, print the stage
graph (``--json``: the resolved run spec as JSON on stdout, for other tools: every stage's kind, links, data, TRL
fields, peft, monitors and evaluation settings, plus the notes); trains nothing and never imports torch."""

from __future__ import annotations

from alignctl import views
from alignctl.config.compose import check_point, split_config_dir


def run(args: list[str]) -> int:
    as_json = "--json" in args
    args = [a for a in args if a != "--json"]
    config_dir, args = split_config_dir(args)  # `plan --config-dir DIR ...` composes as `run` would
    resolved = check_point(args, config_dir=config_dir)
    if as_json:
        import json

        from alignctl.config.redact import redact_text

        blob = {"plan_format": 1, "overrides": args, **resolved.to_dict()}
        print(redact_text(json.dumps(blob, indent=2, sort_keys=True, default=str)))
        return 0
    views.show(resolved, overrides=args)
    return 0
