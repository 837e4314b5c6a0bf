"""Find the attention blocks of a captured graph, shared by all passes.

For every `aten.scaled_dot_product_attention` node: the attention module and its output (after the
output projection), the kind of sequence it runs over (with a note where that kind is a default the
graph cannot confirm), the residual adds that close its sub-blocks, the token axis of the residual
stream and its prefix tokens; and the facts that keep a merge from following the tokens: attention
over windows, a relative-position bias, pooling between blocks (`windowed`, `position_bias`,
`Block.pooled`). For the model: its timestep input and the constant it scales it by
before the time embedding, and its latent input (what it denoises). Everything comes from the graph (data
flow and axis provenance, see `axes.py`); module names are only used to name things for people.

Below `analyze`, the structural questions passes ask of a block or a site: where its q/k/v
projections read from (`projection_input`), the stream entering it (`stream_in`), its feed-forward
(`feed_forward`), the patch grid its tokens are (`patch_grid`), whether the model returns every
token (`outputs_carry`), and the tubelet embeddings of a video model with their geometry (`tubelets`:
a 3-D convolution in any ATen form or a Linear over unfolded tubelets).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from dittofx.errors import UnsupportedModelError
from dittofx.rewriter import axes as ax
from dittofx.rewriter.edit import ancestors, arg, descendants, users_breadth_first

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
ADDS = {aten.add.Tensor, aten.add_.Tensor}
PROJECTIONS = {aten.linear.default, aten.matmul.default, aten.mm.default, aten.addmm.default}
# what may stand between an attention's output and its residual add: gates, dropouts, casts, views,
# the split of a joint text/video output, and adds of the attention's own values
RESIDUAL_PATH = ADDS | {aten.mul.Tensor, aten.dropout.default, operator.getitem, aten.split_with_sizes.default,
                        aten.split.Tensor, aten.slice.Tensor, aten.div.Tensor, aten.to.dtype, aten.clone.default,
                        aten.view.default, aten.reshape.default}


# node.meta key of an attention's (kind, kind note, query axis) as found on the whole graph, kept by a pass
# after which the graph's sizes no longer say it (sequence parallelism: each rank holds a chunk of the
# tokens, so views of the chunk do not match the patch grid's labels): `pin_sites`
PINNED = "dittofx_site"


def pin_sites(analysis: Analysis) -> None:
    """Keep each attention's kind and query axis on its node, for the analyses after a pass that makes
    the token sizes local."""
    for site in analysis.sites:
        site.node.meta[PINNED] = (site.kind, site.kind_note, site.seq_axis)


@dataclass
class AttentionSite:
    node: fx.Node  # the SDPA node
    module: str  # the attention module, e.g. "blocks.3.attn"
    kind: str  # spatial | temporal | joint | cross | other
    query: fx.Node
    key: fx.Node
    value: fx.Node
    heads: int
    tokens: int  # query sequence length
    kv_tokens: int
    output: fx.Node  # the attention module's output: after the output projection
    residual: fx.Node | None  # the add of that output into the residual stream
    seq_axis: ax.Axis = ax.EMPTY
    kind_note: str | None = None  # why the kind is a default where the graph cannot tell (for the report)
    windowed: bool = False  # the grid is cut into windows folded into the batch, each attended on its own (Swin)
    # the attention adds a bias from the model's weights indexed by token position (a relative-position
    # bias: BEiT, Swin): it is tied to where each token sits in the grid
    position_bias: bool = False

    @property
    def is_self(self) -> bool:
        return self.kind != "cross"


@dataclass(frozen=True)
class Pooling:
    """A pooling stage between two blocks (PiT's strided conv, Swin's patch merging): the next block
    reads fewer tokens than the previous one leaves, through `where`."""

    after: str  # the block whose tokens are pooled
    before: str  # the block that reads the pooled tokens
    tokens: tuple[int, int]  # token count out of `after`, into `before` (prefix tokens included)
    where: str  # the module (or node) that pools them

    def __str__(self) -> str:
        return f"{self.tokens[0]} -> {self.tokens[1]} tokens at {self.where}, between {self.after} and {self.before}"


@dataclass
class Block:
    name: str  # the module that holds the residual adds, e.g. "blocks.3"
    sites: list[AttentionSite] = field(default_factory=list)
    mlp_residual: fx.Node | None = None  # the add that closes the MLP / feed-forward sub-block
    token_dim: int | None = None  # token axis of the residual stream after attention
    tokens: int | None = None
    prefix: int = 0
    pooled: Pooling | None = None  # the tokens after this block are pooled into fewer before the next one

    @property
    def kinds(self) -> list[str]:
        return [s.kind for s in self.sites]

    @property
    def stream(self) -> fx.Node | None:
        """The residual stream after the last attention of the block (where ToMe merges)."""
        residuals = [s.residual for s in self.sites if s.residual is not None]
        return residuals[-1] if residuals else None


@dataclass
class Analysis:
    blocks: list[Block]
    axes: ax.AxisMap
    patch_embeddings: list[fx.Node]
    timestep_input: fx.Node | None = None
    latent_input: fx.Node | None = None  # the placeholder the model denoises (`_latent_input`)
    timestep_scale: float = 1.0  # the constant the model multiplies its timestep by before the sin/cos embedding

    @property
    def sites(self) -> list[AttentionSite]:
        return [s for b in self.blocks for s in b.sites]

    @property
    def poolings(self) -> list[Pooling]:
        """Where the token count shrinks between blocks (a hierarchical model: PiT, Swin)."""
        return [b.pooled for b in self.blocks if b.pooled is not None]

    def block_of(self, site: AttentionSite) -> Block:
        return next(b for b in self.blocks if site in b.sites)


def module_path(node: fx.Node) -> list[str]:
    """Module paths from the root to the innermost module that produced `node`."""
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values() if path and not path.startswith("_")]


def _in_scope(node: fx.Node, module: str) -> bool:
    return module in module_path(node)



def _first_linear_after(node: fx.Node, amap: ax.AxisMap) -> fx.Node | None:
    """Follow the SDPA output through views and transposes to the output projection. Where it is split
    into streams each with its own projection (Flux, HunyuanVideo, SD3: text and image), the image
    stream's: the one whose tokens carry the patch grid, else the largest."""
    count = iter(range(64))  # the projection is a few ops away; do not walk the whole graph
    found = [user for user in users_breadth_first(
        node, lambda n: n.target not in PROJECTIONS and next(count, None) is not None) if user.target in PROJECTIONS]
    return max(found, default=None, key=lambda n: (any(a.grid for a in amap[n][:-1]), math.prod(ax.shape_of(n) or ())))


