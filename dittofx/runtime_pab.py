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
`OptimizedModule` calls, see `runner_factory`), `OnnxPABRunner` runs their ONNX exports (see
`dittofx.exporters.onnx_pab`); both drive the same state machine, so every way gives the same outputs.

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
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree

from dittofx.rewriter.eager import make_eager


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
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or (isinstance(t, torch.Tensor) and is_fake(t))


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


class PyramidBroadcast(nn.Module):
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
# flat graphs, one per broadcast pattern


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


def site_outputs(gm: fx.GraphModule) -> dict[int, int]:
    """How many tensors each site's cache holds."""
    _, sites = _site_nodes(gm)
    return {i: len(gm.get_submodule(n.target).attention.graph.find_nodes(op="output")[0].args[0])
            for i, n in sites.items()}


def program(gm: fx.GraphModule, computes: tuple[bool, ...], fold: dict[tuple[int, int], tuple] | None = None
            ) -> fx.GraphModule:
    """A flat GraphModule for one pattern: inputs (*flat model inputs, *caches of the broadcast sites),
    outputs (*flat model outputs, *caches of the computed sites), both in site order.

    A broadcast site's attention is absent from this graph. `fold` names caches (site, output) whose
    dim 0 is a multiple of the batch (B*frames, B*tokens), with their other dims: these are passed
    batch-major, (B, multiple, *dims), so that every input and output of an export shares one
    dynamic batch dim (an exact reshape on either side).
    """
    schedule_node, site_nodes = _site_nodes(gm)
    fold = fold or {}
    graph = fx.Graph()
    env: dict[fx.Node, object] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for ph in placeholders:
        env[ph] = graph.placeholder(ph.name)
        env[ph].meta = dict(ph.meta)
    n_out = site_outputs(gm)
    cached: dict[int, tuple] = {}
    for i in sorted(site_nodes):
        if not computes[i]:
            vals = {u.args[1]: u.meta.get("val") for u in site_nodes[i].users}
            cached[i] = tuple(graph.placeholder(f"cache_{i}_{j}") for j in range(n_out[i]))
            for j, p in enumerate(cached[i]):
                p.meta["val"] = vals.get(j)
    batch = None
    if fold:
        batch_index = gm.get_submodule("pab").batch_index
        batch = graph.call_function(torch.ops.aten.sym_size.int, (env[placeholders[batch_index]], 0))
        for i, nodes in cached.items():
            cached[i] = tuple(graph.call_function(torch.ops.aten.reshape.default, (p, [-1, *fold[(i, j)]]))
                              if (i, j) in fold else p for j, p in enumerate(nodes))
    outputs_of: dict[int, list] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder" or n is schedule_node:
            continue
        if n.op == "output":
            flat_out = list(pytree.tree_leaves(n.args[0]))
            new_out = [env[o] if isinstance(o, fx.Node) else o for o in flat_out]
            for i in sorted(site_nodes):
                if computes[i]:
                    new_out.extend(outputs_of[i])
            graph.output(tuple(new_out))
            break
        if n.op == "call_module" and n in site_nodes.values():
            i = int(n.target.rsplit(".", 1)[1])
            if computes[i]:
                env[n] = _inline(graph, gm.get_submodule(n.target).attention,
                                 fx.node.map_arg(tuple(n.args[1:]), lambda a: env[a]))
                outputs_of[i] = [graph.call_function(torch.ops.aten.reshape.default, (o, [batch, -1, *fold[(i, j)]]))
                                 if (i, j) in fold else o for j, o in enumerate(env[n])]
            else:
                env[n] = cached[i]
            continue
        if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node) \
                and n.args[0] in site_nodes.values():
            env[n] = env[n.args[0]][n.args[1]]
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
    prog = fx.GraphModule(gm, graph, class_name="PABProgram")
    prog.graph.eliminate_dead_code()
    prog.recompile()
    return prog


def _inline(graph: fx.Graph, child: fx.GraphModule, args: tuple) -> tuple:
    """Copy an outlined site's nodes into `graph` (its get_attr targets are the root's); its outputs."""
    env = {}
    placeholders = iter(args)
    for c in child.graph.nodes:
        if c.op == "placeholder":
            env[c] = next(placeholders)
        elif c.op == "output":
            return tuple(fx.node.map_arg(c.args[0], lambda a: env[a]))
        else:
            env[c] = graph.node_copy(c, lambda a: env[a])
    raise AssertionError("outlined graph without output")




def _cache_layout(gm: fx.GraphModule, computes: tuple[bool, ...]):
    n_out = site_outputs(gm)
    ins = [(i, j) for i in sorted(n_out) if not computes[i] for j in range(n_out[i])]
    outs = [(i, j) for i in sorted(n_out) if computes[i] for j in range(n_out[i])]
    return ins, outs


def graph_specs(gm: fx.GraphModule):
    """(in_spec, out_spec) of a graph captured by torch.export (called like the model)."""
    info = gm.graph._codegen.pytree_info
    return info.in_spec, info.out_spec


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
            self._programs[computes] = (prog, *_cache_layout(self.gm, computes))
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


def runner_factory(gm: fx.GraphModule, compiled: bool) -> nn.Module:
    """What OptimizedModule runs for a PAB graph: one program per pattern, compiled or not."""
    return PABRunner(gm, compile=compiled)


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


_SHARED_ARENA: bool | None = None


def _share_cpu_arena(ort) -> bool:
    """Register one CPU arena allocator with onnxruntime's environment, once per process; False where
    this onnxruntime cannot (the sessions then keep their own arenas)."""
    global _SHARED_ARENA
    if _SHARED_ARENA is None:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, None)
            _SHARED_ARENA = True
        except Exception:  # noqa: BLE001 - an onnxruntime without environment allocators
            _SHARED_ARENA = False
    return _SHARED_ARENA


