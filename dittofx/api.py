"""`dittofx.optimize()`: capture, analyse, run the passes, and hand back a drop-in module."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from dittofx.errors import DittoError, UnsupportedModelError
from dittofx.passes.base import Pass, PassContext
from dittofx.passes.spec import REGISTRY, parse_passes
from dittofx.report import BlockReport, Report
from dittofx.rewriter import graph as graph_util
from dittofx.rewriter.analysis import Analysis, analyze
from dittofx.rewriter.capture import Capture, capture
from dittofx.rewriter.eager import eager_program


def optimize(model: nn.Module, passes=(), example_inputs=None, example_kwargs=None, *,
             dynamic_batch: bool = True, compile: bool = False) -> OptimizedModule:
    """Return `model` rewritten by `passes`, as a drop-in module with a `report`.

    passes: Pass objects (`ToMe(r=16)`) or spec strings (`"tome:r=16"`), applied in order.
    example_inputs / example_kwargs: what forward() is called with; the batch may be any size (it is
    dynamic in the result). Left out, they are inferred where the model states its input size.
    compile: wrap the rewritten graph in `torch.compile(fullgraph=True)`.
    """
    if not isinstance(model, nn.Module):
        raise DittoError(f"optimize() takes a torch.nn.Module, not {type(model).__name__}")
    pass_list = parse_passes(passes)
    if example_inputs is None and not example_kwargs:
        from dittofx.models import example_inputs_for

        inferred = example_inputs_for(model)
        if inferred is None:
            raise DittoError(f"cannot infer the input size of {type(model).__name__}: pass example_inputs=(...), "
                             f"the tensors forward() takes")
        example_inputs, example_kwargs = inferred
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    return OptimizedModule(model, pass_list, tuple(example_inputs or ()), dict(example_kwargs or {}),
                           dynamic_batch=dynamic_batch, compile=compile)


@dataclass
class _Signature:
    """What a call must look like to reuse a captured graph: same structure, constants, dtypes, and
    shapes (the batch dim free where the graph has a dynamic batch)."""

    spec: pytree.TreeSpec
    leaves: tuple

    @staticmethod
    def of(args, kwargs, free_batch: set[int]) -> _Signature:
        flat, spec = pytree.tree_flatten((tuple(args), dict(sorted(kwargs.items()))))
        leaves = []
        for i, x in enumerate(flat):
            if isinstance(x, torch.Tensor):
                shape = tuple(x.shape[1:]) if i in free_batch else tuple(x.shape)
                leaves.append(("T", x.dtype, x.device.type, x.dim(), shape))
            else:
                leaves.append(("V", type(x), x))
        return _Signature(spec, tuple(leaves))


class _Variant(nn.Module):
    """One captured and rewritten graph, for one call signature."""

    def __init__(self, gm: fx.GraphModule, cap: Capture, report: Report, compiled: bool):
        super().__init__()
        self.gm = gm
        self.capture = cap
        self.report = report
        free = cap.batched_inputs if cap.dynamic_batch else set()
        self.signature = _Signature.of(cap.example_inputs, cap.example_kwargs, free)
        self.free_batch = free
        self.compiled = compiled
        self.build_runner()

    def build_runner(self) -> None:
        """What a call runs: compiled, or an eager program (rewritten/eager.py) over the same tensors."""
        gm = self.gm
        make_runner = gm.meta.get("dittofx_runner")  # a pass whose state lives outside the graph (PAB)
        if make_runner is not None:
            self.runner = make_runner(gm, self.compiled)
        else:
            self.runner = torch.compile(gm, fullgraph=True) if self.compiled else eager_program(gm)

    def matches(self, args, kwargs) -> bool:
        return _Signature.of(args, kwargs, self.free_batch) == self.signature

    def run(self, args, kwargs):
        if isinstance(self.runner, fx.GraphModule) and (torch.compiler.is_exporting() or torch.compiler.is_compiling()):
            return self.gm(*args, **kwargs)  # traced by the caller: the graph itself, its tensors registered
        return self.runner(*args, **kwargs)


class OptimizedModule(nn.Module):
    """A drop-in for the original model: same call signature and outputs, original attributes.

    A call whose structure, constants or non-batch shapes differ from those captured is captured
    and rewritten again (once, then reused), as torch.compile does on a guard failure.
    """

    def __init__(self, model: nn.Module, passes: list[Pass], example_inputs: tuple, example_kwargs: dict, *,
                 dynamic_batch: bool = True, compile: bool = False):
        super().__init__()
        self.__dict__["_original"] = model  # not a submodule: its parameters are shared, not copied
        self.passes = passes
        self.dynamic_batch = dynamic_batch
        self.compiled = compile
        self.variants = nn.ModuleList()
        self._build(example_inputs, example_kwargs)

    @property
    def original(self) -> nn.Module:
        return self.__dict__["_original"]

    @property
    def report(self) -> Report:
        return self.variants[-1].report

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.variants[-1].gm

    def forward(self, *args, **kwargs):
        for variant in self.variants:
            if variant.matches(args, kwargs):
                return variant.run(args, kwargs)
        return self._build(args, kwargs).run(args, kwargs)

    def _build(self, args: tuple, kwargs: dict) -> _Variant:
        kwargs = dict(sorted(kwargs.items()))
        gm, cap, report = rewrite(self.original, self.passes, args, kwargs, dynamic_batch=self.dynamic_batch)
        variant = _Variant(gm, cap, report, self.compiled)
        self.variants.append(variant)
        return variant

    def _apply(self, fn, *args, **kwargs):
        """`.to()`, `.half()`, ...: eager programs read the tensors directly, so they are bound again."""
        result = super()._apply(fn, *args, **kwargs)
        for variant in self.variants:
            if not variant.compiled:
                variant.build_runner()
        return result

    def reset(self) -> None:
        """Reset the state of stateful passes (e.g. PAB's caches) in every captured graph."""
        for variant in self.variants:
            for module in variant.gm.modules():
                if module is not variant.gm and hasattr(module, "reset"):
                    module.reset()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        # a value that a pass records at run time (e.g. ToMe's `tome_source`): the latest recorded
        recorders = [m for v in self.variants for n, m in v.gm.named_children()
                     if n == name and getattr(m, "dittofx_recorder", False)]
        if recorders:
            return max(recorders, key=lambda m: m.stamp).value
        return getattr(self.__dict__["_original"], name)

    def extra_repr(self) -> str:
        return f"model={type(self.original).__name__}, passes=[{', '.join(p.spec() for p in self.passes)}]"


def rewrite(model: nn.Module, passes: list[Pass], args: tuple, kwargs: dict, *, dynamic_batch: bool = True):
    """Capture `model` and run `passes` over the graph; returns (graph module, capture, report)."""
    cap = capture(model, args, kwargs, dynamic_batch=dynamic_batch)
    gm = cap.graph_module
    analysis = analyze(gm, cap.batched_inputs)
    if passes:
        from dittofx.passes.sdpa import CanonicalizeAttention

        if not any(isinstance(p, CanonicalizeAttention) for p in passes):
            passes = [CanonicalizeAttention()] + list(passes)
    report = _report(model, cap, analysis)
    for i, p in enumerate(passes):
        if not analysis.sites and not isinstance(p, _canonical()):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no attention for pass {p.name!r} to rewrite: dittofx looks for "
                f"scaled_dot_product_attention or softmax(Q @ K^T) @ V in the captured graph")
        result = p.run(PassContext(gm, cap, analysis, model, later=list(passes[i + 1:])))
        if result.changed:
            graph_util.remove_dead(gm)
            gm.recompile()
            try:
                graph_util.refresh_meta(gm, cap.flat_inputs())
            except Exception as e:
                raise DittoError(f"pass {p.spec()!r} produced a graph that does not run on the example inputs "
                                 f"({str(e).splitlines()[0][:200]})") from e
            analysis = analyze(gm, cap.batched_inputs)
            report = _report(model, cap, analysis, report)
        for block, notes in result.block_notes.items():
            try:
                report.block(block).actions.extend(notes)
            except KeyError:
                report.notes.extend(f"{block}: {n}" for n in notes)
        report.notes.extend(result.notes)
        report.stats.update(result.stats)
        if not isinstance(p, _canonical()):
            report.passes.append(p.spec())
    return gm, cap, report


