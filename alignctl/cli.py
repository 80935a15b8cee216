"""alignctl's command line: ``run`` (the Hydra application), ``plan``, ``recipes``.

``run`` hands its arguments to Hydra unchanged except for two conveniences:
a dotted override of a key the recipe does not set (``stages.dpo.loss_type=ipo``)
is passed as ``++key=value`` so any TRL field can be set without Hydra's ``+``
(alignctl's own validation then rejects unknown keys, with suggestions), and
``recipe=path/to/file.yaml`` runs a recipe file kept anywhere.

Nothing here imports torch: ``--help``, ``plan`` and ``recipes`` stay fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

from alignctl.errors import ConfigError, suggest
from alignctl.spec import TOP_KEYS

_PKG = Path(__file__).resolve().parent


def _asset_dir(name: str) -> Path:
    """configs/ and recipes/ live at the repo root in a checkout and inside the package in a wheel."""
    inside = _PKG / name
    return inside if inside.is_dir() else _PKG.parent / name


CONFIGS_DIR = _asset_dir("configs")
RECIPES_DIR = _asset_dir("recipes")
HYDRA_VALUE_FLAGS = {"--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "--experimental-rerun"}

USAGE = """\
usage: alignctl <command> [overrides...]

commands:
  run [overrides...]    run a recipe (Hydra app: -m/--multirun, --cfg job, --config-dir, hydra.run.dir=... work)
  plan [overrides...]   resolve and validate the configuration, print the stage graph; trains nothing
  recipes               list the recipes
  report <multirun dir> summarise a sweep: swept values vs held-out metrics (report.md + sweep.png)

examples:
  alignctl run                                   # the embedded default recipe: tiny SFT -> DPO on CPU
  alignctl plan recipe=zephyr-dpo
  alignctl run recipe=zephyr-dpo stages.dpo.beta=0.05
  alignctl run -m stages.dpo.beta=0.05,0.5       # a sweep
  alignctl run recipe=./my-recipe.yaml           # a recipe file kept anywhere
"""


def config_groups() -> list[str]:
    return ["recipe"] + sorted(p.name for p in CONFIGS_DIR.iterdir() if p.is_dir())


def available_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_description(path: Path) -> str:
    from omegaconf import OmegaConf

    return str(OmegaConf.load(path).get("description", ""))


def _register_recipes(extra: dict[str, Path]) -> None:
    """Put every recipe file into Hydra's ``recipe`` group (package _global_)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    for name, path in {**available_recipes(), **extra}.items():
        node = OmegaConf.load(path)
        if "name" not in node:
            node.name = name
        cs.store(group="recipe", name=name, node=node, package="_global_")


def prepare_overrides(args: list[str]) -> tuple[list[str], dict[str, Path]]:
    """Rewrite dotted overrides to ``++`` form and resolve ``recipe=<file>``; check recipe names."""
    out, extra = [], {}
    user_config_dir = any(a.split("=")[0] in ("--config-dir", "-cd") for a in args)
    known = available_recipes()
    skip_next = False
    for a in args:
        if skip_next or a.startswith("-") or "=" not in a:
            skip_next = a in HYDRA_VALUE_FLAGS
            out.append(a)
            continue
        key, value = a.split("=", 1)
        if key == "recipe":
            names = []
            for v in value.split(","):
                if v.endswith((".yaml", ".yml")):
                    p = Path(v).expanduser()
                    if not p.is_file():
                        raise ConfigError([f"recipe: recipe file not found: {v}"])
                    extra[p.stem] = p.resolve()
                    names.append(p.stem)
                elif v not in known and not user_config_dir:
                    raise ConfigError([f"recipe: unknown recipe '{v}'{suggest(v, known)}; "
                                       f"known: {', '.join(known)} (or pass a path to a .yaml file)"])
                else:
                    names.append(v)
            out.append("recipe=" + ",".join(names))
        elif "." in key and key[0] not in "+~" and not key.startswith("hydra."):
            out.append("++" + a)
        elif key[0] not in "+~" and "." not in key and "/" not in key and key not in TOP_KEYS \
                and key not in config_groups():
            choices = set(TOP_KEYS) | set(config_groups())
            raise ConfigError([f"{key}: unknown key{suggest(key, choices)}; top-level keys and groups: "
                               f"{', '.join(sorted(choices))}"])
        else:
            out.append(a)
    return out, extra


def _error(e: ConfigError) -> int:
    print("alignctl: configuration error" + ("s:" if len(e.problems) > 1 else ":"), file=sys.stderr)
    for p in e.problems[:20]:
        print(f"  - {p}", file=sys.stderr)
    if len(e.problems) > 20:
        print(f"  ... and {len(e.problems) - 20} more", file=sys.stderr)
    print("Nothing was trained.", file=sys.stderr)
    return 2


def compose(overrides: list[str], return_hydra_config: bool = False):
    """Compose the configuration the way ``run`` would (used by ``plan`` and tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides, extra = prepare_overrides(overrides)
    _register_recipes(extra)
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides, return_hydra_config=return_hydra_config)


def cmd_plan(args: list[str]) -> int:
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from alignctl import plan, spec

    try:
        cfg = compose(args, return_hydra_config=True)
        run_dir = OmegaConf.select(cfg, "hydra.run.dir")
        with open_dict(cfg):
            del cfg["hydra"]
        resolved = spec.resolve(cfg, run_dir)
    except ConfigError as e:
        return _error(e)
    except (HydraException, OmegaConfBaseException) as e:  # Hydra's own override/composition errors
        return _error(ConfigError([f"{type(e).__name__}: {e}"]))
    plan.show(resolved)
    return 0


def cmd_recipes(_: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table("recipe", "description", box=None, show_header=True)
    for name, path in available_recipes().items():
        table.add_row(name, recipe_description(path))
    Console().print(table)
    return 0


def cmd_run(args: list[str]) -> int:
    try:
        overrides, extra = prepare_overrides(args)
    except ConfigError as e:
        return _error(e)
    _register_recipes(extra)
    from alignctl.app import hydra_main

    sys.argv = ["alignctl"] + overrides
    hydra_main()
    return 0


def cmd_report(args: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from alignctl import report

    if len(args) != 1:
        print("usage: alignctl report <multirun dir>", file=sys.stderr)
        return 2
    try:
        out, plot, rows = report.sweep_report(args[0])
    except FileNotFoundError as e:
        return _error(ConfigError([f"report: {e}"]))
    table = Table(*rows[0].keys(), title=f"sweep {args[0]}")
    for r in rows:
        table.add_row(*(report._fmt(v) for v in r.values()))
    Console(width=max(Console().width, 120)).print(table)
    print(f"report: {out}" + (f"\nplot: {plot}" if plot else ""))
    return 0


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "recipes": cmd_recipes, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 1
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"alignctl: unknown command '{cmd}'{suggest(cmd, COMMANDS)}\n\n{USAGE}", file=sys.stderr)
        return 2
    if cmd != "run" and rest and rest[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    return COMMANDS[cmd](rest)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
