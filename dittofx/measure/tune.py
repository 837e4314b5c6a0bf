"""The library half of `dittofx tune`: the ladder of settings from mild to aggressive for each pass,
and the binary search for the last one within an agreement budget (cli/tune.py runs it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dittofx.errors import DittoError

TUNABLE = ("tome", "rlt", "pab")
# (spatial, temporal, cross), mild to aggressive, each range >= the previous rung's (None: not broadcast)
PAB_LADDER = [(None, None, 2), (None, 2, 3), (2, 2, 4), (2, 3, 5), (2, 4, 6), (3, 5, 8), (3, 6, 9), (4, 8, 12),
              (6, 12, 18)]
RLT_TAUS = [round(i * 0.01, 2) for i in range(101)]
TOME_RATIOS = [round(i * 0.1, 1) for i in range(1, 10)]
DEFAULT_BUDGET = {"cosine": 0.99, "top1": 0.99, "psnr": 30.0}


@dataclass
class Rung:
    label: str  # the searched value, e.g. "16", "0.05", "2/4/6"
    spec: str


def ladder(base, report, inflection: float | None) -> tuple[str, list[Rung]]:
    """(what is searched, the settings from mild to aggressive) for the pass `base` on a model whose
    capture without passes gave `report`."""
    options = base.options()

    def rung(label, **changes) -> Rung:
        return Rung(label, dataclasses.replace(base, **changes).spec())

    if base.name == "tome":
        if inflection is not None and not -1 <= inflection <= 1:
            raise DittoError(f"--inflection must be in [-1, 1], got {inflection}")
        if report.timestep_input is not None or options.get("ratio") is not None:
            if inflection is not None:
                raise DittoError("--inflection applies to ToMe's r (image models); diffusion models tune the ratio")
            return "ratio", [rung(f"{v:g}", r=None, ratio=v) for v in TOME_RATIOS]
        first = report.blocks[0] if report.blocks else None
        tokens = first.tokens if first is not None and first.tokens else 2 * 64 + 1
        prefix = first.prefix if first is not None else 0
        r_max = max(1, (tokens - prefix) // 2)
        if inflection is None:
            return "r", [rung(str(r), r=r, ratio=None) for r in range(1, r_max + 1)]
        return f"r (inflection {inflection:g})", [rung(str(r), r=(r, inflection), ratio=None)
                                                  for r in range(1, r_max + 1)]
    if inflection is not None:
        raise DittoError("--inflection applies to --pass tome only")
    if base.name == "rlt":
        return "tau", [rung(f"{t:g}", tau=t) for t in RLT_TAUS]
    if base.name == "pab":
        def text(v):
            return "-" if v is None else str(v)

        return "spatial/temporal/cross", [rung("/".join(map(text, s)), spatial=s[0], temporal=s[1], cross=s[2])
                                          for s in PAB_LADDER]
    raise DittoError(f"tune searches {', '.join(TUNABLE)}; {base.name!r} has no setting to tune")


def search(rungs: list[Rung], evaluate) -> tuple[int, int | None]:
    """Binary search for the last rung within the budget, assuming agreement falls along the ladder.

    `evaluate(i)` -> True when rung i is within the budget. Returns (chosen index or -1 when even the
    first rung fails, index of the measured rung above it or None when the chosen one is the last)."""
    lo, hi = -1, len(rungs)  # lo: known within (the untouched model), hi: known outside (past the end)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if evaluate(mid):
            lo = mid
        else:
            hi = mid
    return lo, (hi if hi < len(rungs) else None)


def check_budget(metric: str, budget: float) -> None:
    if metric == "psnr":
        if not budget > 1:
            raise DittoError(f"--min-agreement {budget:g} with --metric psnr: PSNR is in dB, e.g. 30")
    elif not 0 <= budget <= 1:
        raise DittoError(f"--min-agreement {budget:g} with --metric {metric}: give a value in [0, 1], e.g. 0.99")
