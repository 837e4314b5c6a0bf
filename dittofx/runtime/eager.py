"""Run a rewritten graph eagerly at the speed of the model's own Python code.

A captured graph calls ATen overloads (`torch.ops.aten.add.Tensor`), and every such call goes
through the overload's Python `__call__`: ~0.7 us more than the `torch.add` binding the model's own
code calls. On a small diffusion transformer (~200 ops, 2 ms a call) that is 5-7 % of the time, and
it is why a rewritten graph ran behind diffusers' PAB hook there. `eager_program` copies the graph
with each overload replaced by the C binding of the same name, which dispatches to the same kernel
(checked once per form of call on random arguments shaped like the node's; outputs are bitwise
equal), and with parameters and buffers read as plain attributes (the generated code otherwise
walks nn.Module.__getattr__ down the module tree for each, ~300 lookups a call for a 2-layer
CogVideoX). The graph itself keeps its overloads for analysis, compile and export.
"""

from __future__ import annotations

import types

import torch
from torch import fx
from torch.utils import _pytree as pytree

from dittofx._torch_compat import (
    VARIABLE_FUNCTIONS,
    DisableTorchFunction,
    _disable_current_modes,
    fx_emits,
)
from dittofx.rewriter.axes import size_hint
from dittofx.rewriter.edit import copy_module

_C_FUNCTIONS = (types.BuiltinFunctionType, types.MethodDescriptorType)


def binding(op) -> object | None:
    """The C binding named like ATen overload `op` (Python's argument parser then picks the overload
    from the arguments, as for the model's own calls), or None. Mutating overloads keep theirs, and so
    do those whose binding fx's generated code cannot name as itself (`__and__` has no module;
    `torch.split` is a Python wrapper, not the binding)."""
    if not isinstance(op, torch._ops.OpOverload) or op.namespace != "aten" or op._schema.is_mutable:
        return None
    name = op._schema.name.split("::", 1)[1]
    for namespace in VARIABLE_FUNCTIONS:
        fn = getattr(namespace, name, None)
        if isinstance(fn, _C_FUNCTIONS) and fx_emits(fn):
            return fn
    return None


def _example(value):
    """A real value standing in for a node's metadata: random floats, zero integers (valid indices)."""
    if isinstance(value, torch.Tensor):
        shape = [size_hint(d) for d in value.shape]
        if value.dtype.is_floating_point or value.dtype.is_complex:
            return torch.randn(shape, dtype=value.dtype, device=value.device)
        return torch.zeros(shape, dtype=value.dtype, device=value.device)
    if isinstance(value, torch.SymInt):
        return size_hint(value)
    return value


def _same(a, b) -> bool:
    """Equal values, dtypes and shapes, leaf by leaf (a binding may return a named tuple: same leaves)."""
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


_CHECKED: dict[tuple, bool] = {}


def _agrees(node: fx.Node, op, fn) -> bool:
    """Whether `fn` computes what `op` does on arguments like this node's: checked once per form of
    call and process (the argument parser may pick another overload, or refuse a keyword the
    overload takes), outside any torch function or dispatch mode the caller has on."""
    key = (op, tuple(type(a).__name__ for a in node.args), tuple(sorted(node.kwargs)))
    if key not in _CHECKED:
        try:
            args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), lambda a: _example(
                a.meta["val"]) if isinstance(a, fx.Node) else _example(a))
            with torch.no_grad(), _disable_current_modes(), DisableTorchFunction():
                _CHECKED[key] = _same(op(*args, **kwargs), fn(*args, **kwargs))
        except Exception:  # noqa: BLE001 - no metadata, or the binding refuses these arguments
            _CHECKED[key] = False
    return _CHECKED[key]


def make_eager(program: fx.GraphModule) -> fx.GraphModule:
    """Rewrite `program` in place for eager runs (see the module docstring); eager only: the tensors
    read as plain attributes are the model's, shared, and must be bound again after `.to()`."""
    for node in program.graph.nodes:
        if node.op == "call_function":
            fn = binding(node.target)
            if fn is not None and _agrees(node, node.target, fn):
                node.target = fn
        elif node.op == "get_attr" and "." in node.target:
            value = program
            for part in node.target.split("."):
                value = getattr(value, part)
            name = "_attr_" + node.target.replace(".", "_")
            program.__dict__[name] = value
            node.target = name
    program.recompile()
    return program


def eager_program(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` made for eager runs; parameters, buffers and submodules shared, not copied."""
    return make_eager(copy_module(gm))