def _nearest_projection_before(node: fx.Node) -> fx.Node | None:
    """The projection nearest before `node` (through head splits, norms and rotary embeddings)."""
    todo, seen = [node], {node}
    while todo and len(seen) < 64:
        n = todo.pop(0)
        if n.target in PROJECTIONS:
            return n
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return None


def _attention_module(sdpa: fx.Node, amap: ax.AxisMap) -> tuple[str, fx.Node | None]:
    """The smallest module holding both the SDPA and the output projection after it; or, where that
    projection lies outside the module of the query projection and the SDPA (an attention without an
    output projection: Flux's and HunyuanVideo's single-stream blocks project attention and MLP
    together), that module."""
    proj = _first_linear_after(sdpa, amap)
    paths = module_path(sdpa)
    q_proj = _nearest_projection_before(sdpa.args[0])
    inner = [p for p in paths if q_proj is not None and p in set(module_path(q_proj))]
    if proj is not None:
        proj_paths = set(module_path(proj))
        common = [p for p in paths if p in proj_paths]
        if common:
            if inner and len(inner) > len(common) and inner[:len(common)] == common:
                return inner[-1], proj
            return common[-1], proj
    return (paths[-1] if paths else ""), proj


def _module_output(sdpa: fx.Node, module: str, residual: fx.Node | None, order: dict[fx.Node, int]) -> fx.Node:
    """The last node inside `module` that the SDPA result flows into before the residual add: the
    attention module's output (for attention written inline in a block, the projection's output)."""
    inside = [n for n in descendants(sdpa) if _in_scope(n, module) and n.op == "call_function"
              and isinstance(n.meta.get("val"), torch.Tensor)]
    if residual is not None:
        feeding = ancestors(residual, stop=lambda n: order[n] < order[sdpa]) - {residual}
        inside = [n for n in inside if n in feeding]
    return max(inside, key=order.__getitem__) if inside else sdpa


def _residual_add(output: fx.Node, sdpa: fx.Node) -> fx.Node | None:
    """The add after `output` whose other operand does not come from this attention: the residual
    connection (through gates, dropouts and the split of joint text/video outputs). Where a joint
    attention feeds several streams (CogVideoX: video and text), the largest is the residual stream."""
    from_attention = descendants(sdpa) | {sdpa}

    def is_residual(n: fx.Node) -> bool:
        return n.target in ADDS and all(isinstance(a, fx.Node) for a in n.args[:2]) \
            and any(a not in from_attention for a in n.args[:2])

    found = [n for n in users_breadth_first(output, lambda n: not is_residual(n) and n.target in RESIDUAL_PATH)
             if is_residual(n)]
    return max(found, key=lambda n: math.prod(ax.shape_of(n) or ()), default=None)


