"""`dittofx.optimize()`: capture, analyse, run the passes, and hand back a drop-in module."""

from __future__ import annotations

import torch
from torch import fx, nn

from dittofx import runtime, signature
from dittofx.errors import DittoError
from dittofx.passes.base import Pass
from dittofx.passes.manager import PassManager, check_order
from dittofx.passes.spec import parse_passes
from dittofx.report import Report
from dittofx.rewriter.capture import Capture, capture


def optimize(model: nn.Module, passes=(), example_inputs=None, example_kwargs=None, *,
             dynamic_batch: bool = True, compile: bool = False) -> OptimizedModule:
    """Return `model` rewritten by `passes`, as a drop-in module with a `report`.

    passes: Pass objects (`ToMe(r=16)`, from `dittofx.passes`) or spec strings (`"tome:r=16"`),
        applied in order (passes/manager.py says what runs when and what is checked).
    example_inputs / example_kwargs: what forward() is called with; the batch may be any size (it is
    dynamic in the result). Left out, they are inferred where the model states its input size.
    compile: wrap the rewritten graph in `torch.compile(fullgraph=True)`.
    """
    if not isinstance(model, nn.Module):
        raise DittoError(f"optimize() takes a torch.nn.Module, not {type(model).__name__}")
    pass_list = parse_passes(passes)
    check_order(pass_list)  # before the capture's work
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


class _Variant(nn.Module):
    """One captured and rewritten graph, for one call signature."""

    def __init__(self, gm: fx.GraphModule, cap: Capture, report: Report, compiled: bool):
        super().__init__()
        self.gm = gm
        self.capture = cap
        self.report = report
        free = cap.batched_inputs if cap.dynamic_batch else set()
        self.key = signature.call_key(cap.example_inputs, cap.example_kwargs, free)
        self.free_batch = free
        self.compiled = compiled
        self.build_runner()

    def build_runner(self) -> None:
        """What a call runs (runtime.make_runner): a stateful graph's own runner, torch.compile, or an
        eager program over the same tensors."""
        self.runner = runtime.make_runner(self.gm, self.compiled)

    def matches(self, args, kwargs) -> bool:
        return signature.call_key(args, kwargs, self.free_batch) == self.key

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

    @property
    def stateful(self) -> bool:
        """Does the rewritten graph keep state between calls (PAB's caches)? `reset()` drops it."""
        return runtime.is_stateful(self.graph_module)

    def forward(self, *args, **kwargs):
        return self._variant(args, kwargs).run(args, kwargs)

    def graph_for(self, args=None, kwargs=None) -> tuple[fx.GraphModule, tuple, dict]:
        """(rewritten graph, args, kwargs): the graph that serves `self(*args, **kwargs)`, captured now if
        no earlier call had that form; with no arguments, the latest graph and the example it was
        captured with. What exporters export."""
        if args is None and not kwargs:
            variant = self.variants[-1]
            return variant.gm, variant.capture.example_inputs, variant.capture.example_kwargs
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        return self._variant(args, kwargs).gm, args, kwargs

    def _variant(self, args: tuple, kwargs: dict) -> _Variant:
        for variant in self.variants:
            if variant.matches(args, kwargs):
                return variant
        return self._build(args, kwargs)

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
            runtime.reset(variant.gm)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        try:  # a value that a pass records at run time (e.g. ToMe's `tome_source`): the latest recorded
            return runtime.recorded([v.gm for v in self.variants], name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)

    def extra_repr(self) -> str:
        return f"model={type(self.original).__name__}, passes=[{', '.join(p.spec() for p in self.passes)}]"


def rewrite(model: nn.Module, passes: list[Pass], args: tuple, kwargs: dict, *, dynamic_batch: bool = True):
    """Capture `model` and run `passes` over the graph (passes/manager.py); (graph module, capture, report)."""
    cap = capture(model, args, kwargs, dynamic_batch=dynamic_batch)
    gm, report = PassManager(passes).run(model, cap)
    return gm, cap, report
