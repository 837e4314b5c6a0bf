"""Run time of Pyramid Attention Broadcast: the schedule state that decides, call by call, which cached
attention outputs to reuse, and the ways a PAB graph runs.

A graph rewritten by `dittofx.passes.pab.PAB` holds one `PyramidBroadcast` module, `gm.pab`, called
first with the timestep, the latent and the conditioning inputs, and one `BroadcastSite` per wrapped
attention, `gm.pab.sites[i]`, whose child graph is the attention module (QKV projections to output
projection) moved out of the main graph:

    step = pab(timestep, x, *conditioning)   # generation / guidance-branch bookkeeping, decisions
    out = pab.sites.3(step, *inputs)         # computes the attention, or returns the cached output

Run as it is, the graph never calls a site's child graph on a broadcast step. Python state cannot
live in a compiled or exported graph, so `program(gm, pattern)` builds one flat graph per broadcast
pattern (which sites compute on this call): caches are explicit inputs (broadcast sites) and outputs
(computed sites), the computing sites' attention is inlined, and a broadcast site's attention is not
in that graph at all. `PABRunner` runs these programs eagerly or torch.compile'd (it is what
`OptimizedModule` calls: `PyramidBroadcast.runner`), `OnnxPABRunner` (runtime/onnxruntime.py) runs
their ONNX exports (see `dittofx.exporters.onnx_pab`); all of them drive one `BroadcastState`, so every
way gives the same outputs.

State rules. A generation is one denoising loop; within it each guidance branch has its own call
counter and caches (the counter is what `Rule` reads).
- Where a generation starts, explicitly: `opt.new_generation()`, entering or leaving
  `with opt.generation():`, `opt._reset_stateful_cache()` (diffusers pipelines call it at the end of
  every `pipe(...)`), a call inside `opt.cache_context(name, step_index=0)` (what diffusers pipelines
  wrap each call in; the first branch called at step 0 starts it, the others join) or with a
  step_index below the last call's.
- Without those signals (a loop of one's own): a generation's timesteps are monotonic. Its first two
  distinct timesteps give its direction (falling for DDPM-style schedules, rising for flow-matching
  pipelines such as Mochi's), and a call whose timestep goes against that direction starts a new
  generation. The one case this cannot see: a new generation that continues the previous one's
  direction (a loop cut short at t=500, then one that starts at t=400) keeps the old caches; mark such
  boundaries with `new_generation()` or `generation()`. Inside `generation()` nothing is inferred from
  timesteps at all (for samplers that go back up).
- Guidance branches: a `cache_context` name is a branch. Without one, calls are told apart by their
  conditioning inputs (every tensor input other than the timestep and the latent): their shapes,
  dtypes and a checksum of their values (read once per tensor object and version), never by call
  order, so cond and uncond may come in any order. Batched guidance (uncond and cond in one batch) is
  one call: one branch. Conditioning that is identical is one branch. A branch without a name that was
  not called at the previous timestep is dropped (its caches freed) when the timestep moves on, and
  at most MAX_UNNAMED of them are kept (the least recently called goes).
- A branch whose batch size changed starts over (its cached outputs no longer fit).
- A call with mixed timesteps in its batch computes every site (and counts as a call of its branch).
- Threads: each thread has its own generation, branches and context, so threads running their own
  generations on one module do not mix (one generation's calls must come from one thread); the
  computed / broadcast counts are totals over threads. `reset()` drops every thread's state
  (OptimizedModule.reset() calls it).
- `timestep_scale`: the window test reads the timestep input times this (models that scale their
  timestep input before the embedding, as Flux multiplies its t / 1000 by 1000).

Every wrapped site runs exactly once per call of the graph, so a branch's call counter is the call
index of each of its sites: the decision for all sites comes before the graph runs.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree

from dittofx import _log
from dittofx._torch_compat import graph_specs, is_fake
from dittofx.rewriter import specialize
from dittofx.runtime.eager import make_eager
from dittofx.runtime.stateful import CallContext, StatefulModule, current_context

MAX_UNNAMED = 8  # guidance branches told apart by their inputs, kept per generation
_COUNTS = threading.Lock()  # the computed / broadcast totals, shared by threads
_BUILD = threading.RLock()  # creating states and programs (rare: once per graph, pattern, rules)


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
    named: bool
    calls: int = 0
    batch: int | None = None
    caches: dict[int, tuple] = field(default_factory=dict)
    step: int = 0  # the generation's step at this branch's last call
    last_call: int = 0  # the generation's call count at this branch's last call


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


class _Generation:
    """One thread's current generation: its branches and the course of its timesteps."""

    def __init__(self):
        self.branches: dict[tuple, _Branch] = {}
        self.calls = 0
        self.last: float | None = None  # the latest timestep (of calls with one timestep)
        self.direction = 0  # +1 rising, -1 falling, 0 not known yet (fewer than two distinct timesteps)
        self.step = 0  # how many times the timestep moved
        self.step_index: int | None = None  # the latest step_index a CallContext gave

    def against(self, t: float | None) -> bool:
        return t is not None and self.last is not None and (t - self.last) * self.direction < 0

    def starts_over(self, context: CallContext, key: tuple, t: float | None) -> bool:
        """Whether this call begins a new generation (the rules in the module docstring)."""
        if not self.calls:
            return False
        s = context.step_index
        if s is not None and (s == 0 and (self.step_index != 0 or key in self.branches)
                              or self.step_index is not None and s < self.step_index):
            return True
        return not context.declared and self.against(t)

    def add_branch(self, key: tuple, named: bool) -> _Branch:
        """A new branch; beyond MAX_UNNAMED unnamed ones (calls at one timestep with ever new
        conditioning), the least recently called unnamed one is dropped."""
        unnamed = [k for k, b in self.branches.items() if not b.named]
        if not named and len(unnamed) >= MAX_UNNAMED:
            del self.branches[min(unnamed, key=lambda k: self.branches[k].last_call)]
        branch = self.branches[key] = _Branch(named=named)
        return branch

    def advance(self, context: CallContext, t: float | None) -> None:
        self.calls += 1
        if context.step_index is not None:
            self.step_index = context.step_index
        if t is None or t == self.last:
            return
        if self.last is not None:
            self.direction = self.direction or (1 if t > self.last else -1)
            self.step += 1
            for key in [k for k, b in self.branches.items() if not b.named and b.step < self.step - 1]:
                del self.branches[key]
        self.last = t