class OnnxPABRunner:
    """Runs a folder written by `dittofx.exporters.onnx_pab.export_pab_onnx` in onnxruntime.

    Called like `dittofx.runtime.OnnxRuntimeRunner`: the model's tensor inputs in the order of
    `input_names` (or by name) -> list of output tensors. Keeps the caches and the schedule state
    between calls (same rules as the eager graph); `reset()` drops them.
    """

    def __init__(self, directory, providers: list[str] | None = None, threads: int | None = None):
        import json
        import os

        from dittofx.errors import ExportError
        from dittofx.exporters.onnx_pab import FORMAT, MANIFEST

        self.directory = os.fspath(directory)
        path = os.path.join(self.directory, MANIFEST)
        if not os.path.isfile(path):
            raise ExportError(f"{self.directory} has no {MANIFEST}: not a folder written by export_pab_onnx")
        with open(path) as f:
            self.manifest = json.load(f)
        if self.manifest.get("format") != FORMAT:
            raise ExportError(f"{path} is not a {FORMAT} manifest")
        self.input_names = list(self.manifest["inputs"])
        self.rules = [Rule(s["range"], tuple(s["window"])) for s in self.manifest["sites"]]
        self.patterns = {tuple(p["computes"]): p for p in self.manifest["patterns"]}
        self._providers, self._threads = providers, threads
        self._sessions: dict[tuple[bool, ...], object] = {}
        self.reset()

    def reset(self) -> None:
        self.state = BroadcastState(self.rules)

    def session(self, computes: tuple[bool, ...]):
        import os

        from dittofx.errors import ExportError

        if computes not in self._sessions:
            entry = self.patterns.get(computes)
            if entry is None:
                bits = "".join("1" if c else "0" for c in computes)
                raise ExportError(f"this export has no model for broadcast pattern {bits}: export with "
                                  f"timesteps=None (every pattern) or with the timesteps this loop uses")
            self._sessions[computes] = self._session(os.path.join(self.directory, entry["file"]), entry)
        return self._sessions[computes]

    def _session(self, path: str, entry: dict):
        import onnxruntime as ort

        from dittofx.errors import ExportError

        providers = self._providers
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if self._threads is not None:
            so.intra_op_num_threads = int(self._threads)
        # one session per pattern, one running at a time: the idle sessions' worker threads must not
        # spin-wait after their run (measured: a 30-step loop at 2 threads ran 0.48x the untouched
        # model's speed with spinning, 1.57x without)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # and one memory arena for all of them: with an arena each, every switch of pattern ran on
        # cold buffers (measured on a small Latte: +0.2 to +0.7 ms a call, 8 % of the loop; shared: ~0)
        if _share_cpu_arena(ort):
            so.add_session_config_entry("session.use_env_allocators", "1")
        for name, value in (self._weights(entry) or {}).items():
            so.add_initializer(name, value)
        try:
            return ort.InferenceSession(path, so, providers=list(providers))
        except Exception as e:  # noqa: BLE001 - a bad file or provider is the user's input
            raise ExportError(f"onnxruntime cannot load {path}: {str(e).strip().splitlines()[0][:300]}") from None

    def _weights(self, entry: dict) -> dict | None:
        """{initializer name: OrtValue} over one memory map of the shared weights file."""
        import os

        import numpy as np
        import onnxruntime as ort

        shared = self.manifest.get("weights")
        if not shared or not entry.get("initializers"):
            return None
        if not hasattr(self, "_ort_weights"):
            path = os.path.join(self.directory, shared["file"])
            data = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) else np.zeros(0, np.uint8)
            self._ort_weights = {}
            for key, (offset, length, dtype, shape) in shared["tensors"].items():
                array = np.array(data[offset:offset + length]).view(np.dtype(dtype)).reshape(shape)
                self._ort_weights[key] = (array, ort.OrtValue.ortvalue_from_numpy(array))  # the array outlives the value
        return {name: self._ort_weights[key][1] for name, key in entry["initializers"].items()}

    def __call__(self, *inputs, **named) -> list[torch.Tensor]:
        import numpy as np

        from dittofx.runtime import _order_inputs

        values = dict(zip(self.input_names, _order_inputs(self.input_names, inputs, named, self.directory)))
        batch_input = self.manifest.get("batch_input")
        batch = values[batch_input].shape[0] if batch_input in values else None
        step = self.state.begin(values[self.manifest["timestep_input"]], batch)
        session = self.session(step.computes)
        entry = self.patterns[step.computes]
        feed = {}
        for meta in session.get_inputs()[:len(self.input_names)]:
            value = values[meta.name]
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu()
                value = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
            value = np.asarray(value)
            want = _ORT_TYPES.get(meta.type)
            feed[meta.name] = value.astype(want) if want is not None and value.dtype != want else value
        for (i, j), name in zip(entry["cache_inputs"], entry["inputs"][len(self.input_names):]):
            feed[name] = step.caches[i][j]  # as onnxruntime gave it: no conversion
        outs = session.run(None, feed)
        n = self.manifest["outputs"]
        fresh: dict[int, list] = {}
        for (i, _), value in zip(entry["cache_outputs"], outs[n:]):
            fresh.setdefault(i, []).append(value)
        for i, vals in fresh.items():
            step.caches[i] = tuple(vals)
        return [torch.from_numpy(np.ascontiguousarray(o)) for o in outs[:n]]


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}
