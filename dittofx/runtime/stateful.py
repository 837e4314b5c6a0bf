"""The contract for graphs that keep state between calls, and for values recorded at run time
(see dittofx/runtime/__init__.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
from dataclasses import dataclass

import torch
from torch import fx, nn

from dittofx._log import SaidOnFirstCall
from dittofx._torch_compat import is_fake


@dataclass(frozen=True)
class CallContext:
    """What a caller says about the calls it makes (diffusers' `cache_context`), per thread, for every
    stateful module called inside the block (`call_context`, `generation`).

    name: which guidance branch the calls are ("cond", "uncond", "cond_uncond"): each name its own state.
    step_index: the denoising step (0 starts a generation, a lower one than the last call's too).
    declared: inside `generation()`: the caller marks where generations start and end, so nothing is
    inferred from the timesteps (samplers whose timesteps are not monotonic).
    """

    name: str | None = None
    step_index: int | None = None
    declared: bool = False


_CONTEXT = threading.local()


def current_context() -> CallContext | None:
    """The calling thread's CallContext (None: outside any block)."""
    return getattr(_CONTEXT, "value", None)


@contextlib.contextmanager
def _context(context: CallContext):
    previous = current_context()
    _CONTEXT.value = context
    try:
        yield
    finally:
        _CONTEXT.value = previous


class StatefulModule(nn.Module):
    """A module of a rewritten graph whose state lives between calls.

    State that follows a sequence of calls (PAB's generation) is kept per thread, so that threads
    running their own sequences on one module do not mix; `reset()` drops every thread's. What the
    caller says about its calls is `current_context()`."""

    def reset(self) -> None:
        """Drop the state of every thread, as before the first call."""
        raise NotImplementedError

    def new_generation(self) -> None:
        """Make the calling thread's next call the first of a new sequence (drops that thread's state)."""
        self.reset()

    def runner(self, gm: fx.GraphModule, compiled: bool) -> nn.Module | None:
        """What a call of `gm` runs (None: as any graph)."""
        return None


class SequenceState(nn.Module):
    """State that follows the sequence of calls but that neither the caller nor a runner needs to know
    of (ToMe's use_rand generator): the graph is not stateful for exporters and runners, and `reset()`
    (`opt.reset()`) starts its sequence again."""

    def reset(self) -> None:
        raise NotImplementedError


def stateful_modules(gm: nn.Module) -> list[StatefulModule]:
    return [m for m in gm.modules() if isinstance(m, StatefulModule)]


def is_stateful(gm: nn.Module) -> bool:
    return bool(stateful_modules(gm))


def reset(gm: nn.Module) -> None:
    """As before the first call: every stateful module's state and every sequence's."""
    for m in gm.modules():
        if isinstance(m, (StatefulModule, SequenceState)):
            m.reset()


def _targets(holders) -> list:
    """The stateful modules of the graphs in `holders`, and any other object with `new_generation()`
    (a runner's state)."""
    found = []
    for h in holders:
        found.extend(stateful_modules(h) if isinstance(h, nn.Module) else [h])
    return found


def new_generation(holders) -> None:
    """The calling thread's next call of each of `holders` (graphs, or runners' states) starts afresh."""
    for m in _targets(holders):
        m.new_generation()


@contextlib.contextmanager
def generation(holders):
    """One generation of `holders`, declared: fresh on entry, nothing inferred from timesteps inside
    (any stateful module called in the block), dropped on exit."""
    new_generation(holders)
    try:
        with _context(dataclasses.replace(current_context() or CallContext(), declared=True)):
            yield
    finally:
        new_generation(holders)


def call_context(name: str | None, step_index: int | None = None):
    """`with call_context("uncond", step_index=i):` the calls inside, of any stateful module in this
    thread, are guidance branch `name` at denoising step `step_index` (diffusers' `cache_context`;
    a module first captured inside the block gets it too); a declared generation() around it stays
    declared."""
    outer = current_context()
    return _context(CallContext(name, step_index, declared=bool(outer and outer.declared)))


def make_runner(gm: fx.GraphModule, compiled: bool):
    """What a call of the rewritten graph `gm` runs."""
    for m in stateful_modules(gm):
        runner = m.runner(gm, compiled)
        if runner is not None:
            return runner
    if compiled:
        return SaidOnFirstCall(torch.compile(gm, fullgraph=True), "torch.compile the rewritten graph (first call)")
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