_NO_CONTEXT = CallContext()


class _Checksums:
    """What tells conditioning inputs apart, each: (shape, dtype, two sums over SAMPLES to 2 x SAMPLES
    evenly spaced values), read once per tensor object and version (a pipeline passes the same embeddings
    every step; tensors made under inference_mode have no version and are read every call)."""

    LIMIT = 256
    SAMPLES = 4096

    def __init__(self):
        self._known: dict[int, tuple] = {}

    def __call__(self, values) -> tuple:
        values = list(values)
        out: list = [None] * len(values)
        todo: dict[torch.device, list] = {}
        converted = set()
        for k, v in enumerate(values):
            if not isinstance(v, torch.Tensor):
                if not hasattr(v, "shape"):  # not a tensor: a constant of the call
                    out[k] = (type(v).__name__, v if isinstance(v, (int, float, str, bool, type(None))) else id(v))
                    continue
                values[k] = torch.as_tensor(v)  # numpy (onnxruntime runners): read every call
                converted.add(k)
            else:
                known = self._known.get(id(v))
                if known is not None and known[0]() is v and known[1] == _version(v) is not None:
                    out[k] = known[2]
                    continue
            todo.setdefault(values[k].device, []).append(k)
        for ks in todo.values():
            sums = torch.stack([self._sums(values[k]) for k in ks]).tolist()
            for k, (total, weighted) in zip(ks, sums):
                v = values[k]
                out[k] = (tuple(v.shape), str(v.dtype), total, weighted)
                version = _version(v)
                if k not in converted and version is not None:
                    if len(self._known) >= self.LIMIT:
                        self._known.clear()
                    self._known[id(v)] = (weakref.ref(v), version, out[k])
        return tuple(out)

    @classmethod
    def _sums(cls, v: torch.Tensor) -> torch.Tensor:
        """(sum, position-weighted sum) in float64 of every k-th value, k = numel // SAMPLES (a strided
        view of a contiguous tensor: nothing else is read or copied)."""
        v = v.detach()
        if v.is_complex():
            v = torch.view_as_real(v)
        flat = v.reshape(-1)
        values = flat[::max(1, flat.numel() // cls.SAMPLES)].to(torch.float64)
        weights = torch.arange(1, values.numel() + 1, dtype=torch.float64, device=v.device)
        return torch.stack([values.sum(), values.dot(weights)])


def _version(v: torch.Tensor) -> int | None:
    try:
        return v._version
    except RuntimeError:  # an inference tensor: no version counter
        return None


class _Thread:
    """One thread's part of a BroadcastState."""

    def __init__(self, epoch: int):
        self.epoch = epoch
        self.generation = _Generation()
        self.checksums = _Checksums()


class BroadcastState:
    """The schedule state of a set of sites (plain Python: shared by the graph and the runners).

    Per thread: the current generation (its guidance branches, their counters and caches) and the
    checksums; shared: the rules and the computed / broadcast counts per site. What the caller says
    about a call (branch name, step index) is the thread's `stateful.current_context()`."""

    def __init__(self, rules: list[Rule], timestep_scale: float = 1.0):
        self.rules = list(rules)
        self.timestep_scale = float(timestep_scale)
        self._patterns: dict[tuple[bool, ...], int] = {}  # calls per pattern, since construction or reset
        self._threads()

    def _threads(self) -> None:
        self._local = threading.local()
        self._epoch = 0
        self._generations: weakref.WeakSet = weakref.WeakSet()  # every thread's, for reset()

    def __getstate__(self):  # copies and pickles carry the rules and counts, not the threads' state
        return {k: v for k, v in self.__dict__.items() if k not in ("_local", "_epoch", "_generations")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._threads()

    @property
    def computed(self) -> list[int]:
        """Calls per site that computed it, over all threads (for reports and tests)."""
        return [sum(n for p, n in self._patterns.items() if p[i]) for i in range(len(self.rules))]

    @property
    def broadcast(self) -> list[int]:
        """Calls per site that reused its cache, over all threads."""
        return [sum(n for p, n in self._patterns.items() if not p[i]) for i in range(len(self.rules))]

    def _thread(self) -> _Thread:
        mine = getattr(self._local, "state", None)
        if mine is None or mine.epoch != self._epoch:
            mine = self._new_thread(mine)
        return mine

    def _new_thread(self, old: _Thread | None) -> _Thread:
        with _COUNTS:
            mine = self._local.state = _Thread(self._epoch)
            if old is not None:
                mine.checksums = old.checksums
            self._generations.add(mine.generation)
        return mine

    def _fresh(self, mine: _Thread) -> _Generation:
        with _COUNTS:
            mine.generation = _Generation()
            self._generations.add(mine.generation)
        return mine.generation

    def new_generation(self) -> None:
        """The calling thread's next call starts a new generation (its caches are dropped now)."""
        self._fresh(self._thread())

    def reset(self) -> None:
        """Drop every thread's generation and the counts."""
        with _COUNTS:
            self._epoch += 1
            for gen in list(self._generations):
                gen.branches.clear()
            self._generations = weakref.WeakSet()
            self._patterns = {}

    def begin(self, timestep, batch: int | None, conditioning=()) -> Step:
        """Book-keep one call of the graph and decide which sites compute. conditioning: the call's
        conditioning inputs (every tensor input but the timestep and the latent)."""
        t = timestep_value(timestep)
        context = current_context() or _NO_CONTEXT
        mine = self._thread()
        if context.name is not None:
            key = ("name", context.name)
        else:
            key = ("inputs", mine.checksums(conditioning) if conditioning else ())
        gen = mine.generation
        if gen.starts_over(context, key, t):
            gen = self._fresh(mine)
        gen.advance(context, t)
        branch = gen.branches.get(key)
        if branch is None:
            branch = gen.add_branch(key, named=context.name is not None)
        if branch.batch != batch:
            branch.calls, branch.batch, branch.caches = 0, batch, {}
        branch.step, branch.last_call = gen.step, gen.calls
        window_t = None if t is None else t * self.timestep_scale
        index, caches = branch.calls, branch.caches
        computes = tuple(rule.computes(index, window_t) or i not in caches for i, rule in enumerate(self.rules))
        branch.calls += 1
        with _COUNTS:
            self._patterns[computes] = self._patterns.get(computes, 0) + 1
        return Step(computes, caches)

    @property
    def branches(self) -> int:
        """Guidance branches of the calling thread's current generation."""
        return len(self._thread().generation.branches)

    def __str__(self) -> str:
        computed, broadcast = sum(self.computed), sum(self.broadcast)
        total = computed + broadcast
        share = f" ({broadcast / total:.0%})" if total else ""
        return f"{len(self.rules)} sites: {broadcast} of {total} site calls broadcast{share}, " \
               f"{self.branches} guidance branch(es)"


class PyramidBroadcast(StatefulModule):
    """The schedule and the caches of every wrapped site of one graph (one module per graph).

    timestep_index, batch_index (the latent), conditioning: flat input positions, for runners that see
    flat inputs; the graph's own `pab` node takes the same inputs (`gate_inputs`)."""

    def __init__(self, timestep_index: int, batch_index: int | None, conditioning: tuple[int, ...] = (),
                 timestep_scale: float = 1.0):
        super().__init__()
        self.sites = nn.ModuleList()
        self.timestep_index = timestep_index
        self.batch_index = batch_index
        self.conditioning = tuple(conditioning)
        self.timestep_scale = float(timestep_scale)
        self._state: BroadcastState | None = None

    @classmethod
    def of_inputs(cls, placeholders: list[fx.Node], timestep: int, latent: int | None,
                  timestep_scale: float = 1.0) -> PyramidBroadcast:
        """The schedule of a graph with these inputs: every tensor input but the timestep and the latent
        is conditioning (what tells guidance branches apart)."""
        conditioning = tuple(i for i, n in enumerate(placeholders)
                             if i not in (timestep, latent) and isinstance(n.meta.get("val"), torch.Tensor))
        return cls(timestep, latent, conditioning, timestep_scale)

    def gate_inputs(self, placeholders: list[fx.Node]) -> tuple:
        """The arguments of the graph's `pab` node: (timestep, latent or None, *conditioning)."""
        latent = placeholders[self.batch_index] if self.batch_index is not None else None
        return (placeholders[self.timestep_index], latent, *(placeholders[i] for i in self.conditioning))

    @property
    def rules(self) -> list[Rule]:
        return [s.rule for s in self.sites]

    @property
    def state(self) -> BroadcastState:
        state = self._state
        if state is None or len(state.rules) != len(self.sites):
            with _BUILD:
                state = self._state
                if state is None or len(state.rules) != len(self.sites):
                    state = self._state = BroadcastState(self.rules, self.timestep_scale)
        return state

    def reset(self) -> None:
        if self._state is not None and self._state.rules == self.rules:
            self._state.reset()
        else:
            self._state = None

    def new_generation(self) -> None:
        self.state.new_generation()

    def runner(self, gm: fx.GraphModule, compiled: bool) -> nn.Module:
        """One flat program per broadcast pattern, compiled or not (see PABRunner)."""
        return PABRunner(gm, compile=compiled)

    @property
    def live(self) -> _Live:
        """An object whose str() is the current state's counts (for reports)."""
        return _Live(self)

    def begin(self, timestep, batch: int | None, conditioning=()) -> Step:
        return self.state.begin(timestep, batch, conditioning)

    def forward(self, timestep, batched_input=None, *conditioning):
        if _tracing(timestep):
            return None
        batch = batched_input.shape[0] if isinstance(batched_input, torch.Tensor) and batched_input.dim() else None
        return self.begin(timestep, batch, conditioning)

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
    Threads may call it at once: each has its own generation, and each pattern's program is built once.
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
        found = self._programs.get(computes)
        if found is None:
            with _BUILD:  # threads: each pattern built once
                found = self._programs.get(computes)
                if found is None:
                    prog = program(self.gm, computes)
                    if self.compile:
                        pattern = "".join("1" if c else "0" for c in computes)
                        prog = _log.SaidOnFirstCall(torch.compile(prog, **self.compile_options),
                                                   f"torch.compile broadcast pattern {pattern} (first use)")
                    else:
                        make_eager(prog)
                    found = self._programs[computes] = (prog, *cache_layout(self.gm, computes))
        return found

    def forward(self, *args, **kwargs):
        flat = fx_pytree.tree_flatten_spec((args, kwargs), self.in_spec)
        schedule = self.schedule
        batched = flat[schedule.batch_index] if schedule.batch_index is not None else None
        batch = batched.shape[0] if isinstance(batched, torch.Tensor) and batched.dim() else None
        if _tracing(flat[schedule.timestep_index]):  # torch.export / shape propagation of the whole module
            return self._traced(flat)
        step = schedule.begin(flat[schedule.timestep_index], batch, [flat[i] for i in schedule.conditioning])
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
            with _BUILD:
                self.__dict__.setdefault("traced", program(self.gm, tuple(True for _ in self.schedule.sites)))
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
