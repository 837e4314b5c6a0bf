"""The private torch APIs dittofx leans on, in one place (torch 2.14), so a torch upgrade is one file."""

from __future__ import annotations

import importlib
import weakref

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, resolve_unbacked_bindings
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


def fx_emits(fn) -> bool:
    """Whether fx's code generation can name `fn`, and names it, not another function: fx writes a
    torch object by its qualified name, which for some C bindings does not exist (`__and__`) or is a
    Python wrapper of the same name (`torch.split`, `torch.norm`: other argument handling)."""
    try:
        name = fx.node._get_qualified_name(fn)
    except Exception:  # noqa: BLE001 - fx cannot find its module
        return False
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part, None)
        return obj is fn
    return False


# -- data-dependent sizes ------------------------------------------------------------------------
# torch.export gives a size that depends on tensor values (nonzero's row count) an unbacked symbol,
# with no example value. The capture runs the graph once and records the value each one took on the
# example inputs, per ShapeEnv, so that analysis reads sizes as it does for the batch.

_UNBACKED_EXAMPLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _shape_env(value):
    """The ShapeEnv a fake tensor's or SymInt's sizes live in (the first found in a container), or None."""
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return value.node.shape_env
    if isinstance(value, torch.Tensor):
        mode = getattr(value, "fake_mode", None)
        if mode is not None and mode.shape_env is not None:
            return mode.shape_env
        return next((env for env in map(_shape_env, value.shape) if env is not None), None)
    if isinstance(value, (tuple, list, dict)):
        items = value.values() if isinstance(value, dict) else value
        return next((env for env in map(_shape_env, items) if env is not None), None)
    return None


def shape_env_of(gm: fx.GraphModule):
    """The ShapeEnv of a captured graph's metadata, or None."""
    return next((env for env in (_shape_env(n.meta.get("val")) for n in gm.graph.nodes) if env is not None), None)


def unbacked_bindings(node: fx.Node, shape_env) -> dict:
    """{unbacked symbol: key path into the node's output} for the sizes `node` creates."""
    return resolve_unbacked_bindings(shape_env, node.meta.get("unbacked_bindings")) or {}


def record_unbacked_examples(shape_env, values: dict) -> None:
    _UNBACKED_EXAMPLES.setdefault(shape_env, {}).update(values)


def unexampled_unbacked_symbols(value) -> set:
    """The unbacked symbols in `value` (a fake tensor, a SymInt, a container) with no recorded example."""
    symbols = free_unbacked_symbols(value)
    if not symbols:
        return set()
    env = _shape_env(value)
    return set(symbols) - set(_UNBACKED_EXAMPLES.get(env, {}) if env is not None else {})


def symint_example(size: torch.SymInt) -> int:
    """The example value of a symbolic size: its hint, or from the backed sizes and the recorded
    values of data-dependent ones; raises GuardOnDataDependentSymNode when one has no recorded value."""
    node = size.node
    if node.has_hint():
        return int(node.hint)
    env = node.shape_env
    expr = node.expr
    values = _UNBACKED_EXAMPLES.get(env) if env is not None else None
    if values:
        expr = expr.xreplace(env.replacements).xreplace(values)
    return int(env.guarding_hint_or_throw(expr))
