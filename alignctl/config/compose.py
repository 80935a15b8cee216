"""Hydra composition, as ``run`` does it: recipe files, override rewriting, sweep points, up-front checks (no torch).

``run`` hands its arguments to Hydra unchanged except for two conveniences (:func:`prepare_overrides`): a dotted
override of a key the recipe does not set (``stages.dpo.loss_type=ipo``) is passed as ``++key=value`` so any TRL
field can be set without Hydra's ``+`` (alignctl's own validation then rejects unknown keys, with suggestions), and
``recipe=path/to/file.yaml`` runs a recipe file kept anywhere. Every recipe file is checked as data before Hydra sees
it (:func:`load_recipe`). :func:`check_point` composes and resolves one configuration; :func:`precheck_run` does so
for every point of a sweep before any job starts.

Plan time: hydra, omegaconf and yaml are imported inside the functions that need them; torch never.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING

from alignctl import errors
from alignctl.config import recipe_files
from alignctl.config.paths import CONFIGS_DIR, RECIPES_DIR
from alignctl.config.resolve import TOP_KEYS, resolve
from alignctl.errors import ConfigError, suggest

if TYPE_CHECKING:
    from alignctl.config.types import RunSpec

HYDRA_VALUE_FLAGS = {"--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "--experimental-rerun"}


def config_groups() -> list[str]:
    return ["recipe"] + sorted(p.name for p in CONFIGS_DIR.iterdir() if p.is_dir())


def available_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_description(path: Path) -> str:
    try:
        return str(load_recipe(path).get("description", ""))
    except ConfigError as e:
        return f"(unreadable: {e.problems[0]})"


def load_recipe(path: Path, config_dir: str | None = None):
    """A recipe file as an OmegaConf node, after checking it sets alignctl's keys only
    (recipe_files.recipe_file_problems):
    YAML errors, duplicate keys, Hydra settings, instantiation keys, environment resolvers, launch settings and
    `defaults` options that are not files of alignctl's groups (or of the user's ``config_dir``) are ConfigErrors."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"recipe file {path}: cannot be read: {getattr(e, 'strerror', None) or e}"]) from None
    try:  # parsed once, with OmegaConf's YAML loader (it refuses duplicate keys); errors carry the line
        from omegaconf._utils import get_yaml_loader

        loaded = yaml.load(text, Loader=get_yaml_loader())
        if loaded is not None and not isinstance(loaded, (dict, list)):
            raise ConfigError([f"recipe file {path}: must be a mapping of alignctl keys (name, stages, ...), got "
                               f"{type(loaded).__name__} {str(loaded)[:40]!r}"])
        node = OmegaConf.create(loaded or {})
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([f"recipe file {path}: not valid YAML{at}: {problem}; fix the file "
                           "(indent with spaces, not tabs; quote values containing ': ')"]) from None
    except (OmegaConfBaseException, ValueError, TypeError) as e:
        raise errors.from_library(e, f"recipe file {path}") from None
    container = OmegaConf.to_container(node, resolve=False) if node is not None else None
    dirs = [CONFIGS_DIR] + ([Path(config_dir).expanduser()] if config_dir else [])
    problems = recipe_files.recipe_file_problems(container, Path(path), TOP_KEYS,
                                           set(config_groups()) - {"recipe", "hydra"}, dirs)
    if problems:
        raise ConfigError(problems)
    return node


def register_recipes(extra: dict[str, Path], config_dir: str | None = None) -> None:
    """Put every recipe file into Hydra's ``recipe`` group (package _global_: a recipe sets top-level keys and
    chooses config groups). Each file is checked first (load_recipe), so it can set alignctl's keys only."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, path in {**available_recipes(), **extra}.items():
        node = load_recipe(path, config_dir)
        if "name" not in node:
            node.name = name
        cs.store(group="recipe", name=name, node=node, package="_global_")


def prepare_overrides(args: list[str], config_dir: str | None = None) -> tuple[list[str], dict[str, Path]]:
    """Rewrite dotted overrides to ``++`` form and resolve ``recipe=<file>``; check recipe names (any name goes with
    a user config dir, where Hydra looks for recipe/<name>.yaml)."""
    out, extra = [], {}
    user_config_dir = bool(config_dir) or any(a.split("=")[0] in ("--config-dir", "-cd") for a in args)
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
        elif key in config_groups() and _not_an_option(value):
            options = sorted(p.stem for p in (CONFIGS_DIR / key).glob("*.yaml"))
            raise ConfigError([f"{key}: choose one of the {key} configs ({', '.join(options)}), got '{value}'; "
                               f"set a field with {key}.<field>=<value>"])
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


def _not_an_option(value: str) -> bool:
    """A config group override Hydra would crash on (null, a boolean, a number, a mapping, nothing)."""
    v = value.strip()
    if v.lower() in ("", "null", "~", "true", "false") or v.startswith("{"):
        return True
    try:
        float(v)
        return True
    except ValueError:
        return False


def compose(overrides: list[str], return_hydra_config: bool = False, config_dir: str | None = None):
    """Compose the configuration the way ``run`` would (used by ``plan``, ``run``'s up-front checks and tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides, extra = prepare_overrides(overrides, config_dir)
    register_recipes(extra, config_dir)
    if config_dir:  # --config-dir: searched before alignctl's own configs, as Hydra does for `run`
        overrides = [*overrides, f"hydra.searchpath=[file://{Path(config_dir).expanduser().absolute()}]"]
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides, return_hydra_config=return_hydra_config)


