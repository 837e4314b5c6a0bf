"""The passes: `from dittofx.passes import ToMe, RLT, PAB, CanonicalizeAttention` (also `dittofx.ToMe`).

One pass per module, each the paper's algorithm plus where it applies; `spec.py` maps spec names
("tome:r=16") to them, `manager.py` runs them in order with the checks between.
"""

from __future__ import annotations

_PASSES = {
    "ToMe": "dittofx.passes.tome",
    "RLT": "dittofx.passes.rlt",
    "PAB": "dittofx.passes.pab",
    "SequenceParallel": "dittofx.passes.sp",
    "CanonicalizeAttention": "dittofx.passes.sdpa",
    "Pass": "dittofx.passes.base",
}

__all__ = list(_PASSES)


def __getattr__(name):  # imported on first use: `import dittofx.passes` stays light
    if name in _PASSES:
        import importlib

        return getattr(importlib.import_module(_PASSES[name]), name)
    raise AttributeError(f"module 'dittofx.passes' has no attribute {name!r}")
