"""Axis provenance: which input axes, patch-grid axes and token segments each tensor axis carries.

Every tensor axis in the graph gets an `Axis`: an ordered tuple of labels (major to minor) naming where
its extent comes from (the batch, an axis of an input, the rows/columns/frames of a patch
embedding), plus how many leading positions carry none of the patch grid (class, distillation,
register or text tokens). Channel-like axes carry no label. This one forward walk answers every
structural question the passes ask: is an attention over space, time, both, or another sequence;
which axis of the residual stream holds the tokens; how many prefix tokens there are; and which
literal sizes in reshapes, views and expands are token counts.

Patch embeddings are a convolution (any ATen form: `conv2d.padding` for `padding="valid"`,
`convolution`, 1-, 2- and 3-D), or a Linear over raw input values: over patchified ones (a reshape,
`Tensor.unfold` or `F.unfold` splits input axes into (grid, patch) and the patch parts go to the
features: the grid parts become frames / rows / columns), or over the packed latent (Flux, LTX-Video:
one token axis whose frames and rows the graph cannot tell apart, labelled `grid_packed`). A pooling of
the grid (PiT, a strided conv or a pool) labels its smaller grid anew.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from dittofx._torch_compat import symint_example

aten = torch.ops.aten


@dataclass(frozen=True)
class Label:
    """One source of extent: `kind` is batch | input | grid_t | grid_h | grid_w | grid_packed; `size` its
    extent. An input axis that a reshape splits into several axes gives each part its own label whose
    `parent` is the input axis (a patchify: (frames, height, width) into (grid, patch) parts)."""

    kind: str
    name: str
    size: int
    parent: Label | None = None

    @property
    def is_grid(self) -> bool:
        return self.kind.startswith("grid")

    @property
    def root(self) -> Label:
        """The input axis this label was split from (itself when it was not)."""
        lab = self
        while lab.parent is not None:
            lab = lab.parent
        return lab

    @property
    def input_name(self) -> str | None:
        """The placeholder an input label comes from."""
        return self.root.name.split(".")[0] if self.kind == "input" else None

    def __repr__(self) -> str:
        return f"{self.kind}:{self.name}({self.size})"


@dataclass(frozen=True)
class Axis:
    labels: tuple[Label, ...] = ()
    prefix: int = 0  # leading positions that carry no grid label (class / register / text tokens)

    @property
    def grid(self) -> frozenset[Label]:
        return frozenset(lab for lab in self.labels if lab.is_grid)

    def __bool__(self) -> bool:
        return bool(self.labels)


EMPTY = Axis()
Axes = tuple[Axis, ...]


@dataclass
class AxisMap:
    """Axes of every node's value (a tuple of Axis for a tensor, a list of those for a tuple output),
    and the axis a symbolic size node reads (for `sym_size` and the arithmetic on it)."""

    tensors: dict[fx.Node, object] = field(default_factory=dict)
    symbols: dict[fx.Node, Axis] = field(default_factory=dict)
    patch_embeddings: list[fx.Node] = field(default_factory=list)  # convolutions
    latent: str | None = None  # the placeholder the model denoises (see `analysis.latent_input`)
    # Linears that embed raw input values: "patches" (over a patchified input) or "packed" (the packed latent)
    token_embeddings: dict[fx.Node, str] = field(default_factory=dict)
    embedded_inputs: set[str] = field(default_factory=set)  # the inputs those Linears patchify or pack
    # for each Linear over patches: the input axes it cuts into patches and the grid axis each becomes
    patch_axes: dict[fx.Node, dict[Label, str]] = field(default_factory=dict)

    def __getitem__(self, node: fx.Node) -> Axes:
        value = self.tensors.get(node)
        return value if isinstance(value, tuple) else ()

    def axis_of(self, node: fx.Node, dim: int) -> Axis:
        axes = self[node]
        if not axes:
            return EMPTY
        return axes[dim] if -len(axes) <= dim < len(axes) else EMPTY


def shape_of(node) -> tuple[int, ...] | None:
    """Concrete sizes of a node's value (symbolic sizes by their example value)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(size_hint(s) for s in val.shape)
    return None


def size_hint(size) -> int:
    """A size as an int: a symbolic size by its example value (a data-dependent one by the value the
    capture recorded for it on the example inputs)."""
    if isinstance(size, torch.SymInt):
        return symint_example(size)
    return int(size)


