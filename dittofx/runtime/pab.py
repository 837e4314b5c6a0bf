"""Run time of Pyramid Attention Broadcast: the schedule state that decides, call by call, which cached
attention outputs to reuse, and the ways a PAB graph runs.

A graph rewritten by `dittofx.passes.pab.PAB` holds one `PyramidBroadcast` module, `gm.pab`, called
first with the timestep, and one `BroadcastSite` per wrapped attention, `gm.pab.sites[i]`, whose child
graph is the attention module (QKV projections to output projection) moved out of the main graph:

    step = pab(timestep, x)                  # generation / guidance-branch bookkeeping, decisions
    out = pab.sites.3(step, *inputs)         # computes the attention, or returns the cached output

Run as it is, the graph never calls a site's child graph on a broadcast step. Python state cannot
live in a compiled or exported graph, so `program(gm, pattern)` builds one flat graph per broadcast
pattern (which sites compute on this call): caches are explicit inputs (broadcast sites) and outputs
(computed sites), the computing sites' attention is inlined, and a broadcast site's attention is not
in that graph at all. `PABRunner` runs these programs eagerly or torch.compile'd (it is what
`OptimizedModule` calls: `PyramidBroadcast.runner`), `OnnxPABRunner` (runtime/onnxruntime.py) runs
their ONNX exports (see `dittofx.exporters.onnx_pab`); both drive the same state machine, so every way
gives the same outputs.

State rules:
- a call's timestep above the previous call's starts a new generation: every cache is dropped;
- a call with the same timestep as the previous call is the next classifier-free-guidance branch of
  the same step (cond and uncond as separate calls): each branch has its own call counter and caches;
  a lower timestep is the next step, back to branch 0. Batched guidance is one call: one branch;
- a branch whose batch size changed starts over (its cached outputs no longer fit);
- `reset()` drops everything (OptimizedModule.reset() calls it).

Every wrapped site runs exactly once per call of the graph, so a branch's call counter is the call
index of each of its sites: the decision for all sites comes before the graph runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree

from dittofx._torch_compat import graph_specs, is_fake
from dittofx.rewriter import specialize
from dittofx.runtime.eager import make_eager
from dittofx.runtime.stateful import StatefulModule


@dataclass(frozen=True)
class Rule:
    """When a site computes: first call, timestep outside the open window, or call index % range == 0."""

    range: int
    window: tuple[float, float]

    def computes(self, index: int, timestep: float | None) -> bool:
        inside = timestep is not None and self.window[0] < timestep < self.window[1]
        return index == 0 or not inside or index % self.range == 0


@dataclass
class _Branch:
    calls: int = 0
    batch: int | None = None
    caches: dict[int, tuple] = field(default_factory=dict)


@dataclass
class Step:
    """The decisions of one call: `computes[i]` for site i, and the branch's cache store."""

    computes: tuple[bool, ...]
    caches: dict[int, tuple]


def timestep_value(t) -> float | None:
    """The one timestep of a call (diffusers passes `t.expand(batch)`); None for mixed timesteps in a
    batch, which computes every site."""
    if isinstance(t, torch.Tensor):
        values = t.detach().reshape(-1).tolist()
    elif hasattr(t, "reshape"):  # numpy
        values = t.reshape(-1).tolist()
    else:
        values = [t]
    if not values or any(v != values[0] for v in values):
        return None
    return float(values[0])


def _tracing(t) -> bool:
    """True while the graph runs on fake or symbolic values (shape propagation, export, dynamo)."""
    return torch.compiler.is_compiling() or is_fake(t)