def _block_name(residual: fx.Node | None, attention_module: str) -> str:
    if residual is not None:
        paths = module_path(residual)
        if paths:
            return paths[-1]
    return attention_module.rsplit(".", 1)[0] if "." in attention_module else attention_module


def classify(q_axis: ax.Axis, k_axis: ax.Axis, video_inputs: set[str]) -> str:
    """spatial: the patch grid's rows and columns; temporal: frames only; joint: both, or the grid
    plus other tokens (text); cross: visual queries, keys and values from another sequence. Packed latent tokens
    (`grid_packed`: frames and rows cannot be told apart) count as spatial, as diffusers' default."""
    labels = [lab for lab in q_axis.labels if lab.kind != "batch"]
    spatial = any(lab.kind in ("grid_h", "grid_w", "grid_packed") for lab in labels)
    temporal = any(lab.kind == "grid_t" or (lab.kind == "input" and lab.input_name in video_inputs) for lab in labels)
    other = any(lab.kind == "input" and lab.input_name not in video_inputs for lab in labels)
    if {lab for lab in k_axis.labels if lab.kind != "batch"} != set(labels):
        # the visual tokens reading another sequence; queries of no visual token (an attention pool
        # over the text, Mochi's) are not a cross attention of the model
        return "cross" if spatial or temporal else "other"
    if spatial and not temporal and not other:
        return "spatial"
    if temporal and not spatial and not other:
        return "temporal"
    if spatial:
        return "joint"
    return "other"


def kind_note(kind: str, q_axis: ax.Axis, latent: str | None, video_inputs: set[str]) -> str | None:
    """Why a site got its kind where the graph cannot tell more: packed latent tokens take the spatial
    range; a self-attention over conditioning tokens only has no range."""
    labels = [lab for lab in q_axis.labels if lab.kind != "batch"]
    if kind in ("spatial", "joint") and any(lab.kind == "grid_packed" for lab in labels):
        others = sorted({lab.input_name for lab in labels if lab.kind == "input"} - {latent})
        what = f"tokens of {', '.join(others)} and of the packed latent input {latent}" if others \
            else f"tokens of the packed latent input {latent}"
        return f"{what}: frames and rows cannot be told apart; spatial range (diffusers' default)"
    if kind == "other" and labels and not any(lab.is_grid for lab in labels):
        inputs = sorted({lab.input_name for lab in labels if lab.kind == "input"} - video_inputs)
        if inputs:
            return f"self-attention over tokens of {', '.join(inputs)} only, none of the latent: no broadcast range"
    return None


def analyze(gm: fx.GraphModule, batched_inputs: set[int] | None = None) -> Analysis:
    latent = _latent_input(gm)
    amap = ax.propagate(gm, batched_inputs, latent)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    # the visual inputs: the latent, what a Linear patchifies or packs, and what a convolution reads
    # with frames folded into its batch (Latte, CogVideoX); their axes not made tokens are frames
    video_inputs = set(amap.embedded_inputs) | ({latent.name} if latent is not None else set())
    for conv in amap.patch_embeddings:
        for lab in amap[conv][0].labels:
            if lab.kind == "input":
                video_inputs.add(lab.input_name)
    blocks: dict[str, Block] = {}
    for node in gm.graph.nodes:
        if node.target is not SDPA:
            continue
        q, k, v = node.args[:3]
        q_shape, k_shape = ax.shape_of(q), ax.shape_of(k)
        module, proj = _attention_module(node, amap)
        residual = _residual_add(proj if proj is not None else node, node)
        output = _module_output(node, module, residual, order)
        q_axis, k_axis = amap.axis_of(q, -2), amap.axis_of(k, -2)
        kind = classify(q_axis, k_axis, video_inputs)
        note = kind_note(kind, q_axis, amap.latent, video_inputs)
        if PINNED in node.meta:  # a pass that made the sizes local (sp) kept what the whole graph said
            kind, note, q_axis = node.meta[PINNED]
        site = AttentionSite(
            node=node, module=module, kind=kind, query=q, key=k, value=v,
            heads=q_shape[-3] if len(q_shape) >= 4 else 1, tokens=q_shape[-2], kv_tokens=k_shape[-2],
            output=output, residual=residual, seq_axis=q_axis, kind_note=note,
            windowed=_windowed(q, amap), position_bias=_position_bias(node))
        name = _block_name(residual, module)
        block = blocks.setdefault(name, Block(name))
        block.sites.append(site)
    for block in blocks.values():
        _stream_facts(block, amap)
        block.mlp_residual = _mlp_residual(block)
    _poolings(list(blocks.values()), amap, order)
    timestep = _timestep_input(gm)
    return Analysis(list(blocks.values()), amap, amap.patch_embeddings, timestep, latent, _timestep_scale(gm, timestep))