def int_value(x) -> int | None:
    """The example value of an int argument (a literal, or a node computing a symbolic size)."""
    if isinstance(x, int):
        return x
    if isinstance(x, fx.Node):
        val = x.meta.get("val")
        if isinstance(val, (int, torch.SymInt)):
            return size_hint(val)
    return None


def merge(*axes: Axis) -> Axis:
    """Union of labels in order of first appearance; the prefix of the first non-empty operand."""
    labels: list[Label] = []
    prefix = 0
    for ax in axes:
        for lab in ax.labels:
            if lab not in labels:
                labels.append(lab)
        prefix = prefix or ax.prefix
    return Axis(tuple(labels), prefix)


def reshape_groups(ins: tuple[int, ...], outs: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Split a row-major reshape into groups of input dims and output dims with equal products."""
    groups, i, j = [], 0, 0
    while i < len(ins) or j < len(outs):
        gi, go, pi, po = [], [], 1, 1
        if i < len(ins):
            gi.append(i)
            pi *= ins[i]
            i += 1
        if j < len(outs):
            go.append(j)
            po *= outs[j]
            j += 1
        while pi != po:
            if pi < po and i < len(ins):
                gi.append(i)
                pi *= ins[i]
                i += 1
            elif po < pi and j < len(outs):
                go.append(j)
                po *= outs[j]
                j += 1
            else:
                break
        groups.append((gi, go))
    return groups


def _split_labels(labels: list[Label], outs: list[int]) -> list[Axis] | None:
    """Hand ordered labels to output dims whose sizes are their products (row-major split)."""
    result, k = [], 0
    for size in outs:
        got, prod = [], 1
        while k < len(labels) and prod * labels[k].size <= size and (prod < size or labels[k].size == 1):
            got.append(labels[k])
            prod *= labels[k].size
            k += 1
        if prod != size and size != 1:
            return None
        result.append(Axis(tuple(got)))
    return result if k == len(labels) else None


def reshape_axes(in_axes: Axes, ins: tuple[int, ...], outs: tuple[int, ...]) -> Axes:
    out: list[Axis] = [EMPTY] * len(outs)
    for gi, go in reshape_groups(ins, outs):
        if not go:
            continue
        if len(gi) == 1 and len(go) == 1:
            out[go[0]] = in_axes[gi[0]]
            continue
        real_in = [d for d in gi if ins[d] != 1]
        real_out = [d for d in go if outs[d] != 1]
        if len(real_in) == 1 and len(real_out) == 1:  # only size-1 dims added or removed
            out[real_out[0]] = in_axes[real_in[0]]
            continue
        labels = [lab for d in gi for lab in in_axes[d].labels]
        split = _split_labels(labels, [outs[d] for d in go]) if labels else None
        if split is None and len(labels) == 1 and labels[0].kind == "input" and len(real_in) == 1 \
                and ins[real_in[0]] == labels[0].size:  # one input axis cut into parts (a patchify)
            split = [Axis((Label("input", f"{labels[0].name}/{i}", outs[d], labels[0]),)) if outs[d] != 1 else EMPTY
                     for i, d in enumerate(go)]
        if split is None:  # unlabelled factors mixed in: every output dim carries the whole group
            split = [Axis(tuple(labels)) if outs[d] != 1 else EMPTY for d in go]
        for d, ax in zip(go, split):
            out[d] = ax
    return tuple(out)


def _broadcast(*operands: Axes, rank: int) -> Axes:
    out = []
    for k in range(1, rank + 1):
        out.append(merge(*[ax[-k] for ax in operands if len(ax) >= k]))
    return tuple(reversed(out))


def _norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


ELEMENTWISE = {
    aten.layer_norm.default, aten.native_layer_norm.default, aten.group_norm.default, aten.rms_norm.default,
    aten.gelu.default, aten.silu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default,
    aten.dropout.default, aten.native_dropout.default, aten.softmax.int, aten._softmax.default,
    aten.log_softmax.int, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
    aten.clone.default, aten.contiguous.default, aten.type_as.default, aten.detach.default, aten.alias.default,
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.pow.Tensor_Scalar,
    aten.add.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.sub.Scalar, aten.rsub.Scalar, aten.neg.default,
    aten.exp.default, aten.sqrt.default, aten.rsqrt.default, aten.sin.default, aten.cos.default,
    aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.abs.default,
    aten.hardtanh.default, aten.erf.default, aten.log.default, aten.clamp.default,
    aten.pow.Tensor_Tensor, aten.gelu_.default, aten.silu_.default, aten.relu_.default, aten.add_.Tensor,
    aten.mul_.Tensor, aten.addcmul.default, aten.lerp.Scalar, aten.maximum.default, aten.minimum.default,
    aten.eq.Tensor, aten.ne.Tensor, aten.lt.Tensor, aten.gt.Tensor, aten.ge.Scalar, aten.le.Scalar,
    aten.bitwise_and.Tensor, aten.logical_and.default, aten.logical_not.default,
}
RESHAPES = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
# poolings of a (B, C, *spatial) tensor, one output
POOLS = {aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default, aten.max_pool1d.default,
         aten.max_pool2d.default, aten.max_pool3d.default, aten.adaptive_avg_pool1d.default,
         aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default}
# every ATen form of a convolution; its output's spatial axes are a patch grid (see `_rule`)
CONVOLUTIONS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
                aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default}

# Rules for functions a pass inserts: fn -> (node, axis map) -> axes of its value.
CUSTOM_RULES: dict[Callable, Callable[[fx.Node, AxisMap], object]] = {}


def register_rule(fn: Callable, rule: Callable[[fx.Node, AxisMap], object]) -> None:
    CUSTOM_RULES[fn] = rule


def same_as_first_input(node: fx.Node, axes: AxisMap):
    """Rule for an inserted node that keeps the structure of its first argument (e.g. a token merge)."""
    return axes.tensors.get(node.args[0], ())


def propagate(gm: fx.GraphModule, batched_inputs: set[int] | None = None, latent: fx.Node | None = None) -> AxisMap:
    """Label every axis of every node. `batched_inputs`: indices of placeholders whose dim 0 is the batch;
    `latent`: the placeholder the model denoises (a Linear over its raw values makes packed tokens)."""
    amap = AxisMap(latent=latent.name if latent is not None else None)
    placeholder_index = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = shape_of(node)
            if shape is not None:
                axes = []
                for d, size in enumerate(shape):
                    if d == 0 and (batched_inputs is None or placeholder_index in batched_inputs):
                        axes.append(Axis((Label("batch", "batch", size),)))
                    elif size > 1:
                        axes.append(Axis((Label("input", f"{node.name}.{d}", size),)))
                    else:
                        axes.append(EMPTY)
                amap.tensors[node] = tuple(axes)
            placeholder_index += 1
        elif node.op == "get_attr":
            shape = shape_of(node)
            if shape is not None:
                amap.tensors[node] = (EMPTY,) * len(shape)
        elif node.op == "call_function":
            try:
                value = _rule(node, amap)
            except Exception:  # noqa: BLE001 - an op used in a way the rules do not know: no labels, never a crash
                value = None
            if value is None:
                value = _fallback(node, amap)
            if isinstance(value, Axis):
                amap.symbols[node] = value
            elif value is not None:
                amap.tensors[node] = value
    return amap


def _fallback(node: fx.Node, amap: AxisMap):
    """Unknown op: if its value has the shape of a tensor argument, it keeps that argument's axes."""
    shape = shape_of(node)
    if shape is None:
        return None
    for arg in node.all_input_nodes:
        if shape_of(arg) == shape and arg in amap.tensors:
            return amap[arg]
    return (EMPTY,) * len(shape)


def _rule(node: fx.Node, amap: AxisMap):
    target, args = node.target, node.args
    if target in CUSTOM_RULES:
        return CUSTOM_RULES[target](node, amap)
    if target is aten.sym_size.int:
        return amap.axis_of(args[0], args[1])
    if target in (operator.mul, operator.floordiv, operator.add, operator.sub):
        parts = [amap.symbols[a] for a in args if isinstance(a, fx.Node) and a in amap.symbols]
        return merge(*parts) if parts else None
    if target is operator.getitem:
        value = amap.tensors.get(args[0])
        if isinstance(value, list) and isinstance(args[1], int) and args[1] < len(value):
            return value[args[1]]
        return None
    shape = shape_of(node)
    a0 = amap[args[0]] if args and isinstance(args[0], fx.Node) else ()
    if target in ELEMENTWISE:
        if shape is None:
            return None
        operands = [amap[a] for a in node.all_input_nodes if amap[a]]
        return _broadcast(*operands, rank=len(shape)) if operands else None
    if target in POOLS:  # a pooled grid: fewer rows and columns, labelled anew as a strided convolution's
        if not any(a.grid for a in a0[2:]) or len(shape) != len(a0):
            return None
        if shape == shape_of(args[0]):  # a pooling with stride 1: the same grid
            return a0
        spatial = len(shape) - 2
        kinds = {1: ["grid_t"], 2: ["grid_h", "grid_w"], 3: ["grid_t", "grid_h", "grid_w"]}[spatial]
        return a0[:2] + tuple(Axis((Label(k, node.name, shape[2 + i]),)) if shape[2 + i] > 1 else EMPTY
                              for i, k in enumerate(kinds))
    if target in CONVOLUTIONS:
        spatial = len(shape) - 2
        kinds = {1: ["grid_t"], 2: ["grid_h", "grid_w"], 3: ["grid_t", "grid_h", "grid_w"]}[spatial]
        amap.patch_embeddings.append(node)
        grid = tuple(Axis((Label(k, node.name, shape[2 + i]),)) if shape[2 + i] > 1 else EMPTY
                     for i, k in enumerate(kinds))
        return (a0[0], EMPTY) + grid
    if target is aten.linear.default:
        return _linear(node, amap, a0)
    if target in (aten.matmul.default, aten.bmm.default, aten.mm.default, aten.einsum.default):
        if target is aten.einsum.default:
            return None
        b = amap[args[1]]
        batch = _broadcast(a0[:-2], b[:-2], rank=len(shape) - 2) if len(shape) > 2 else ()
        return batch + (a0[-2], b[-1])
    if target is aten.scaled_dot_product_attention.default:
        return a0[:-1] + (EMPTY,)
    if target is aten.transpose.int:
        d0, d1 = _norm_dim(args[1], len(a0)), _norm_dim(args[2], len(a0))
        out = list(a0)
        out[d0], out[d1] = out[d1], out[d0]
        return tuple(out)
    if target is aten.t.default:
        return tuple(reversed(a0))
    if target is aten.permute.default:
        return tuple(a0[_norm_dim(d, len(a0))] for d in args[1])
    if target in RESHAPES:
        out = reshape_axes(a0, shape_of(args[0]), shape)
        # an entry given as a symbolic size carries the axis it was read from
        return tuple(amap.symbols.get(s, ax) if isinstance(s, fx.Node) and not ax else ax
                     for s, ax in zip(args[1], out))
    if target is aten.flatten.using_ints:
        rank = len(a0)
        start = _norm_dim(args[1] if len(args) > 1 else 0, rank)
        end = _norm_dim(args[2] if len(args) > 2 else -1, rank)
        return a0[:start] + (merge(*a0[start:end + 1]) if end > start else a0[start],) + a0[end + 1:]
    if target is aten.unflatten.int:
        return reshape_axes(a0, shape_of(args[0]), shape)
    if target is aten.unsqueeze.default:
        d = _norm_dim(args[1], len(a0) + 1)
        return a0[:d] + (EMPTY,) + a0[d:]
    if target in (aten.squeeze.dim, aten.squeeze.default, aten.squeeze.dims):
        return reshape_axes(a0, shape_of(args[0]), shape)
    if target is aten.expand.default:
        lead = len(shape) - len(a0)
        out = []
        for d, s in enumerate(args[1]):
            src = a0[d - lead] if d >= lead else EMPTY
            if not src and isinstance(s, fx.Node):
                src = amap.symbols.get(s, EMPTY)
            out.append(src)
        return tuple(out)
    if target in (aten.cat.default, aten.concat.default):
        return _cat(node, amap)
    if target is aten.stack.default:  # a new axis at `dim`; the operands' axes merged (rotary: real, imaginary)
        rank = len(shape)
        d = _norm_dim(args[1] if len(args) > 1 else 0, rank)
        merged = _broadcast(*[amap[t] for t in args[0] if amap[t]], rank=rank - 1)
        return merged[:d] + (EMPTY,) + merged[d:] if len(merged) == rank - 1 else None
    if target is aten.index.Tensor:  # one axis indexed by a 1-D index (Mochi's valid text tokens): its labels stay
        index = [i for i in args[1] if i is not None]
        if len(index) == 1 and len(shape_of(index[0]) or ()) == 1 and len(shape) == len(a0):
            return a0
        return None
    if target in (aten.select.int,):
        d = _norm_dim(args[1], len(a0))
        return a0[:d] + a0[d + 1:]
    if target is aten.slice.Tensor:
        d = _norm_dim(args[1] if len(args) > 1 else 0, len(a0))
        start = int_value(args[2]) if len(args) > 2 and args[2] is not None else 0
        ax = a0[d]
        if start:
            ax = Axis(ax.labels, max(0, ax.prefix - start))
        return a0[:d] + (ax,) + a0[d + 1:]
    if target in (aten.unbind.int,):
        d = _norm_dim(args[1] if len(args) > 1 else 0, len(a0))
        n = shape_of(args[0])[d]
        return [a0[:d] + a0[d + 1:]] * n
    if target in (aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default, aten.tensor_split.sections):
        val = node.meta.get("val")
        d = _norm_dim(args[2] if len(args) > 2 else 0, len(a0))
        pieces = []
        offset = 0
        for v in val:
            ax = a0[d]
            pieces.append(a0[:d] + (Axis(ax.labels, max(0, ax.prefix - offset)),) + a0[d + 1:])
            offset += size_hint(v.shape[d])
        return pieces
    if target in (aten.sum.dim_IntList, aten.amax.default, aten.mean.dim, aten.var.correction):
        return _reduce(node, amap)
    if target in (aten.index_select.default, aten.gather.default, aten.repeat_interleave.self_int, aten.pad.default,
                  aten.constant_pad_nd.default, aten.roll.default, aten.flip.default):
        return a0 if len(a0) == len(shape) else None
    if target is aten.embedding.default:
        return amap[args[1]] + (EMPTY,)
    if target is aten.unfold.default:
        return _unfold(node, a0)
    if target is aten.im2col.default:
        return _im2col(node, a0)
    return None


def _patch_parts(axis: Axis, grid: int, patch: int) -> tuple[Axis, Axis] | None:
    """An input axis cut into `grid` patches of `patch` positions: the two parts' axes (as a reshape
    (.., grid, patch, ..) labels them), or None where the axis is not one whole input axis."""
    if len(axis.labels) != 1 or axis.labels[0].kind != "input" or axis.labels[0].size != grid * patch:
        return None
    lab = axis.labels[0]
    return tuple(Axis((Label("input", f"{lab.name}/{i}", n, lab),)) if n != 1 else EMPTY
                 for i, n in enumerate((grid, patch)))


def _unfold(node: fx.Node, a0: Axes) -> Axes | None:
    """`x.unfold(d, size, step)`: with step = size over the whole axis, a patchify: axis d becomes the
    patch index, a new last axis the position in the patch (as a reshape into (grid, patch) parts)."""
    _, dim, size, step = node.args[:4]
    d = _norm_dim(dim, len(a0))
    length = shape_of(node.args[0])[d]
    parts = _patch_parts(a0[d], length // size, size) if step == size and length % size == 0 else None
    if parts is None:
        return a0[:d] + (EMPTY,) + a0[d + 1:] + (EMPTY,)
    return a0[:d] + (parts[0],) + a0[d + 1:] + (parts[1],)


def _im2col(node: fx.Node, a0: Axes) -> Axes | None:
    """`F.unfold(x, k, stride=k)` (im2col) over (B, C, H, W): non-overlapping patches, a patchify:
    (B, C kh kw, h w) with the channels and in-patch positions on dim 1, the patch grid on dim 2."""
    x, kernel, dilation, padding, stride = node.args[:5]
    if len(a0) != 4 or list(kernel) != list(stride) or any(padding) or any(d != 1 for d in dilation):
        return None
    h, w = shape_of(x)[2:]
    rows = _patch_parts(a0[2], h // kernel[0], kernel[0]) if h % kernel[0] == 0 else None
    cols = _patch_parts(a0[3], w // kernel[1], kernel[1]) if w % kernel[1] == 0 else None
    if rows is None or cols is None:
        return None
    return (a0[0], merge(a0[1], rows[1], cols[1]), merge(rows[0], cols[0]))


def _dim_of(root: Label) -> int:
    return int(root.name.split(".")[1])


def _linear(node: fx.Node, amap: AxisMap, a0: Axes) -> Axes:
    """A Linear's output: the input's axes but the features. Over raw input values (its features carry
    an input axis) it is a patch embedding: over a patchified input, the input axes split between the
    tokens and the features are the grid (the last two rows and columns, one before them frames);
    over the packed latent, each latent axis of the tokens is one `grid_packed` axis."""
    plain = a0[:-1] + (EMPTY,)
    if not a0:
        return plain
    raw = {lab.root for lab in a0[-1].labels if lab.kind == "input"}
    if not raw:
        return plain
    tokens = a0[:-1]
    in_tokens = [lab for axis in tokens for lab in axis.labels if lab.kind == "input"]
    split: dict[str, list[Label]] = {}
    for root in dict.fromkeys(lab.root for lab in in_tokens if lab.parent is not None and lab.root in raw):
        split.setdefault(root.input_name, []).append(root)
    patched = next((roots for roots in split.values() if len(roots) >= 2), None)
    if patched is not None:
        roots = sorted(patched, key=_dim_of)
        kinds = dict(zip(reversed(roots), ("grid_w", "grid_h", "grid_t")))
        relabelled = _relabel(tokens, {r: (k, node.name) for r, k in kinds.items()})
        if relabelled is not None:
            amap.token_embeddings[node] = "patches"
            amap.patch_axes[node] = kinds
            amap.embedded_inputs.add(roots[0].input_name)
            return relabelled + (EMPTY,)
        return plain
    if amap.latent is None or not any(r.input_name == amap.latent for r in raw):
        return plain
    roots = dict.fromkeys(lab.root for lab in in_tokens if lab.input_name == amap.latent)
    relabelled = _relabel(tokens, {r: ("grid_packed", r.name) for r in roots}) if roots else None
    if relabelled is None:
        return plain
    amap.token_embeddings[node] = "packed"
    amap.embedded_inputs.add(amap.latent)
    return relabelled + (EMPTY,)


def _relabel(tokens: Axes, new: dict[Label, tuple[str, str]]) -> Axes | None:
    """Replace the labels of each input axis in `new` (its parts, where it was split) by one label of
    the given kind and name, sized by the parts in the token axes; None where an input axis's parts
    lie in more than one token axis."""
    where: dict[Label, int] = {}
    for d, axis in enumerate(tokens):
        for lab in axis.labels:
            if lab.kind == "input" and lab.root in new and where.setdefault(lab.root, d) != d:
                return None
    out = []
    for axis in tokens:
        labels, placed = [], {}
        for lab in axis.labels:
            root = lab.root if lab.kind == "input" else None
            if root not in new:
                labels.append(lab)
            elif root in placed:
                placed[root] *= lab.size
            else:
                placed[root] = lab.size
                labels.append(root)
        out.append(Axis(tuple(Label(*new[lab], placed[lab]) if lab in placed else lab for lab in labels), axis.prefix))
    return tuple(out)


def _reduce(node: fx.Node, amap: AxisMap) -> Axes:
    a0 = amap[node.args[0]]
    dims = node.args[1] if len(node.args) > 1 else None
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if dims is None:
        return ()
    dims = {_norm_dim(d, len(a0)) for d in ([dims] if isinstance(dims, int) else dims)}
    if keepdim:
        return tuple(EMPTY if d in dims else ax for d, ax in enumerate(a0))
    return tuple(ax for d, ax in enumerate(a0) if d not in dims)


def _cat(node: fx.Node, amap: AxisMap) -> Axes:
    shape = shape_of(node)
    tensors = [t for t in node.args[0] if shape_of(t) is not None and len(shape_of(t)) == len(shape)]
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(shape))
    out = []
    for d in range(len(shape)):
        parts = [amap.axis_of(t, d) for t in tensors]
        if d != dim:
            out.append(merge(*parts))
            continue
        prefix, seen_grid = 0, False
        for t, ax in zip(tensors, parts):
            if seen_grid:
                break
            if ax.grid:
                prefix += ax.prefix
                seen_grid = True
            else:
                prefix += shape_of(t)[d]
        labels = merge(*parts).labels
        out.append(Axis(labels, prefix if seen_grid else 0))
    return tuple(out)

