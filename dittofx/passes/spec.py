"""Pass specs as strings: "tome:r=16", "pab:spatial=2,temporal=4,cross=6", "rlt:tau=0.1".

Values are Python literals (`r=[8,8,4]`, `r=(16,-0.5)`, `timestep_window=(100,800)`, `mlp=None`);
commas inside brackets belong to the value. The accepted keys are the pass class's dataclass fields.
"""

from __future__ import annotations

import ast
import importlib

from dittofx.errors import PassSpecError
from dittofx.passes.base import Pass

# name -> "module:Class"; modules are imported on first use.
REGISTRY = {
    "sdpa": "dittofx.passes.sdpa:CanonicalizeAttention",
    "tome": "dittofx.passes.tome:ToMe",
    "rlt": "dittofx.passes.rlt:RLT",
    "pab": "dittofx.passes.pab:PAB",
}


def register(name: str, target: str) -> None:
    REGISTRY[name] = target


def pass_class(name: str) -> type[Pass]:
    if name not in REGISTRY:
        raise PassSpecError(f"unknown pass {name!r}; accepted: {', '.join(sorted(REGISTRY))}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def split_options(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    return [p.strip() for p in parts]


def value_of(text: str):
    """An option value: a Python literal, true/false/none in any case, else the text itself."""
    lowered = text.lower()
    if lowered in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[lowered]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def pass_name(spec: str) -> str:
    """The registry name a spec string names: 'PAB:spatial=3' -> 'pab'."""
    return spec.strip().partition(":")[0].strip().lower()


def parse_pass(spec: str | Pass) -> Pass:
    if isinstance(spec, Pass):
        return spec
    if not isinstance(spec, str):
        raise PassSpecError(f"a pass must be a Pass object or a string like 'tome:r=16', not {type(spec).__name__}")
    name, rest = pass_name(spec), spec.strip().partition(":")[2]
    cls = pass_class(name)
    accepted = cls.option_names()
    kwargs = {}
    for option in split_options(rest):
        key, eq, value = option.partition("=")
        key = key.strip()
        if not eq or not key:
            raise PassSpecError(f"pass option {option!r} in {spec!r} is not KEY=VALUE; accepted keys for "
                                f"{name}: {', '.join(accepted) or 'none'}")
        if key not in accepted:
            raise PassSpecError(f"unknown option {key!r} for pass {name}; accepted: {', '.join(accepted) or 'none'}")
        kwargs[key] = value_of(value.strip())
    return cls(**kwargs)


def parse_passes(specs) -> list[Pass]:
    if specs is None:
        return []
    if isinstance(specs, (str, Pass)):
        specs = [specs]
    return [parse_pass(s) for s in specs]
