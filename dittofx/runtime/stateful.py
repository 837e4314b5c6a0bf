"""The contract for graphs that keep state between calls, and for values recorded at run time
(see dittofx/runtime/__init__.py)."""

from __future__ import annotations

import itertools

import torch
from torch import fx, nn

from dittofx._torch_compat import is_fake


class StatefulModule(nn.Module):
    """A module of a rewritten graph whose state lives between calls."""

    def reset(self) -> None:
        """Drop the state, as before the first call."""
        raise NotImplementedError

    def runner(self, gm: fx.GraphModule, compiled: bool) -> nn.Module | None:
        """What a call of `gm` runs (None: as any graph)."""
        return None


def stateful_modules(gm: nn.Module) -> list[StatefulModule]:
    return [m for m in gm.modules() if isinstance(m, StatefulModule)]


def is_stateful(gm: nn.Module) -> bool:
    return bool(stateful_modules(gm))


def reset(gm: nn.Module) -> None:
    for m in stateful_modules(gm):
        m.reset()


def make_runner(gm: fx.GraphModule, compiled: bool):
    """What a call of the rewritten graph `gm` runs."""
    for m in stateful_modules(gm):
        runner = m.runner(gm, compiled)
        if runner is not None:
            return runner
    if compiled:
        return torch.compile(gm, fullgraph=True)
    from dittofx.runtime.eager import eager_program

    return eager_program(gm)


_stamps = itertools.count(1)


class Recorder(nn.Module):
    """Keeps the last real value that flows through it (not while tracing on fake tensors)."""

    _is_impure = True  # its output may be unused: keep it through dead-code elimination

    def __init__(self):
        super().__init__()
        self.value, self.stamp = None, 0

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        if not is_fake(value) and not torch.compiler.is_exporting():
            self.value, self.stamp = value.detach(), next(_stamps)
        return value


def recorded(graphs, name: str):
    """The latest value recorded by a `Recorder` named `name` in any of `graphs`; AttributeError if none."""
    recorders = [m for gm in graphs for n, m in gm.named_children() if n == name and isinstance(m, Recorder)]
    if not recorders:
        raise AttributeError(name)
    return max(recorders, key=lambda m: m.stamp).value