def _windowed(q: fx.Node, amap: ax.AxisMap) -> bool:
    """Are an attention's queries windows of the grid: a grid label of the sequence axis that a leading
    (batch) axis carries too (the grid split between windows, folded into the batch, and positions in
    a window, the sequence), with fewer tokens than the grid has?"""
    axes = amap[q]
    if len(axes) < 2:
        return False
    seq = axes[-2].grid
    tokens = ax.shape_of(q)[-2] - axes[-2].prefix
    return bool(seq) and any(seq & set(a.labels) for a in axes[:-2]) and tokens < math.prod(lab.size for lab in seq)


_INDEXING = {aten.index.Tensor, aten.index_select.default, aten.embedding.default, aten.gather.default,
             aten.take.default}


def _tensor_ancestors(node: fx.Node) -> set[fx.Node]:
    """The tensors `node` is computed from, not through sizes (a mask broadcast to the batch reads the
    batch size, not the batch's values)."""
    return ancestors(node, stop=lambda n: not isinstance(n.meta.get("val"), torch.Tensor))


def _position_bias(sdpa: fx.Node) -> bool:
    """Is the attention's mask a bias from the model's weights indexed by token position (a relative-
    position bias table read at a constant index): (tokens, kv tokens) sized, computed from constants
    only (no input values), with a floating-point constant gathered at integer constants?"""
    mask = arg(sdpa, "attn_mask")
    if not isinstance(mask, fx.Node) or not isinstance(mask.meta.get("val"), torch.Tensor):
        return False
    shape, q, k = ax.shape_of(mask), ax.shape_of(sdpa.args[0]), ax.shape_of(sdpa.args[1])
    if len(shape) < 2 or shape[-2:] != (q[-2], k[-2]) or q[-2] <= 1:
        return False
    found = _tensor_ancestors(mask)
    if any(n.op == "placeholder" for n in found):
        return False

    def constant(n, floating: bool) -> bool:
        """Computed from the model's constants only, one of them floating-point (a table) or not (an index)."""
        if not isinstance(n, fx.Node):
            return False
        up = _tensor_ancestors(n)
        return all(a.op != "placeholder" for a in up) and any(
            a.op == "get_attr" and isinstance(a.meta.get("val"), torch.Tensor)
            and a.meta["val"].is_floating_point() == floating for a in up)

    for n in found:
        if n.target not in _INDEXING:
            continue
        # index(table, [indices]), embedding(table, index), take(table, index); index_select / gather(table, dim, index)
        index = n.args[2] if n.target in (aten.index_select.default, aten.gather.default) else n.args[1]
        indices = index if isinstance(index, (list, tuple)) else [index]
        if constant(n.args[0], True) and any(constant(i, False) for i in indices):
            return True
    return False


def _grid_tokens(node: fx.Node, amap: ax.AxisMap) -> int | None:
    """How many tokens (prefix tokens too) a (..., channels) tensor of grid tokens holds per sample: its
    positions but the channels over the batch (windows folded into the batch count); None where it
    carries no grid or no batch."""
    axes, shape = amap[node], ax.shape_of(node)
    if not axes or shape is None or not any(a.grid for a in axes[:-1]):
        return None
    batch = next((lab.size for a in axes for lab in a.labels if lab.kind == "batch"), None)
    return math.prod(shape[:-1]) // batch if batch else None


