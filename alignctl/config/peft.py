"""A stage's peft setting: presets, fields, plan-time checks and its one-line description (no torch import).

A resolved setting is a flat mapping: ``method`` (none | lora | qlora) plus LoRA fields
under peft.LoraConfig's names and, for qlora, 4-bit fields under BitsAndBytesConfig's
names. alignctl.models turns it into PEFT / bitsandbytes objects at run time.
"""

from __future__ import annotations

from typing import Any

from alignctl.config.paths import CONFIGS_DIR
from alignctl.errors import suggest

PEFT_METHODS = {
    "none": "full fine-tuning",
    "lora": "LoRA adapter on the base weights (in the compute dtype)",
    "qlora": "LoRA adapter on a 4-bit (NF4) quantised base (bitsandbytes)",
}
# field -> accepted values: a type name checked by peft_problems, or a tuple of choices.
LORA_FIELDS: dict[str, Any] = {
    "r": "positive int", "lora_alpha": "positive number", "lora_dropout": "probability",
    "target_modules": "modules", "exclude_modules": "optional modules", "use_dora": "bool", "use_rslora": "bool",
    "bias": ("none", "all", "lora_only"), "modules_to_save": "optional list", "init_lora_weights": "bool or str",
    "layers_to_transform": "optional layers",
}
QUANT_FIELDS: dict[str, Any] = {
    "bnb_4bit_quant_type": ("nf4", "fp4"), "bnb_4bit_use_double_quant": "bool",
    "bnb_4bit_compute_dtype": ("auto", "bf16", "fp16", "fp32"), "bnb_4bit_quant_storage": (None, "uint8", "bf16",
                                                                                         "fp16", "fp32"),
}
PEFT_FIELDS = {"method": tuple(PEFT_METHODS), **LORA_FIELDS, **QUANT_FIELDS}


def _value_problem(value: Any, accepted: Any) -> str | None:
    def strs(v):
        return isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(x, str) for x in v))

    if isinstance(accepted, tuple):
        return None if value in accepted else f"must be one of {', '.join(str(a) for a in accepted)}"
    ok = {
        "positive int": isinstance(value, int) and not isinstance(value, bool) and value > 0,
        "positive number": isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
        "probability": isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1,
        "bool": isinstance(value, bool),
        "modules": strs(value),
        "optional modules": value is None or strs(value),
        "optional list": value is None or (isinstance(value, list) and all(isinstance(x, str) for x in value)),
        "bool or str": isinstance(value, (bool, str)),
        "optional layers": value is None or (isinstance(value, int) and not isinstance(value, bool))
        or (isinstance(value, list) and all(isinstance(x, int) for x in value)),
    }[accepted]
    if ok:
        return None
    what = {"modules": "a module name pattern, 'all-linear', or a list of module names",
            "optional modules": "null, a module name pattern or a list of module names",
            "optional list": "null or a list of module names", "probability": "a number in [0, 1)",
            "optional layers": "null, a layer index or a list of layer indices"}.get(accepted, f"a {accepted}")
    return f"must be {what}, got {value!r}"


def peft_problems(peft: dict, where: str, only: set | None = None) -> list[str]:
    """Plan-time checks of one resolved peft setting (no torch import): keys, values, installed packages.
    ``only``: check just these keys (a stage's overrides of the run's setting, which is checked on its own)."""
    from importlib.util import find_spec

    problems = []
    method = peft.get("method")
    if method not in PEFT_METHODS:
        return [f"{where}.method: unknown peft method {method!r}{suggest(method, PEFT_METHODS)}; "
                f"choose from {', '.join(PEFT_METHODS)}"]
    for key, value in peft.items():
        if only is not None and key not in only:
            continue
        if key not in PEFT_FIELDS:
            problems.append(f"{where}: unknown key '{key}'{suggest(key, PEFT_FIELDS)} — peft settings are method, "
                            f"LoRA fields ({', '.join(LORA_FIELDS)}) and, for qlora, "
                            f"{', '.join(QUANT_FIELDS)}")
            continue
        bad = _value_problem(value, PEFT_FIELDS[key])
        if bad:
            problems.append(f"{where}.{key}: {bad}")
        elif method == "none" and key != "method":
            problems.append(f"{where}.{key}: has no effect with method none (full fine-tuning); "
                            "choose peft=lora or peft=qlora, or remove it")
        elif method == "lora" and key in QUANT_FIELDS:
            problems.append(f"{where}.{key}: a 4-bit setting, only used with method qlora (this is lora)")
    if only is not None:
        return problems
    if method != "none" and find_spec("peft") is None:
        problems.append(f"{where}.method: {method} needs the `peft` package, which is not installed")
    if method == "qlora" and find_spec("bitsandbytes") is None:
        problems.append(f"{where}.method: qlora needs the `bitsandbytes` package, which is not installed "
                        "(pip install bitsandbytes), or use peft=lora")
    return problems


def resolve_peft(value: Any, base: dict, preset, where: str) -> tuple[dict, list[str]]:
    """A stage's peft setting from its `peft` key: null (the run's ``base``), a preset name (none | lora | qlora),
    or a mapping of fields that override the named preset when it has `method`, the run's setting otherwise."""
    if value is None:
        return dict(base), []
    if isinstance(value, str):
        value = {"method": value}
    if not isinstance(value, dict):
        return dict(base), [f"{where}: must be a preset name ({', '.join(PEFT_METHODS)}) or a mapping of peft fields"]
    start = base
    if "method" in value:
        if not isinstance(value["method"], str) or value["method"] not in PEFT_METHODS:
            return dict(base), [f"{where}.method: unknown peft method {value['method']!r}"
                                f"{suggest(str(value['method']), PEFT_METHODS)}; choose from {', '.join(PEFT_METHODS)}"]
        start = preset(value["method"]) if value["method"] != base.get("method") else base
    return {**start, **value}, []


def describe_peft(peft: dict | None) -> str:
    """One line for the plan: the method and its main settings."""
    peft = peft or {"method": "none"}
    method = peft.get("method", "none")
    if method == "none":
        return "none (full fine-tuning)"
    targets = peft.get("target_modules", "all-linear")
    targets = targets if isinstance(targets, str) else ",".join(targets)
    text = f"{method}: LoRA r={peft.get('r')} alpha={peft.get('lora_alpha')} dropout={peft.get('lora_dropout')} " \
           f"on {targets}"
    text += "".join(f" +{name}" for key, name in (("use_dora", "DoRA"), ("use_rslora", "rsLoRA")) if peft.get(key))
    if method == "qlora":
        text += f"; base 4-bit {peft.get('bnb_4bit_quant_type', 'nf4')}" \
                f"{' double-quant' if peft.get('bnb_4bit_use_double_quant') else ''}, " \
                f"compute {peft.get('bnb_4bit_compute_dtype', 'auto')}"
    return text


def preset(name: str) -> dict:
    """The fields of configs/peft/<name>.yaml (what `peft=<name>` selects)."""
    from omegaconf import OmegaConf

    return dict(OmegaConf.to_container(OmegaConf.load(CONFIGS_DIR / "peft" / f"{name}.yaml"), resolve=True))
