"""alignctl's command line: one module per command behind one registry (:data:`COMMANDS`), and the error path.

A command is a module of this package with ``run(args) -> int`` (its exit code); :data:`COMMANDS` names it with its
lines in the usage text. Adding a command = one module + one :class:`Command` line. A command module is imported only
when its command runs, so ``alignctl --help`` imports none of them; none imports torch at module level either
(``plan``, ``recipes`` and the ``--help`` of every command stay fast). Nothing outside this package imports it.

Errors end in one place (:func:`main`): a user's mistake is one short message and exit code 2 (errors.report); a bug
in alignctl is "internal error", exit code 1, with the traceback in a file (errors.internal_error).
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

from alignctl import errors
from alignctl.errors import ConfigError, suggest


@dataclass(frozen=True)
class Command:
    """One subcommand: its module (``alignctl.cli.<module>``, with ``run(args) -> int``), its lines in USAGE, and
    whether it answers ``-h``/``--help`` itself (else the general usage is printed)."""

    module: str
    usage: str
    own_help: bool = False

    def run(self, args: list[str]) -> int:
        return importlib.import_module(f"alignctl.cli.{self.module}").run(args)


COMMANDS: dict[str, Command] = {
    "run": Command("run", "  run [overrides...]    run a recipe (Hydra app: -m/--multirun, --cfg job, --config-dir, "
                          "hydra.run.dir=... work)\n", own_help=True),
    "plan": Command("plan", "  plan [overrides...]   resolve and validate the configuration, print the stage graph; "
                            "trains nothing (--json: the resolved spec as JSON)\n"),
    "recipes": Command("recipes", "  recipes               list the recipes\n"),
    "report": Command("report", "  report <multirun dir> summarise a sweep: swept values vs held-out metrics "
                                "(report.md + sweep.png)\n"),
    "store": Command("store", "  store ls|du|gc|rm|verify  inspect and clean the stage store (alignctl store --help)\n",
                     own_help=True),
    "eval": Command("eval", "  eval <run dir|model>  held-out answers, KL, reward and win rate of a finished run's "
                            "stages (or of a model folder\n                        against --reference): eval.json + "
                            "plots (alignctl eval --help)\n", own_help=True),
    "generate": Command("generate", "  generate <run dir|model> --prompt TEXT   print answers of the run's final "
                                    "model (or a model folder)\n", own_help=True),
}

USAGE = f"""\
usage: alignctl [--debug] <command> [overrides...]

commands:
{"".join(c.usage for c in COMMANDS.values())}
examples:
  alignctl run                                   # the embedded default recipe: tiny SFT -> DPO on CPU
  alignctl plan recipe=zephyr-dpo
  alignctl run recipe=zephyr-dpo stages.dpo.beta=0.05
  alignctl run -m stages.dpo.beta=0.05,0.5       # a sweep
  alignctl run recipe=./my-recipe.yaml           # a recipe file kept anywhere

--debug (or HYDRA_FULL_ERROR=1) shows tracebacks instead of one-line errors.
"""


def main(argv: list[str] | None = None) -> int:
    """The command line. A user's mistake: one short message, exit code 2 (errors.report); a bug in alignctl:
    "internal error", exit code 1, the traceback in a file (errors.internal_error). ``--debug`` (or
    HYDRA_FULL_ERROR=1) lets tracebacks through instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" not in argv[:1]:
        return _main(argv)
    saved = {k: os.environ.get(k) for k in ("ALIGNCTL_DEBUG", "HYDRA_FULL_ERROR")}
    os.environ.update(ALIGNCTL_DEBUG="1", HYDRA_FULL_ERROR="1")
    try:
        return _main(argv[1:])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 1
    name, rest = argv[0], argv[1:]
    command = COMMANDS.get(name)
    if command is None:
        print(f"alignctl: unknown command '{name}'{suggest(name, COMMANDS)}\n\n{USAGE}", file=sys.stderr)
        return 2
    if not command.own_help and rest and rest[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        return command.run(rest)
    except ConfigError as e:
        if errors.debug():
            raise
        return errors.report(e)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        if errors.debug():
            raise
        from alignctl.config.compose import library_error

        err = library_error(e)
        if err is not None:
            return errors.report(err)
        return errors.internal_error(e)


def entry() -> None:
    sys.exit(main())

