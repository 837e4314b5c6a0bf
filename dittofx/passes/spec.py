"""Pass specs as strings: "tome:r=16", "pab:spatial=2,temporal=4,cross=6", "rlt:tau=0.1".

Values are Python literals (`r=[8,8,4]`, `r=(16,-0.5)`, `timestep_window=(100,800)`, `mlp=None`);
commas inside brackets belong to the value. The accepted keys are the pass class's dataclass fields,
each given once. Numbers must be finite: `inf`, `nan` and literals that overflow (`1e309`) are refused
here, for every pass, whether the option came in a string or on a Pass object.
"""

from __future__ import annotations

import ast
import importlib
import math
import weakref
from collections.abc import Mapping, Set

from dittofx.errors import PassSpecError, first_line
from dittofx.passes.base import Pass

# name -> "module:Class"; modules are imported on first use.
REGISTRY = {
    "sdpa": "dittofx.passes.sdpa:CanonicalizeAttention",
    "tome": "dittofx.passes.tome:ToMe",
    "rlt": "dittofx.passes.rlt:RLT",
    "pab": "dittofx.passes.pab:PAB",
    "sp": "dittofx.passes.sp:SequenceParallel",
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
    """An option value: a Python literal, true/false/none in any case, inf/nan, else the text itself."""
    lowered = text.lower()
    if lowered in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[lowered]
    if lowered.lstrip("+-") in ("inf", "infinity", "nan"):
        return float(lowered)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def pass_name(spec: str) -> str:
    """The registry name a spec string names: 'PAB:spatial=3' -> 'pab'."""
    return spec.strip().partition(":")[0].strip().lower()


def _not_finite(value) -> bool:
    """True when `value` is, or holds (in a tuple, list or dict), a float or complex that is not finite."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, complex):
        return not (math.isfinite(value.real) and math.isfinite(value.imag))
    if isinstance(value, (tuple, list)):
        return any(_not_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_not_finite(v) for v in value.values())
    return False


def _check_finite(name: str, options: dict, given: dict[str, str] | None = None) -> None:
    """PassSpecError when an option holds inf or nan (no option means either), before the pass's own checks."""
    for key, value in options.items():
        if _not_finite(value):
            text = (given or {}).get(key, repr(value))
            why = "" if any(w in text.lower() for w in ("inf", "nan")) else ", it overflows a float"
            raise PassSpecError(f"{name}: {key}={text} is not a finite number{why}; options take finite numbers")


def parse_pass(spec: str | Pass) -> Pass:
    if isinstance(spec, Pass):
        _check_finite(spec.name, spec.options())
        return spec
    if not isinstance(spec, str):
        raise PassSpecError(f"a pass must be a Pass object or a string like 'tome:r=16', not {type(spec).__name__}")
    name, rest = pass_name(spec), spec.strip().partition(":")[2]
    cls = pass_class(name)
    accepted = cls.option_names()
    kwargs, given = {}, {}
    for option in split_options(rest):
        key, eq, value = option.partition("=")
        key = key.strip()
        if not eq or not key:
            raise PassSpecError(f"pass option {option!r} in {spec!r} is not KEY=VALUE; accepted keys for "
                                f"{name}: {', '.join(accepted) or 'none'}")
        if key not in accepted:
            raise PassSpecError(f"unknown option {key!r} for pass {name}; accepted: {', '.join(accepted) or 'none'}")
        if key in kwargs:
            raise PassSpecError(f"option {key!r} is given twice in {spec!r}; give each option of {name} once")
        kwargs[key], given[key] = value_of(value.strip()), value.strip()
    _check_finite(name, kwargs, given)
    try:
        p = cls(**kwargs)
    except PassSpecError:
        raise
    except (TypeError, ValueError, OverflowError) as e:  # an option value the pass's own check did not foresee
        raise PassSpecError(f"{name}: cannot take {', '.join(f'{k}={given[k]}' for k in given) or 'no options'} "
                            f"({first_line(e)}); accepted options: {', '.join(accepted) or 'none'}") from e
    return p


PASSES_FORMS = "a list of pass specs ('tome:r=16') or Pass objects (ToMe(r=16)), applied in order"


def parse_passes(specs) -> list[Pass]:
    """The passes of `optimize(passes=...)`: None, one spec or Pass, or a list (tuple) of them. A dict or
    a set is refused (a dict would be taken as its keys, a set has no order)."""
    if specs is None:
        return []
    if isinstance(specs, (str, Pass)):
        specs = [specs]
    if isinstance(specs, (Mapping, Set, bytes)) or not hasattr(specs, "__iter__"):
        raise PassSpecError(f"passes must be {PASSES_FORMS}; got a {type(specs).__name__}")
    passes = [parse_pass(s) for s in specs]
    for p in passes:
        _GIVEN[id(p)] = p
    return passes


# The passes a user handed to optimize() (through parse_passes), by id: what the pass manager speaks
# of to the user, as against the passes the exactness check derives from them (Pass.exact: tome:r=0).
_GIVEN: weakref.WeakValueDictionary[int, Pass] = weakref.WeakValueDictionary()


def given(p: Pass) -> bool:
    """True when `p` itself came through parse_passes (the user's pass, not one derived from it)."""
    return _GIVEN.get(id(p)) is p
