"""Interleaved timing: run baseline and candidates in turn (A B A B ...), report medians.

This machine class is noisy (the same loop can take 4 s in one run and 7.6 s in the next), so
speed-ups are medians of per-round ratios measured in one run, never single timings.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

MIN_TIMED_SECONDS = 0.010  # a timed run shorter than this is mostly fixed per-call costs and noise


@dataclass
class Timing:
    name: str
    seconds: list[float]  # one per round
    ratios: list[float]  # baseline time / this time, per round

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def speedup(self) -> float:
        return statistics.median(self.ratios)

    @property
    def spread(self) -> float:
        """Half the range of the per-round speed-ups: differences below this are noise."""
        return (max(self.ratios) - min(self.ratios)) / 2 if len(self.ratios) > 1 else 0.0


def interleaved(fns: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1, repeat: int = 1,
                on_round: Callable[[int], None] | None = None, clock: str = "wall") -> dict[str, Timing]:
    """Time each callable `repeat` times per round, rounds interleaved; the first entry is the baseline.

    clock: "wall" (what a user waits for) or "cpu" (this process's CPU time). On a machine shared with
    other jobs, "cpu" with one thread is far steadier: time spent waiting for a core is not counted.
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', not {clock!r}")
    now = time.perf_counter if clock == "wall" else time.process_time
    names = list(fns)
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                fns[name]()
        seconds = {name: [] for name in names}
        for r in range(rounds):
            order = names if r % 2 == 0 else [names[0]] + names[:0:-1]  # vary who runs right after baseline
            for name in order:
                start = now()
                for _ in range(repeat):
                    fns[name]()
                seconds[name].append((now() - start) / repeat)
            if on_round:
                on_round(r)
    base = seconds[names[0]]
    return {name: Timing(name, s, [b / t for b, t in zip(base, s)]) for name, s in seconds.items()}