def _poolings(blocks: list[Block], amap: ax.AxisMap, order: dict[fx.Node, int]) -> None:
    """Between two consecutive blocks where the second's attention reads what the first's leaves: where
    the tokens become fewer through a pooling op (a strided conv, a pool, a patch merging), `pooled` of
    the first says where. From the attention output to the next attention's input (not the residual
    stream, which a windowed model (Swin) splits and reassembles around each attention)."""
    for before, after in zip(blocks, blocks[1:]):
        if not before.sites or not after.sites:
            continue
        out, into = before.sites[-1].output, projection_input(after.sites[0].query)
        if into is None or order[into] < order[out]:
            continue
        path = ancestors(into, stop=lambda n: order[n] < order[out])
        if out not in path:
            continue
        count_out, count_in = _grid_tokens(out, amap), _grid_tokens(into, amap)
        if count_out is None or count_in is None or count_in >= count_out:
            continue
        path &= descendants(out)
        shrink = next((n for n in sorted(path, key=order.__getitem__) if _pools(n, amap)), None)
        if shrink is not None:
            paths = module_path(shrink)
            before.pooled = Pooling(before.name, after.name, (count_out, count_in), paths[-1] if paths else shrink.name)


def _pools(node: fx.Node, amap: ax.AxisMap) -> bool:
    """Does `node` pool tokens: a convolution or pooling over the grid with fewer positions out than in,
    or a Linear over features that carry the grid (neighbouring tokens concatenated, Swin's patch merging)?"""
    if node.target in ax.CONVOLUTIONS or node.target in ax.POOLS:
        x = node.args[0]
        ins, outs = ax.shape_of(x), ax.shape_of(node)
        return ins is not None and outs is not None and any(a.grid for a in amap[x][2:]) \
            and math.prod(outs[2:]) < math.prod(ins[2:])
    if node.target is aten.linear.default:
        return bool(amap.axis_of(node.args[0], -1).grid)
    return False


def _stream_facts(block: Block, amap: ax.AxisMap) -> None:
    """Token axis, token count and prefix tokens of the residual stream after the block's attention."""
    stream = block.stream
    self_sites = [s for s in block.sites if s.is_self]
    if stream is None or not self_sites:
        return
    wanted = {lab for lab in self_sites[-1].seq_axis.labels if lab.kind != "batch"}
    shape = ax.shape_of(stream)
    for d, axis in enumerate(amap[stream]):
        if wanted and wanted <= set(axis.labels) and d > 0:
            block.token_dim, block.tokens, block.prefix = d, shape[d], axis.prefix
            return


def _mlp_residual(block: Block) -> fx.Node | None:
    """The add after the block's last attention residual, inside the block, that closes the feed-forward
    sub-block (none in a block that adds attention and MLP at once: the next add is the next block's)."""
    stream = block.stream
    if stream is None:
        return None
    residuals = {s.residual for s in block.sites}
    names = _same_values(stream)
    return next((user for name in names for user in name.users if user.target in ADDS and name in user.args[:2]
                 and user not in residuals and _in_scope(user, block.name)), None)


_CASTS = {aten.to.dtype, aten._to_copy.default, aten.alias.default}


def _same_values(node: fx.Node) -> list[fx.Node]:
    """`node` and the casts to its own dtype after it: the same tensor, which later code may name by a
    cast (Mochi's RMSNorm casts the residual stream to float32 in place of the block's variable)."""
    names, todo = [node], [node]
    dtype = getattr(node.meta.get("val"), "dtype", None)
    while todo:
        current = todo.pop()
        for user in current.users:
            if user.target in _CASTS and user.args[0] is current and ax.shape_of(user) == ax.shape_of(node) \
                    and getattr(user.meta.get("val"), "dtype", None) == dtype:
                names.append(user)
                todo.append(user)
    return names


def _timestep_input(gm: fx.GraphModule) -> fx.Node | None:
    """The placeholder that feeds a sinusoidal embedding (sin/cos of input * frequencies). Where several
    do (HunyuanVideo and Flux embed the guidance scale the same way), the one forward() calls a
    timestep; else the first."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    trig = [n for n in gm.graph.nodes if n.target in (aten.sin.default, aten.cos.default)]
    found = [ph for ph in placeholders if isinstance(ph.meta.get("val"), torch.Tensor) and ph.meta["val"].dim() <= 1
             and any(t in descendants(ph) for t in trig)]
    return next((ph for ph in found if "timestep" in ph.name), found[0] if found else None)


def _latent_input(gm: fx.GraphModule) -> fx.Node | None:
    """The placeholder the model denoises: a tensor input shaped like the model's first output, up to
    one axis (the channels: Latte and DiT predict a variance too). An exact match wins. None for a
    model whose output is not shaped like an input (a classifier's logits)."""
    outputs = []
    for out in gm.graph.find_nodes(op="output"):
        fx.node.map_arg(out.args, outputs.append)
    first = next((ax.shape_of(n) for n in outputs if ax.shape_of(n) is not None), None)
    if first is None or len(first) < 3:
        return None
    near = None
    for ph in gm.graph.find_nodes(op="placeholder"):
        shape = ax.shape_of(ph)
        if shape is None or len(shape) != len(first) or not ph.meta["val"].is_floating_point():
            continue
        differ = sum(a != b for a, b in zip(shape, first))
        if differ == 0:
            return ph
        if differ == 1 and near is None:
            near = ph
    return near


# between the timestep input and its sinusoidal embedding: casts, views and the batch broadcast
_TIME_PATH = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.unsqueeze.default, aten.view.default,
              aten.reshape.default, aten._unsafe_view.default, aten.expand.default, aten.slice.Tensor,
              aten.select.int, aten.clone.default, aten.contiguous.default, aten.flatten.using_ints,
              aten.squeeze.dim, aten.squeeze.default, aten.repeat.default, aten.repeat_interleave.self_int,
              aten.alias.default, aten.detach.default, aten.type_as.default}
