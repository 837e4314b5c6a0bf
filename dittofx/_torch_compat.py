"""The private torch APIs dittofx leans on, in one place (torch 2.14), so a torch upgrade is one file."""

from __future__ import annotations

import torch
from torch import fx
from torch.utils._python_dispatch import _disable_current_modes  # noqa: F401 - re-exported

# The C bindings an ATen overload has a twin in (runtime/eager.py).
VARIABLE_FUNCTIONS = (torch._C._VariableFunctions, torch._C._nn, torch._C.TensorBase)
DisableTorchFunction = torch._C.DisableTorchFunction


def graph_specs(gm: fx.GraphModule):
    """(in_spec, out_spec) of a graph captured by torch.export: it is called like the model."""
    info = gm.graph._codegen.pytree_info
    return info.in_spec, info.out_spec


def copy_codegen(dst: fx.Graph, src: fx.Graph) -> None:
    """Give `dst` the pytree calling convention of `src` (a captured graph takes the model's args)."""
    dst._codegen = src._codegen


def fresh_name(graph: fx.Graph, name: str) -> str:
    return graph._graph_namespace.create_name(name, None)


def detect_fake_mode(*values):
    return torch._guards.detect_fake_mode(values if values else None)


def is_fake(value) -> bool:
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return isinstance(value, torch.Tensor) and _is_fake(value)
