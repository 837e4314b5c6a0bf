"""One I/O boundary: how a call's (args, kwargs) and a model's outputs become flat leaves with paths and
names, which inputs carry the batch, and how flat values go back into the structure.

Capture (which inputs get a dynamic batch), OptimizedModule (which captured graph serves a call), the
ONNX exporter (input and output names, the flat module it exports), the runners (inputs by name or
position) and the measurement workloads (batch resizing) all read calls through this module, so they
agree on one order, one naming scheme and one batch rule.

Containers are those torch's pytree knows (tuples, lists, dicts, namedtuples, transformers'
ModelOutput, diffusers' BaseOutput, ...) plus dataclasses; every other object is a leaf. A path is
a tuple of keys: str for mapping keys and attributes, int for sequence positions.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.utils import _pytree as pytree

Path = tuple


def _children(tree) -> tuple[list, list, object] | None:
    """(keys, children, rebuild) of a container, None for a leaf; children in pytree's order."""
    node = pytree.SUPPORTED_NODES.get(pytree._get_node_type(tree))
    if node is not None:
        children, context = node.flatten_fn(tree)
        if node.flatten_with_keys_fn is not None:
            keys = [_key(k) for k, _ in node.flatten_with_keys_fn(tree)[0]]
        elif isinstance(tree, Mapping):  # diffusers' BaseOutput registers no key function
            keys = [str(k) if not isinstance(k, int) else k for k in tree.keys()]
        else:
            keys = list(range(len(children)))
        return keys, list(children), lambda values: node.unflatten_fn(values, context)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        fields = [f.name for f in dataclasses.fields(tree) if f.init]
        return fields, [getattr(tree, f) for f in fields], \
            lambda values: dataclasses.replace(tree, **dict(zip(fields, values)))
    return None


def _key(k) -> str | int:
    for attr in ("idx", "key", "name"):  # SequenceKey, MappingKey, GetAttrKey
        if hasattr(k, attr):
            value = getattr(k, attr)
            return value if isinstance(value, int) else str(value)
    return str(k)


def leaves(tree, path: Path = ()) -> Iterator[tuple[Path, object]]:
    """(path, leaf) for every leaf, tensors and other values (None is an empty container)."""
    found = _children(tree)
    if found is None:
        yield path, tree
        return
    keys, children, _ = found
    for k, child in zip(keys, children):
        yield from leaves(child, path + (k,))


def tensor_leaves(tree) -> list[tuple[Path, torch.Tensor]]:
    return [(p, v) for p, v in leaves(tree) if isinstance(v, torch.Tensor)]


def get(tree, path: Path):
    for key in path:
        keys, children, _ = _children(tree)
        tree = children[keys.index(key)]
    return tree


def replace(tree, values: dict[Path, object], path: Path = ()):
    """`tree` rebuilt with the leaves at the given paths replaced."""
    if path in values:
        return values[path]
    found = _children(tree)
    if found is None:
        return tree
    keys, children, rebuild = found
    return rebuild([replace(c, values, path + (k,)) for k, c in zip(keys, children)])


# -- names -----------------------------------------------------------------------------------------

# Attributes under which wrappers keep the module they forward to (dittofx's OptimizedModule,
# torch.compile's OptimizedModule, DataParallel-style wrappers).
_WRAPPED_ATTRS = ("original", "_orig_mod", "module", "model")


def forward_parameters(module, depth: int = 0) -> tuple[list[str], str | None]:
    """(names of forward's positional parameters, name of its *args or None). A wrapper whose forward
    is (*args, **kwargs) is looked through to the module it wraps."""
    positional, var_positional = [], None
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return positional, var_positional
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional.append(p.name)
        elif p.kind is p.VAR_POSITIONAL:
            var_positional = p.name
    if not positional and var_positional and depth < 4:
        for attr in _WRAPPED_ATTRS:
            try:
                inner = getattr(module, attr, None)
            except Exception:  # noqa: BLE001 - a property that raises
                inner = None
            if isinstance(inner, nn.Module) and inner is not module:
                return forward_parameters(inner, depth + 1)
    return positional, var_positional


def path_name(path: Path, top: str = "output") -> str:
    """`logits`, `hidden_states.0`, `output_0` (a tuple's first element), `output` (a lone tensor)."""
    if not path:
        return top
    parts = [str(p) for p in path]
    if isinstance(path[0], int):
        parts[0] = f"{top}_{path[0]}"
    return ".".join(parts)