_MULS = {aten.mul.Tensor, aten.mul.Scalar}
_DIVS = {aten.div.Tensor, aten.div.Scalar}


def _timestep_scale(gm: fx.GraphModule, timestep: fx.Node | None) -> float:
    """The constant the model multiplies its timestep input by on the way to the sin/cos embedding
    (Flux is fed t / 1000 and multiplies by 1000): the product of the scalar multiplies and divides
    met walking from the input through casts, views and the multiply by the frequencies. 1.0 where
    there is none or the path is not of that form."""
    if timestep is None:
        return 1.0
    todo, seen = [(timestep, 1.0)], set()
    while todo:
        node, scale = todo.pop(0)
        for user in node.users:
            if user.target in (aten.sin.default, aten.cos.default):
                return scale
            factor = _time_factor(gm, user, node)
            if factor is not None and (user, scale * factor) not in seen:
                seen.add((user, scale * factor))
                todo.append((user, scale * factor))
    return 1.0


def _time_factor(gm: fx.GraphModule, user: fx.Node, node: fx.Node) -> float | None:
    """What `user` multiplies the timestep values in `node` by: 1 for a cast or view and for the
    frequencies (a tensor of many values), the constant for a scalar multiply or divide; None for
    anything else."""
    if not user.args or user.args[0] is not node and user.target not in _MULS:
        return None
    if user.target in _TIME_PATH:
        return 1.0
    others = [a for a in user.args[:2] if a is not node]
    if len(others) != 1:
        return None
    other = _constant(gm, others[0])
    if user.target in _MULS:
        if other is not None:
            return other
        return 1.0 if isinstance(others[0], fx.Node) and math.prod(ax.shape_of(others[0]) or (1,)) > 1 else None
    if user.target in _DIVS and other:
        return 1.0 / other
    return None