def _canonical():
    from dittofx.passes.sdpa import CanonicalizeAttention

    return CanonicalizeAttention


def _report(model: nn.Module, cap: Capture, analysis: Analysis, previous: Report | None = None) -> Report:
    """Describe every block; `previous` carries over the actions and notes recorded so far."""
    candidates = _known_passes()
    blocks = []
    for block in analysis.blocks:
        applicable = [name for name, p in candidates if p.check(analysis, block) is None]
        blocks.append(BlockReport(block.name, block.kinds, block.tokens, block.prefix, applicable))
    report = Report(type(model).__name__, blocks, notes=list(cap.notes), dynamic_batch=cap.dynamic_batch,
                    capture_seconds=cap.seconds,
                    timestep_input=analysis.timestep_input.name if analysis.timestep_input is not None else None,
                    patch_embedding=_patch_name(analysis))
    if previous is not None:
        report.notes = previous.notes
        report.passes = previous.passes
        report.stats = previous.stats
        for b in report.blocks:
            try:
                b.actions = previous.block(b.name).actions
            except KeyError:
                pass
        # a block whose attention a pass moved into a submodule (PAB) keeps its description
        found = {b.name: b for b in report.blocks}
        if any(b.name not in found for b in previous.blocks):
            report.blocks = [found.pop(b.name, b) for b in previous.blocks] + list(found.values())
    return report


def _patch_name(analysis: Analysis) -> str | None:
    if not analysis.patch_embeddings:
        return None
    conv = analysis.patch_embeddings[0]
    from dittofx.rewriter.analysis import module_path

    paths = module_path(conv)
    return f"{paths[-1] if paths else conv.name} ({conv.target.__name__.split('.')[0]})"


def _known_passes() -> list[tuple[str, Pass]]:
    """A default instance of every registered user-facing pass, to say which would apply."""
    from dittofx.passes.spec import pass_class

    return [(name, pass_class(name)()) for name in REGISTRY if name != "sdpa"]

