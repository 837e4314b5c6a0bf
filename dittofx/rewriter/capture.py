"""Capture a model as one ATen-level graph with torch.export (non-strict), SDPA kept, batch dynamic."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.utils import _pytree as pytree

from dittofx import signature
from dittofx.errors import CaptureError, first_line


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

    Falls back to a static batch (noted) where the model pins it.
    """
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    flat = [v for _, v in signature.leaves((args, kwargs))]
    batch = signature.batch_of(flat)
    start = time.perf_counter()
    notes = []
    exported = None
    if dynamic_batch and batch is not None:
        b = _export_batch(args, kwargs, batch)
        if b != batch:
            args, kwargs = signature.resize_batch((args, kwargs), batch, b)
        spec = pytree.tree_map(
            lambda x: {0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == b
            else None, (args, kwargs))
        try:
            exported = _export(model, args, kwargs, dynamic_shapes=_dynamic_shapes(model, spec))
        except CaptureError as e:
            notes.append(f"dynamic batch failed ({e}); captured with a static batch")
            exported = None
        batch = b
    if exported is None:
        exported = _export(model, args, kwargs, dynamic_shapes=None)
    gm = exported.module()
    flat = [v for _, v in signature.leaves((args, kwargs))]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    batched = {i for i in signature.batched(flat, batch) if i < len(placeholders)}
    dynamic = any(isinstance(placeholders[i].meta.get("val"), torch.Tensor)
                  and isinstance(placeholders[i].meta["val"].shape[0], torch.SymInt) for i in batched)
    if dynamic_batch and not dynamic and not notes:
        notes.append("the model fixes its batch size; captured with a static batch")
    return Capture(gm, args, kwargs, batched, dynamic, time.perf_counter() - start, notes)


def _dynamic_shapes(model, spec):
    """torch.export wants dynamic shapes shaped like (args..., kwargs by name) of forward's signature."""
    args_spec, kwargs_spec = spec
    if not kwargs_spec:
        return args_spec
    return {**dict(zip(signature.forward_parameters(model)[0], args_spec)), **kwargs_spec}


def _export(model, args, kwargs, dynamic_shapes):
    # torch.export logs and prints multi-line diagnostics (graphs) on the way to a failure; the failure
    # is reported below in one line
    logging.disable(logging.WARNING)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # torch.export raises many types; all mean "could not capture"
        first = first_line(e)
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {first}. Check that example_inputs/"
            f"example_kwargs match forward(), and replace Python control flow on tensor values "
            f"(if/len/.item()) with tensor ops or move it out of forward") from e
    finally:
        logging.disable(logging.NOTSET)