def _constant(gm: fx.GraphModule, value) -> float | None:
    """A Python number, or a one-element constant tensor of the graph, as a float."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, fx.Node) and value.op == "get_attr":
        tensor = getattr(gm, value.target, None)
        if isinstance(tensor, torch.Tensor) and tensor.numel() == 1:
            return float(tensor)
    return None


# ---------------------------------------------------------------------------------------------
# structural queries


def _shape(node) -> tuple[int, ...]:
    return ax.shape_of(node) or ()


# what may stand between a projection and q, k or v (head split, norms, scales, casts)
_TO_PROJECTION = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
                  aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.clone.default,
                  aten.contiguous.default, aten.to.dtype, aten._to_copy.default, aten.select.int,
                  aten.unbind.int, aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default,
                  aten.chunk.default, aten.layer_norm.default, aten.rms_norm.default, aten.mul.Tensor,
                  aten.mul.Scalar, aten.div.Tensor, operator.getitem}


def linear_input(node: fx.Node) -> fx.Node:
    """What a linear / matmul node multiplies (addmm's input is its second argument)."""
    return node.args[1] if node.target is aten.addmm.default else node.args[0]


def projection_input(node: fx.Node) -> fx.Node | None:
    """Walk back from q, k or v to its linear projection; that projection's input."""
    for _ in range(32):
        if node.target in PROJECTIONS:
            return linear_input(node)
        if node.target not in _TO_PROJECTION or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return None


def stream_in(site: AttentionSite) -> fx.Node | None:
    """The operand of the site's residual add that does not come from the attention: the tokens
    entering the sub-block."""
    if site.residual is None:
        return None
    from_attention = descendants(site.node) | {site.node}
    others = [a for a in site.residual.args[:2] if isinstance(a, fx.Node) and a not in from_attention]
    return others[0] if len(others) == 1 else None


@dataclass
class FeedForward:
    """The feed-forward sub-block that `block.mlp_residual` closes."""

    module: str | None  # the block's child module computing it (None: not in a child module)
    input: fx.Node | None  # what its first linear reads (None: not found as linears)
    output: fx.Node | None  # its last linear
    body: set[fx.Node] = field(default_factory=set)  # the nodes from the stream to `output`


_GATES = {aten.mul.Tensor, aten.dropout.default, aten.div.Tensor, aten.to.dtype, aten.clone.default}


def feed_forward(block: Block) -> FeedForward | None:
    stream, res = block.stream, block.mlp_residual
    if stream is None or res is None:
        return None
    found = FeedForward(_feed_forward_module(block), None, None)
    branch = [a for a in res.args[:2] if isinstance(a, fx.Node) and a is not stream]
    out = branch[0] if len(branch) == 1 else None
    for _ in range(8):  # back through gates, dropouts, casts to the last linear
        if out is None or out.target in PROJECTIONS:
            break
        inputs = [a for a in out.args if isinstance(a, fx.Node) and _shape(a) == _shape(out)]
        out = inputs[0] if out.target in _GATES and inputs else None
    if out is not None and out.target in PROJECTIONS:
        body = ancestors(out, stop=lambda n: n is stream) & descendants(stream)
        order = {n: i for i, n in enumerate(stream.graph.nodes)}
        first = min((n for n in body if n.target in PROJECTIONS), key=order.__getitem__)
        found.input, found.output, found.body = linear_input(first), out, body
    return found if found.module is not None or found.output is not None else None


def _feed_forward_module(block: Block) -> str | None:
    """Walking back from the add that closes the MLP sub-block, through values computed from the
    residual stream (not the gates), the first child module of the block met."""
    add, stream = block.mlp_residual, block.stream
    from_stream = descendants(stream) - descendants(add) - {add}
    prefix = block.name + "."
    todo = [a for a in add.args[:2] if isinstance(a, fx.Node) and a is not stream]
    seen = set()
    while todo:
        n = todo.pop(0)
        if n in seen or n.op != "call_function" or n not in from_stream:
            continue
        seen.add(n)
        for path in module_path(n):
            if path.startswith(prefix):
                return prefix + path[len(prefix):].split(".")[0]
        todo.extend(n.all_input_nodes)
    return None


def patch_grid(site: AttentionSite) -> tuple[int, int] | None:
    """(rows, columns) when the site's tokens are exactly a patch grid, row-major, no other tokens."""
    labels = {lab.kind: lab.size for lab in site.seq_axis.labels if lab.kind != "batch"}
    if set(labels) != {"grid_h", "grid_w"} or site.seq_axis.prefix:
        return None
    h, w = labels["grid_h"], labels["grid_w"]
    return (h, w) if h * w == site.tokens else None


def outputs_carry(analysis: Analysis, labels: frozenset) -> bool:
    """Does the model return every token: a graph output keeps the token axis, or the tokens are
    reshaped back into a grid (a DiT's unpatchify, a video model's frames)?"""
    if not analysis.blocks or not labels:
        return False
    graph = analysis.blocks[0].sites[0].node.graph
    outputs = []
    for out in graph.find_nodes(op="output"):
        fx.node.map_arg(out.args, outputs.append)
    if any(labels & set(a.labels) for node in outputs for a in analysis.axes[node]):
        return True
    return any(sum(bool(labels & set(a.labels)) for a in analysis.axes[n]) > 1
               for n in graph.nodes if n.target in ax.RESHAPES or n.target is aten.unflatten.int)


@dataclass(frozen=True)
class Tubelets:
    """A video patch embedding as RLT reads it, whatever its ATen form: a 3-D convolution (`conv3d`,
    `conv3d.padding`, `convolution`) or a Linear over tubelets cut by reshapes or unfolds."""

    node: fx.Node  # the convolution (B, D, T', H', W'), or the Linear (B, ..., D)
    form: str  # "convolution" | "linear"
    video: fx.Node  # the video it cuts into tubelets
    dims: tuple[int, int, int, int]  # the dims of `video` that are (channels, frames, rows, columns)
    grid: tuple[ax.Label | None, ...]  # the labels of the tokens' frames, rows, columns (None: one along it)
    patch: tuple[int, int, int] | None = None  # a Linear's tubelet (a convolution's: `tubelet_geometry`)

    @property
    def tubelet(self) -> tuple[int, int, int]:
        """(frames, rows, columns) of a tubelet; UnsupportedModelError where a convolution's do not tile."""
        return tubelet_geometry(self.node) if self.form == "convolution" else self.patch


# what may stand between a video and the Linear over its tubelets
_PATCHIFY = ax.RESHAPES | {aten.permute.default, aten.transpose.int, aten.flatten.using_ints, aten.unfold.default,
                           aten.clone.default, aten.contiguous.default, aten.unflatten.int}


def tubelets(analysis: Analysis) -> list[Tubelets]:
    """The video patch embeddings: 3-D convolutions, then Linears over (frames, rows, columns) tubelets."""
    amap = analysis.axes
    found = [Tubelets(c, "convolution", c.args[0], (1, 2, 3, 4),
                      tuple(amap.axis_of(c, d).labels[0] if amap.axis_of(c, d).labels else None for d in (2, 3, 4)))
             for c in tubelet_embeddings(analysis)]
    for node, kinds in amap.patch_axes.items():
        if sorted(kinds.values()) != ["grid_h", "grid_t", "grid_w"]:
            continue
        video = node.args[0]
        while video.target in _PATCHIFY and not _holds(amap[video], kinds):
            video = video.args[0]
        axes = amap[video]
        if len(axes) != 5 or not _holds(axes, kinds):
            continue
        where = {kinds[a.labels[0]]: d for d, a in enumerate(axes) if len(a.labels) == 1 and a.labels[0] in kinds}
        frames_rows_cols = tuple(where[k] for k in ("grid_t", "grid_h", "grid_w"))
        channels = next(d for d in range(1, 5) if d not in frames_rows_cols)
        labels = {lab.kind: lab for a in amap[node] for lab in a.labels if lab.is_grid and lab.name == node.name}
        grid = tuple(labels.get(k) for k in ("grid_t", "grid_h", "grid_w"))
        size = {kinds[root]: root.size for root in kinds}
        patch = tuple(size[k] // (lab.size if lab is not None else 1) for k, lab in zip(("grid_t", "grid_h", "grid_w"),
                                                                                       grid))
        found.append(Tubelets(node, "linear", video, (channels,) + frames_rows_cols, grid, patch))
    return found