def library_error(e: BaseException) -> ConfigError | None:
    """Hydra / OmegaConf / YAML errors caused by the user's overrides or files, as a ConfigError (else None)."""
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(e, (HydraException, OmegaConfBaseException)):
        return errors.from_library(e, "overrides" if "override" in type(e).__name__.lower() else "configuration")
    if isinstance(e, yaml.YAMLError):
        return errors.from_library(e, "YAML")
    return None


def check_point(args: list[str], run: bool = False, config_dir: str | None = None) -> RunSpec:
    """Compose and resolve one configuration (one sweep point): the run spec, or ConfigError."""
    from omegaconf import OmegaConf, open_dict

    try:
        cfg = compose(args, return_hydra_config=True, config_dir=config_dir)
        problem = _callbacks_problem(OmegaConf.select(cfg, "hydra.callbacks"), args, config_dir)
        if problem:
            raise ConfigError([problem])
        run_dir = OmegaConf.select(cfg, "hydra.run.dir")
        with open_dict(cfg):
            del cfg["hydra"]
        return resolve(cfg, run_dir, run=run)
    except ConfigError:
        raise
    except Exception as e:  # Hydra's own override/composition errors, interpolation errors, YAML errors
        _raise_as_config_error(e)


def _raise_as_config_error(e: Exception):
    """Re-raise ``e`` as the ConfigError it stands for (library_error), or as it is (a bug)."""
    err = library_error(e)
    if err is None:
        raise e
    raise err from None


def override_key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def _callbacks_problem(callbacks, args: list[str], config_dir: str | None) -> str | None:
    """Hydra instantiates ``hydra.callbacks`` (any Python call) before alignctl's job starts: they may come from the
    command line or a --config-dir the user passed, never from a file alignctl composed on a recipe's behalf."""
    if not callbacks or config_dir or any(override_key(a).startswith("hydra.callbacks") for a in args):
        return None
    return (f"hydra.callbacks: set by a config file ({', '.join(map(str, callbacks))}); Hydra callbacks run code, "
            "so they come only from the command line (hydra.callbacks.<name>=...) or a --config-dir you pass")


def user_config_dir(args: list[str]) -> str | None:
    """The folder of ``--config-dir``/``-cd`` on the command line (trusted like the command line), or None."""
    return split_config_dir(args)[0]


def split_config_dir(args: list[str]) -> tuple[str | None, list[str]]:
    """(the ``--config-dir``/``-cd`` folder or None, the other arguments)."""
    config_dir, rest, it = None, [], iter(args)
    for a in it:
        if a in ("--config-dir", "-cd"):
            config_dir = next(it, None)
        elif a.startswith(("--config-dir=", "-cd=")):
            config_dir = a.split("=", 1)[1]
        else:
            rest.append(a)
    return config_dir, rest


# Hydra flags after which `run` only prints (config, help, info): nothing to check up front.
_PRINT_ONLY = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc",
               "--resolve", "--package", "-p"}
# Hydra flags that compose another primary config or rerun a saved one: not what check_point composes.
_OTHER_CONFIG = {"--config-name", "-cn", "--config-path", "-cp", "--experimental-rerun"}
MAX_POINTS = 64


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """Every point of a multirun: the cartesian product of its sweep overrides (``a=1,2``, ``range(...)``,
    ``choice(...)``); for ``interval(lo, hi)`` (Optuna), its two bounds. Above MAX_POINTS points, each swept value
    is checked once with the other sweeps at their first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    fixed, axes = [], []
    for o in OverridesParser.create().parse_overrides(overrides):
        if not o.is_sweep_override():
            fixed.append(o.input_line)
            continue
        key = o.get_key_element()
        if o.is_interval_sweep():
            v = o.value()
            integral = not any(ch in o.input_line.split("=", 1)[1] for ch in ".eE")
            values = [str(int(x)) if integral and float(x).is_integer() else repr(x) for x in (v.start, v.end)]
        else:
            values = list(o.sweep_string_iterator())
        axes.append([f"{key}={v}" for v in values])
    if not axes:
        return [fixed]
    total = 1
    for a in axes:
        total *= len(a)
    if total <= MAX_POINTS:
        return [fixed + list(p) for p in itertools.product(*axes)]
    points = []
    for i, axis in enumerate(axes):
        for v in axis:
            points.append(fixed + [a[0] for a in axes[:i]] + [v] + [a[0] for a in axes[i + 1:]])
    return points


def precheck_run(args: list[str]) -> None:
    """``run``'s up-front checks, before Hydra starts any job: every point of a sweep (or the one run) composed and
    resolved as for ``run``. Any bad point stops everything, naming the point."""
    if any(a.split("=")[0] in _PRINT_ONLY | _OTHER_CONFIG for a in args):
        return
    config_dir, others = split_config_dir(args)
    multirun = any(a in ("-m", "--multirun") for a in others)
    rest = [a for a in others if not a.startswith("-")]
    if not multirun:
        check_point(rest, run=True, config_dir=config_dir)
        return
    try:
        points = sweep_points(rest)
    except Exception as e:  # a sweep override Hydra cannot parse
        _raise_as_config_error(e)
    for i, point in enumerate(points, 1):
        swept = [p for p in point if p not in rest]
        try:
            check_point(point, run=True, config_dir=config_dir)
        except ConfigError as e:
            label = " ".join(swept) or "the base configuration"
            raise ConfigError([f"sweep point {i} of {len(points)} ({label}): {p}" for p in e.problems]
                              + ["the sweep was stopped before any job started"]) from None


# Loggers of Hydra's launchers that print each job's overrides: their lines are redacted like saved files.
LAUNCHER_LOGGERS = ("hydra._internal.core_plugins.basic_launcher", "hydra_plugins.hydra_joblib_launcher._core",
                    "hydra_plugins.hydra_submitit_launcher.submitit_launcher")
