"""Capture a model as one ATen-level graph with torch.export (non-strict), SDPA kept, batch dynamic.

Sizes that depend on tensor values (Mochi keeps each sample's valid text tokens with nonzero) are
unbacked symbols in the graph with no example value; the capture runs the graph once on its example
inputs and records the value of each (`_torch_compat.symint_example` reads them), so the analysis
reads them as it reads the batch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import free_symbols
from torch.utils import _pytree as pytree

from dittofx import signature
from dittofx._torch_compat import record_unbacked_examples, shape_env_of, unbacked_bindings
from dittofx.errors import CaptureError, DittoError, first_line
from dittofx.rewriter.quiet import EXPORT_LOCK, quiet_export


@dataclass
class Capture:
    graph_module: fx.GraphModule  # called like the model: same args, kwargs and output structure
    example_inputs: tuple  # the inputs it was captured with (batch possibly enlarged, see `_export_batch`)
    example_kwargs: dict
    batched_inputs: set[int]  # indices of flat tensor inputs (placeholders) whose dim 0 is the batch
    dynamic_batch: bool
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def flat_inputs(self) -> list:
        return [v for _, v in signature.leaves((self.example_inputs, self.example_kwargs))]


def _export_batch(args, kwargs, batch: int) -> int:
    """A batch size of at least 2 (1 specialises) that no other input dim equals (no accidental guard)."""
    other = {s for _, t in signature.tensor_leaves((args, kwargs)) for s in t.shape[1:]}
    b = max(batch, 2)
    while b in other:
        b += 1
    return b


def capture(model: torch.nn.Module, example_inputs=(), example_kwargs=None, dynamic_batch: bool = True) -> Capture:
    """Export `model` on the examples; every input whose dim 0 is the batch gets a dynamic batch.

    Falls back to a static batch (noted) where the model pins it. Any failure is one CaptureError
    line naming the model's class and the cause.
    """
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    if signature.batch_of([v for _, v in signature.leaves((args, kwargs))]) == 0:
        raise CaptureError(f"the example inputs of {type(model).__name__} have a batch of 0 (dim 0 of the first "
                           f"tensor): give at least one sample")
    try:
        return _capture(model, args, kwargs, dynamic_batch)
    except CaptureError:
        cause = _model_failure(model, args, kwargs)
        if cause is None:
            raise
        raise CaptureError(f"{type(model).__name__} fails on the example inputs, before any capture: "
                           f"{type(cause).__name__}: {first_line(cause)} (check them against what the model "
                           f"accepts)") from cause
    except DittoError:
        raise
    except Exception as e:  # whatever fails around the export (reading its graph, running it) is "could not capture"
        raise CaptureError(f"dittofx could not capture {type(model).__name__}: {type(e).__name__}: {first_line(e)}") \
            from e


def _model_failure(model, args: tuple, kwargs: dict) -> Exception | None:
    """What the model itself raises on the example, run as it is (an assertion on the input size, a
    shape mismatch): then that, not torch.export's advice, is why the capture failed. None if it runs.
    A model in training mode gets its buffers back (batch norm's running statistics)."""
    with EXPORT_LOCK, torch.no_grad():  # no other thread's export has the weights swapped for fakes
        saved = [(b, b.clone()) for b in model.buffers()] if model.training else []
        try:
            model(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - whatever the model raises is the cause
            return e
        finally:
            for buffer, value in saved:
                buffer.copy_(value)
    return None


def _capture(model, args: tuple, kwargs: dict, dynamic_batch: bool) -> Capture:
    batch = signature.batch_of([v for _, v in signature.leaves((args, kwargs))])
    start = time.perf_counter()
    notes = []
    gm = None
    if dynamic_batch and batch is not None:
        b = _export_batch(args, kwargs, batch)
        dyn_args, dyn_kwargs = signature.resize_batch((args, kwargs), batch, b) if b != batch else (args, kwargs)
        spec = pytree.tree_map(
            lambda x: {0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == b
            else None, (dyn_args, dyn_kwargs))
        try:
            gm = _export(model, dyn_args, dyn_kwargs, dynamic_shapes=_dynamic_shapes(model, spec)).module()
        except CaptureError as e:
            notes.append(f"dynamic batch failed ({e}); captured with a static batch")
        if gm is not None and not _dynamic_batch(gm, dyn_args, dyn_kwargs, b):
            # Dim.AUTO specialises silently where the model pins the batch (a Python loop over it)
            notes.append("the model fixes its batch size; captured with a static batch")
            if b != batch:
                gm = None  # captured at the enlarged batch: again at the caller's
        if gm is not None:
            args, kwargs, batch = dyn_args, dyn_kwargs, b
    if gm is None:
        gm = _export(model, args, kwargs, dynamic_shapes=None).module()
    flat = [v for _, v in signature.leaves((args, kwargs))]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    batched = {i for i in signature.batched(flat, batch) if i < len(placeholders)}
    dynamic = _dynamic_batch(gm, args, kwargs, batch)
    found = _record_data_dependent_sizes(gm, flat[:len(placeholders)])
    if found:
        notes.append(f"{found} data-dependent sizes (e.g. tokens kept by a mask); their example values recorded")
    return Capture(gm, args, kwargs, batched, dynamic, time.perf_counter() - start, notes)


def _dynamic_batch(gm: fx.GraphModule, args, kwargs, batch: int | None) -> bool:
    """Whether every input whose dim 0 is the batch kept a symbol for it in the graph."""
    flat = [v for _, v in signature.leaves((args, kwargs))]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    batched = [i for i in signature.batched(flat, batch) if i < len(placeholders)]
    return bool(batched) and all(_symbolic(placeholders[i].meta.get("val")) for i in batched)


def _symbolic(val) -> bool:
    """Whether a placeholder's dim 0 is still a symbol (not one the capture specialised to a number)."""
    return isinstance(val, torch.Tensor) and bool(free_symbols(val.shape[0]))


class _SizeRecorder(fx.Interpreter):
    """Runs the graph on real inputs and keeps the value each unbacked symbol takes."""

    def __init__(self, gm: fx.GraphModule, shape_env):
        super().__init__(gm)
        self.shape_env = shape_env
        self.values: dict = {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        for symbol, path in unbacked_bindings(n, self.shape_env).items():
            self.values[symbol] = int(pytree.key_get(result, path))
        return result


def _record_data_dependent_sizes(gm: fx.GraphModule, flat_inputs: list) -> int:
    """Give every unbacked size of the graph (torch.export's symbol for a size that depends on tensor
    values) the value it takes on the example inputs, so analysis reads it as it reads the batch.
    Returns how many there are."""
    env = shape_env_of(gm)
    if env is None or not any("unbacked_bindings" in n.meta for n in gm.graph.nodes):
        return 0
    recorder = _SizeRecorder(gm, env)
    with torch.no_grad():
        recorder.run(*flat_inputs)
    record_unbacked_examples(env, recorder.values)
    return len(recorder.values)


def _dynamic_shapes(model, spec):
    """torch.export wants dynamic shapes shaped like (args..., kwargs by name) of forward's signature."""
    args_spec, kwargs_spec = spec
    if not kwargs_spec:
        return args_spec
    return {**dict(zip(signature.forward_parameters(model)[0], args_spec)), **kwargs_spec}


def _export(model, args, kwargs, dynamic_shapes):
    try:
        with torch.no_grad(), quiet_export():  # its diagnostics: reported below in one line
            return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # torch.export raises many types; all mean "could not capture"
        first = first_line(e)
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {first}. Check that example_inputs/"
            f"example_kwargs match forward(), and replace Python control flow on tensor values "
            f"(if/len/.item()) with tensor ops or move it out of forward") from e