def _holds(axes: ax.Axes, roots) -> bool:
    """Does a tensor hold each of the input axes `roots` whole, one to an axis (the video before its patchify)?"""
    return set(roots) <= {a.labels[0] for a in axes if len(a.labels) == 1}


def tubelet_embeddings(analysis: Analysis) -> list[fx.Node]:
    """The patch embeddings that cut a video into tubelets: over 3 axes (T, H, W), a 5-D output."""
    return [c for c in analysis.patch_embeddings if c.meta.get("val") is not None and c.meta["val"].dim() == 5]


def _ints(v, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(v)
    return v * n if len(v) == 1 else v


def tubelet_geometry(conv: fx.Node) -> tuple[int, int, int]:
    """The tubelet (frames, height, width) of a Conv3d patch embedding; UnsupportedModelError where its
    tubelets overlap or do not tile the video."""
    kernel = tuple(_shape(conv.args[1])[2:])
    if conv.target is aten.convolution.default and arg(conv, "transposed"):
        raise UnsupportedModelError("a transposed Conv3d is not a tubelet embedding: tubelets need a forward Conv3d")
    stride = _ints(arg(conv, "stride") or 1, 3)
    padding = arg(conv, "padding") or 0
    if isinstance(padding, str):  # conv3d.padding: "valid" pads nothing, "same" k - 1 in all
        padding = (0, 0, 0) if padding == "valid" else tuple(k - 1 for k in kernel)
    padding = _ints(padding, 3)
    dilation = _ints(arg(conv, "dilation") or 1, 3)
    groups = arg(conv, "groups") or 1
    if stride != kernel or any(padding) or dilation != (1, 1, 1) or groups != 1:
        raise UnsupportedModelError(
            f"the tubelets overlap: the Conv3d patch embedding has kernel {kernel}, stride "
            f"{stride}, padding {padding}, dilation {dilation}; accepted: stride = kernel, no padding")
    dims = _shape(conv.args[0])[2:]
    if any(d % k for d, k in zip(dims, kernel)):
        raise UnsupportedModelError(
            f"video of {dims[0]} frames of {dims[1]}x{dims[2]} is not divisible into tubelets of "
            f"{kernel[0]}x{kernel[1]}x{kernel[2]} (frames x height x width): use a frame count and size "
            f"that are multiples of the tubelet")
    return kernel
