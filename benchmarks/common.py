"""Helpers the benchmark scripts share: interleaved timing, FLOP bounds, a table and a JSON record.

    from common import interleaved, count_flops, print_table, write_json
    timings = interleaved({"baseline": lambda: model(x), "tome r=16": lambda: opt(x)}, rounds=5)
    timings["tome r=16"].speedup      # median over rounds of (baseline time / this time)

Timing on these shared, noisy machines: every callable runs once per round, rounds interleaved
(A B A B ...) after a warm-up, and a speed-up is the median of the per-round ratios measured in one
run, never a ratio of two separate runs. The timing itself is `dittofx.measure.timing.interleaved`, the
one the CLI uses; this module adds what benchmark scripts need around it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dittofx.measure.flops import count_flops
from dittofx.measure.timing import Timing, interleaved

__all__ = ["Timing", "interleaved", "count_flops", "print_table", "write_json", "machine", "median"]


def median(values) -> float:
    return statistics.median(list(values))


def print_table(rows: list[dict], columns: list[tuple[str, str, str]], title: str | None = None) -> str:
    """Print rows as a fixed-width table; columns are (key, header, format spec). Returns the text."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            line.append("-" if value is None else (format(value, spec) if spec else str(value)))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(([title] if title else []) + lines)
    print(text, flush=True)
    return text


def machine() -> dict:
    """What the figures were measured on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def write_json(path: str, data: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
    print(f"wrote {path}", flush=True)