class BroadcastState:
    """The schedule state of a set of sites (plain Python: shared by the graph and the runners)."""

    def __init__(self, rules: list[Rule]):
        self.rules = list(rules)
        self._last_timestep: float | None = None
        self._branch = 0
        self._branches: list[_Branch] = []
        self.computed = [0] * len(self.rules)  # per site, since construction or reset: for reports/tests
        self.broadcast = [0] * len(self.rules)

    def begin(self, timestep, batch: int | None) -> Step:
        """Book-keep one call of the graph and decide which sites compute."""
        t = timestep_value(timestep)
        last = self._last_timestep
        if last is not None and (t is None or t > last):
            self._branches = []  # a new generation (or a call with mixed timesteps)
        if last is not None and t is not None and t == last:
            self._branch += 1  # the next guidance branch of the same step
        else:
            self._branch = 0
        self._last_timestep = t
        while len(self._branches) <= self._branch:
            self._branches.append(_Branch())
        branch = self._branches[self._branch]
        if branch.batch != batch:
            branch.calls, branch.batch, branch.caches = 0, batch, {}
        computes = tuple(rule.computes(branch.calls, t) or i not in branch.caches for i, rule in enumerate(self.rules))
        branch.calls += 1
        for i, c in enumerate(computes):
            if c:
                self.computed[i] += 1
            else:
                self.broadcast[i] += 1
        return Step(computes, branch.caches)

    @property
    def branches(self) -> int:
        return len(self._branches)

    def __str__(self) -> str:
        computed, broadcast = sum(self.computed), sum(self.broadcast)
        total = computed + broadcast
        share = f" ({broadcast / total:.0%})" if total else ""
        return f"{len(self.rules)} sites: {broadcast} of {total} site calls broadcast{share}, " \
               f"{self.branches} guidance branch(es)"


class PyramidBroadcast(StatefulModule):
    """The schedule and the caches of every wrapped site of one graph (one module per graph)."""

    def __init__(self, timestep_index: int, batch_index: int | None):
        super().__init__()
        self.sites = nn.ModuleList()
        self.timestep_index = timestep_index  # flat input positions, for runners that see flat inputs
        self.batch_index = batch_index
        self._state: BroadcastState | None = None

    @property
    def rules(self) -> list[Rule]:
        return [s.rule for s in self.sites]

    @property
    def state(self) -> BroadcastState:
        if self._state is None or len(self._state.rules) != len(self.sites):
            self._state = BroadcastState(self.rules)
        return self._state

    def reset(self) -> None:
        self._state = None

    def runner(self, gm: fx.GraphModule, compiled: bool) -> nn.Module:
        """One flat program per broadcast pattern, compiled or not (see PABRunner)."""
        return PABRunner(gm, compile=compiled)

    @property
    def live(self) -> _Live:
        """An object whose str() is the current state's counts (for reports)."""
        return _Live(self)

    def begin(self, timestep, batch: int | None) -> Step:
        return self.state.begin(timestep, batch)

    def forward(self, timestep, batched_input=None):
        if _tracing(timestep):
            return None
        batch = batched_input.shape[0] if isinstance(batched_input, torch.Tensor) and batched_input.dim() else None
        return self.begin(timestep, batch)

    def extra_repr(self) -> str:
        return f"sites={len(self.sites)}"


class _Live:
    def __init__(self, schedule: PyramidBroadcast):
        self.schedule = schedule

    def __str__(self) -> str:
        return str(self.schedule.state)

    __repr__ = __str__


class BroadcastSite(nn.Module):
    """One wrapped attention module: `attention` is its outlined graph, called only on compute steps."""

    def __init__(self, attention: fx.GraphModule, index: int, module: str, kind: str, rule: Rule):
        super().__init__()
        self.attention = attention
        self.index = index
        self.module = module
        self.kind = kind
        self.rule = rule

    def forward(self, step: Step | None, *inputs):
        if step is None:  # tracing: the graph as if every site computes
            return self.attention(*inputs)
        if step.computes[self.index]:
            out = self.attention(*inputs)
            step.caches[self.index] = out
            return out
        return step.caches[self.index]

    def extra_repr(self) -> str:
        return f"{self.module}, kind={self.kind}, range={self.rule.range}, window={self.rule.window}"


# ---------------------------------------------------------------------------------------------
# flat graphs, one per broadcast pattern (rewriter/specialize.py)


def pab_module(gm: fx.GraphModule) -> PyramidBroadcast:
    return gm.get_submodule("pab")