def unique(names, taken=()) -> list[str]:
    seen, out = set(taken), []
    for n in names:
        cand, i = n, 1
        while cand in seen:
            cand = f"{n}_{i}"
            i += 1
        seen.add(cand)
        out.append(cand)
    return out


def input_names(module, args: tuple, kwargs: dict) -> list[str]:
    """A name for every tensor input, after forward's parameters: `x`, `encoder_hidden_states`,
    `added_cond_kwargs.resolution`; `input_0` where no name is known."""
    positional, var_positional = forward_parameters(module)
    names = []
    for p, _ in tensor_leaves((tuple(args), dict(kwargs))):
        if p[0] == 0:
            i = p[1]
            if i < len(positional):
                base = positional[i]
            elif var_positional and var_positional != "args":
                base = f"{var_positional}_{i - len(positional)}"
            else:
                base = f"input_{i}"
        else:
            base = str(p[1])
        names.append(path_name(p[2:], base) if len(p) > 2 else base)
    return unique(names)


def output_names(outputs, taken=()) -> list[str]:
    return unique([path_name(p) for p, _ in tensor_leaves(outputs)], taken=taken)


# -- the batch -------------------------------------------------------------------------------------


def batch_of(values) -> int | None:
    """The batch of a call: dim 0 of its first tensor with at least one dim."""
    return next((int(v.shape[0]) for v in values if isinstance(v, torch.Tensor) and v.dim() >= 1), None)


def batched(values, batch: int | None = None) -> list[int]:
    """Positions of the tensors whose dim 0 is the batch (`batch`, else the call's own)."""
    batch = batch_of(values) if batch is None else batch
    if batch is None:
        return []
    return [i for i, v in enumerate(values) if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch]


def resize_batch(tree, batch: int, new: int):
    """`tree` with every tensor whose dim 0 is `batch` cycled to `new` rows (rows 0, 1, ... repeated)."""
    found = list(leaves(tree))
    rows = torch.arange(new) % batch
    return replace(tree, {found[i][0]: found[i][1][rows.to(found[i][1].device)]
                          for i in batched([v for _, v in found], batch)})


# -- calls -----------------------------------------------------------------------------------------


def call_key(args: tuple, kwargs: dict, free_batch: set[int]) -> tuple:
    """What a call must match to reuse a captured graph: structure, constants, dtypes, devices and
    shapes, with dim 0 free at the flat positions in `free_batch`."""
    # pytree's own flatten: this runs on every call, and for what torch.export can capture (no bare
    # dataclass inputs) its order is `leaves`', which capture's batched positions refer to
    flat, spec = pytree.tree_flatten((tuple(args), dict(sorted(kwargs.items()))))
    key = []
    for i, x in enumerate(flat):
        if isinstance(x, torch.Tensor):
            shape = tuple(x.shape[1:]) if i in free_batch else tuple(x.shape)
            key.append(("T", x.dtype, x.device.type, x.dim(), shape))
        else:
            key.append(("V", type(x), x))
    return spec, tuple(key)


def order_inputs(names: list[str], inputs: tuple, named: dict, who: str, error=ValueError) -> list:
    """Inputs given by position, then by name, in the order of `names`; `error` (one line) otherwise."""
    if named:
        unknown = set(named) - set(names)
        if unknown:
            raise error(f"{who} has no input(s) {sorted(unknown)}; its inputs are {names}")
    values = list(inputs)
    if len(values) > len(names):
        raise error(f"{who} takes {len(names)} input(s) ({', '.join(names)}), got {len(values)}")
    for name in names[len(values):]:
        if name not in named:
            raise error(f"{who} is missing input {name!r}; its inputs are {names}")
        values.append(named[name])
    return values


class FlatModule(nn.Module):
    """forward(*tensors) -> tuple of tensors: `module` between the flat tensor inputs of (args, kwargs)
    and the flat tensor outputs of what it returns on them (the form an ONNX graph has)."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict, outputs):
        super().__init__()
        self.inner = module
        self._template = (tuple(args), dict(kwargs))
        self._in_paths = [p for p, _ in tensor_leaves(self._template)]
        self._out_paths = [p for p, _ in tensor_leaves(outputs)]

    def forward(self, *tensors):
        args, kwargs = replace(self._template, dict(zip(self._in_paths, tensors)))
        out = self.inner(*args, **kwargs)
        return tuple(get(out, p) for p in self._out_paths)
