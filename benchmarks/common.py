"""Helpers the benchmark scripts share: interleaved timing, FLOP bounds, a table and a JSON record.

    from common import interleaved, count_flops, print_table, write_json
    timings = interleaved({"baseline": lambda: model(x), "tome r=16": lambda: opt(x)}, rounds=5)
    timings["tome r=16"].speedup      # median over rounds of (baseline time / this time)

Timing on these shared, noisy machines: every callable runs once per round, rounds interleaved
(A B A B ...) after a warm-up, and a speed-up is the median of the per-round ratios measured in one
run, never a ratio of two separate runs. The timing itself is `dittofx.timing.interleaved`, the
one the CLI uses; this module adds what benchmark scripts need around it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import time  # noqa: E402

from dittofx import timing  # noqa: E402
from dittofx.timing import Timing  # noqa: E402

__all__ = ["Timing", "interleaved", "count_flops", "print_table", "write_json", "machine", "median"]


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1, repeat: int = 1,
                on_round: Callable[[int], None] | None = None, clock: str = "wall") -> dict[str, Timing]:
    """Warm up, then time every callable once per round, rounds interleaved (A B A B ...); the first
    entry is the baseline. Returns a Timing per name: `.median` seconds, `.speedup` (the median of
    the per-round ratios baseline / this), `.spread`.

    clock: "wall" (time.perf_counter, what a user waits for) or "cpu" (the process's CPU time). On a
    machine shared with other jobs, "cpu" with one thread is far steadier: time spent waiting for
    the CPU is not counted.
    """
    if clock == "wall":
        return timing.interleaved(fns, rounds=rounds, warmup=warmup, repeat=repeat, on_round=on_round)
    if clock != "cpu":
        raise ValueError(f"clock must be 'wall' or 'cpu', not {clock!r}")
    names = list(fns)
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                fns[name]()
        seconds = {name: [] for name in names}
        for r in range(rounds):
            for name in (names if r % 2 == 0 else [names[0]] + names[:0:-1]):
                start = time.process_time()
                for _ in range(repeat):
                    fns[name]()
                seconds[name].append((time.process_time() - start) / repeat)
            if on_round:
                on_round(r)
    base = seconds[names[0]]
    return {name: Timing(name, s, [b / t for b, t in zip(base, s)]) for name, s in seconds.items()}


def median(values) -> float:
    return statistics.median(list(values))


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Q K^T and P V: 2 matmuls of (N_q x d) by (d x N_k) per batch and head, 2 FLOPs per MAC."""
    *batch, nq, d = query
    nk, dv = key[-2], value[-1]
    heads = 1
    for s in batch:
        heads *= s
    return 2 * heads * nq * nk * (d + dv)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls, convolutions and attentions that `fn()` runs (eager, inference mode).

    torch's FlopCounterMode knows the CUDA attention kernels but not the CPU one
    (`_scaled_dot_product_flash_attention_for_cpu`), which would count attention as free; it is
    added here. Elementwise work (norms, activations, ToMe's gathers) is not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _sdpa_flops
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


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