def _site_nodes(gm: fx.GraphModule) -> tuple[fx.Node, dict[int, fx.Node]]:
    schedule, sites = None, {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target == "pab":
            schedule = n
        elif n.op == "call_module" and n.target.startswith("pab.sites."):
            sites[int(n.target.rsplit(".", 1)[1])] = n
    return schedule, sites


def _attention(gm: fx.GraphModule):
    return lambda site: gm.get_submodule(site.target).attention


def site_outputs(gm: fx.GraphModule) -> dict[int, int]:
    """How many tensors each site's cache holds."""
    return specialize.site_outputs(_site_nodes(gm)[1], _attention(gm))


def cache_layout(gm: fx.GraphModule, computes: tuple[bool, ...]) -> tuple[list, list]:
    """(caches read, caches written) of one pattern, as (site, output) pairs."""
    return specialize.cache_layout(site_outputs(gm), computes)


def program(gm: fx.GraphModule, computes: tuple[bool, ...], fold: dict[tuple[int, int], tuple] | None = None
            ) -> fx.GraphModule:
    """A flat GraphModule for one pattern: inputs (*flat model inputs, *caches of the broadcast sites),
    outputs (*flat model outputs, *caches of the computed sites); a broadcast site's attention is not in
    it. `fold`: caches passed batch-major (see rewriter/specialize.py)."""
    gate, sites = _site_nodes(gm)
    return specialize.specialize(gm, gate, sites, computes, _attention(gm), fold, pab_module(gm).batch_index)


class PABRunner(nn.Module):
    """Runs a PAB graph through one flat program per broadcast pattern: the schedule decides, then
    the program of that pattern runs, with the caches it reads as inputs and those it refreshes as
    outputs. Each site's attention is inlined in the programs that compute it and absent from the
    others; with `compile`, each program is torch.compile'd (`fullgraph=True`) on first use.

    Called like the model. Shares its state with the graph's `pab` module (so `reset()` is one).
    Eagerly this is the same computation as the graph's call_module path, with no per-site module
    calls (which cost ~0.1 ms per call on small models)."""

    def __init__(self, gm: fx.GraphModule, compile: bool = False, compile_options: dict | None = None):
        super().__init__()
        self.gm = gm
        self.compile = compile
        self.compile_options = dict(fullgraph=True, **(compile_options or {}))
        self.in_spec, self.out_spec = graph_specs(gm)
        self.n_outputs = self.out_spec.num_leaves
        self._programs: dict[tuple[bool, ...], tuple] = {}  # pattern -> (callable, cache inputs, cache outputs)

    @property
    def schedule(self) -> PyramidBroadcast:
        return pab_module(self.gm)

    def program(self, computes: tuple[bool, ...]) -> tuple:
        if computes not in self._programs:
            prog = program(self.gm, computes)
            if self.compile:
                prog = torch.compile(prog, **self.compile_options)
            else:
                make_eager(prog)
            self._programs[computes] = (prog, *cache_layout(self.gm, computes))
        return self._programs[computes]

    def forward(self, *args, **kwargs):
        flat = fx_pytree.tree_flatten_spec((args, kwargs), self.in_spec)
        schedule = self.schedule
        batched = flat[schedule.batch_index] if schedule.batch_index is not None else None
        batch = batched.shape[0] if isinstance(batched, torch.Tensor) and batched.dim() else None
        if _tracing(flat[schedule.timestep_index]):  # torch.export / shape propagation of the whole module
            return self._traced(flat)
        step = schedule.begin(flat[schedule.timestep_index], batch)
        prog, ins, outs = self.program(step.computes)
        caches = step.caches
        result = prog(*flat, *[caches[i][j] for i, j in ins])
        fresh: dict[int, list] = {}
        for (i, _), value in zip(outs, result[self.n_outputs:]):
            fresh.setdefault(i, []).append(value)
        for i, values in fresh.items():
            caches[i] = tuple(values)
        return pytree.tree_unflatten(list(result[:self.n_outputs]), self.out_spec)


    def _traced(self, flat):
        """What tracing the runner sees: every site computes, no state (as the graph's own tracing
        path). Exporting a PAB module this way gives the model without broadcast: export_pab_onnx
        is the export that keeps it."""
        if "traced" not in self.__dict__:
            self.__dict__["traced"] = program(self.gm, tuple(True for _ in self.schedule.sites))
        result = self.__dict__["traced"](*flat)
        return pytree.tree_unflatten(list(result[:self.n_outputs]), self.out_spec)


def patterns(rules: list[Rule]) -> list[tuple[bool, ...]]:
    """Every broadcast pattern the rules can produce: sites with the same rule decide alike, and a
    group computes on call index % range == 0 or outside its window, which may hold for any group."""
    groups = sorted(set(rules), key=lambda r: (r.range, r.window))
    period = 1
    for r in groups:
        period = period * r.range // math.gcd(period, r.range)
    seen = set()
    for index in range(period):
        base = [index % r.range == 0 for r in groups]
        for forced in range(1 << len(groups)):  # any group may be outside its window
            decision = {r: base[g] or bool(forced >> g & 1) for g, r in enumerate(groups)}
            seen.add(tuple(decision[r] for r in rules))
    return sorted(seen, key=lambda p: (-sum(p), p))
