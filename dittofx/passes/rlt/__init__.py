"""Run-Length Tokenization (Choudhury et al., NeurIPS 2024) as a front end inserted into video ViTs.

    opt = dittofx.optimize(videomae, ["rlt:tau=0.1"], example_inputs=(clips,))
    logits = opt(clips)
    opt.report.stats["rlt"].kept      # grid tokens kept per clip in the last forward (also in str(report))

What the pass inserts, right where the patch tokens (with their positional embeddings) enter the
first transformer block:

1. The tokenizer. The video is cut into tubelets by the model's patch embedding: a Conv3d (kernel =
   stride = (ts, ph, pw), in any ATen form) or a Linear over tubelets cut by reshapes or unfolds
   (`analysis.tubelets`); its input is the normalised video the model sees, read as (B, C, T, H, W)
   whatever its own order (transformers' VideoMAE takes (B, T, C, H, W)). For
   each tubelet t >= 1 and spatial position, the last frame of tubelet t is compared with the first
   frame of tubelet t-1 (`compare="previous"`: DESIGN.md's wording and the reference code,
   `x[:, :, 2ts-1::ts] - x[:, :, :-ts:ts]`), or with the first frame of the tubelet that started
   the current run (`compare="run_start"`, so slow drift accumulates until it is kept): mean
   absolute difference over the patch's pixels and channels. A token is dropped when that
   difference is <= tau; tubelet 0 is always kept.
2. The kept tokens, with the positional embeddings they already carry, in their own (t, h, w)
   order; optionally plus a learned run-length embedding: zero-initialised, row l - 1 for a run of l
   tubelets (tubelets until the next kept token at that position), computed in the tokens' own order
   (the reference code computes lengths in (h, w, t) order against (t, h, w) tokens: a bug avoided).
3. One of two layouts (`layout="auto"` picks packed, or padded when a later pass changes tokens):
   - packed: the clips of the batch in one sequence (1, L, D), L = all kept tokens. Token-wise
     layers run on exactly L tokens. Attention is block-diagonal: at each site q, k, v are laid out
     one clip per row (B, H, M, d), M the longest clip, with pad slots masked as keys by an SDPA
     mask (no L x L mask, so attention costs what per-clip attention costs), and put back after.
   - padded: one clip per row (B, M, D); a shorter clip ends with copies of its last token, which
     together count as one token through ToMe's token sizes (log(size) added to the attention
     logits, size-weighted means). A ToMe pass after RLT continues from those sizes and merges
     within each clip (the copies, identical, merge first).
4. Per-clip exits: a mean over the tokens (VideoMAE's mean pooling before fc_norm) averages each
   clip's kept tokens; a class token (`x[:, 0]`) or a first-tubelet token is each clip's own; a
   token sequence returned by the model is run-length decoded back to (B, N, ...) (a dropped token
   gets the value of the kept token that starts its run).

Non-finite input stays in its clip, as in the original model: a clip with a NaN or inf keeps every
token (its output is the original's for it), and packed clips meet only in gathers, never in a
matmul (0 x inf is NaN), so the other clips are what they are without it.

Sizes that the capture hard-coded (token count; packed: the batch) are rewritten by the rewriter's
token-size facility to be read at run time. `tau < 0` keeps every token: the pass then leaves the
graph untouched (identical outputs).

Exporting: the tokenizer is plain tensor code; under torch.export it becomes NonZero + Gather with a
data-dependent sequence length, so `export_onnx(opt, ...)` writes one ONNX file with the tokenizer
inside (TensorRT: NonZero needs an output allocator). While exporting, pad slots are left out of the
softmax by renormalising with an extra column of v instead of a mask (cheaper in onnxruntime; see
`rlt_attention`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from dittofx.errors import PassSpecError, UnsupportedModelError
from dittofx.passes.base import Pass, PassContext, PassResult, shown
from dittofx.passes.rlt.ops import (  # noqa: F401 - the algorithm, importable from here too
    COMPARES,
    Packed,
    Padded,
    RLTState,
    finite_clips,
    keep_mask,
    rlt_attention,
    rlt_keep,
    rlt_patch_embed,
    rlt_pool,
    rlt_select,
    rlt_tokenize,
    rlt_tokenize_padded,
    rlt_unpack,
    run_lengths,
)
from dittofx.rewriter import axes as ax
from dittofx.rewriter.analysis import (
    SDPA,
    Analysis,
    Block,
    Tubelets,
    module_path,
    stream_in,
    tubelets,
)
from dittofx.rewriter.edit import Inserter, arg, copy_scope, replace_node, values_at
from dittofx.rewriter.tokens import (
    batch_sizes_to_literals,
    carrying,
    make_token_sizes_dynamic,
    set_size_bias,
    size_bias_problem,
    size_weighted_mean,
)

aten = torch.ops.aten
LAYOUTS = ("auto", "packed", "padded")
# ops that mix tokens other than through attention: packing clips would make them mix clips
TOKEN_MIXING = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
                aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
                aten.max_pool2d.default, aten.max_pool3d.default, aten.roll.default, aten.flip.default,
                aten.cumsum.default, aten.sort.default, aten.topk.default}
# what RLT inserts: its own nodes are not exits of the token region
_OURS = (rlt_keep, rlt_patch_embed, rlt_tokenize, rlt_tokenize_padded, rlt_attention)


def _grid_labels(axis: ax.Axis) -> list[ax.Label]:
    return [lab for lab in axis.labels if lab.is_grid]


@dataclass(repr=False)
class RLT(Pass):
    """Run-Length Tokenization: drop video tokens that repeat the previous tubelet, pack the clips.

    tau: drop a token when its mean absolute difference (normalised pixels) is <= tau; < 0 keeps all.
    length_embedding: add a learned, zero-initialised run-length embedding to the kept tokens.
    compare: "previous" (the paper: with tubelet t-1) or "run_start" (with the first tubelet of the
        current run, so slow drift is not dropped).
    layout: "packed" (the clips of a batch in one sequence, block-diagonal attention: token-wise
        layers run on exactly the kept tokens), "padded" (one clip per row, padded to the longest
        clip with copies of its last token that count as one token through ToMe's token sizes: a
        later ToMe pass merges within each clip), or "auto": padded when a later pass changes the
        token count, else packed.
    """

    name: ClassVar[str] = "rlt"
    changes_tokens: ClassVar[bool] = True
    runs_before: ClassVar[tuple[str, ...]] = ("tome",)  # ToMe merges within RLT's clips, from its token sizes

    tau: float = shown(0.1)
    length_embedding: bool = False
    compare: str = "previous"
    layout: str = "auto"

    def __post_init__(self):
        tau = self.tau
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau != tau:
            raise PassSpecError(f"rlt tau must be a number (a mean absolute pixel difference, e.g. 0.1; < 0 keeps "
                                f"every token), got {tau!r}")
        if not isinstance(self.length_embedding, bool):
            raise PassSpecError(f"rlt length_embedding must be True or False, got {self.length_embedding!r}")
        if self.compare not in COMPARES:
            raise PassSpecError(f"rlt compare must be one of {', '.join(map(repr, COMPARES))}, got {self.compare!r}")
        if self.layout not in LAYOUTS:
            raise PassSpecError(f"rlt layout must be one of {', '.join(map(repr, LAYOUTS))}, got {self.layout!r}")
        self.tau = float(tau)

    def exact(self) -> RLT:
        return dataclasses.replace(self, tau=-1.0)

    # -- applicability ------------------------------------------------------------------------

    def check(self, analysis: Analysis, block: Block) -> str | None:
        found = tubelets(analysis)
        if not found:
            return ("no tubelet embedding: RLT needs video tokens made by a Conv3d patch embedding (kernel = stride "
                    "= (frames, height, width) of a tubelet), or a Linear over tubelets, as in VideoMAE or ViViT")
        grid = {t.grid[0] for t in found if t.grid[0] is not None}
        if block.token_dim is None:
            return "no token axis found in the residual stream"
        for site in block.sites:
            labels = set(site.seq_axis.labels)
            if not grid & labels:
                return f"attention {site.module} ({site.kind}) does not run over time and space jointly"
            if site.kind == "cross":
                return f"attention {site.module} is cross attention"
        return None

    # -- rewrite ------------------------------------------------------------------------------

    def run(self, ctx: PassContext) -> PassResult:
        result = PassResult()
        gm, analysis = ctx.gm, ctx.analysis
        if any(n.target is rlt_keep for n in gm.graph.nodes):
            raise UnsupportedModelError("RLT already tokenizes this model: give the rlt pass once")
        embed = tubelets(analysis)[0]
        conv, video, tubelet = embed.node, embed.video, embed.tubelet
        blocks = [b for b in analysis.blocks if self.check(analysis, b) is None]
        if self.tau < 0:
            result.note(None, "rlt: tau < 0 keeps every token; graph left unchanged")
            result.stats["rlt"] = "tau < 0: every token kept"
            return result
        amap = analysis.axes
        stream = self._stream_in(analysis, blocks[0])
        tok_axis = amap.axis_of(stream, 1)
        grid_labels = _grid_labels(tok_axis)
        order = self._order(grid_labels, embed.grid, type(ctx.model).__name__)
        batch_labels = [lab for lab in amap.axis_of(stream, 0).labels if lab.kind == "batch"]
        if not batch_labels:
            raise UnsupportedModelError("RLT needs a batch axis first in the token stream "
                                        f"({stream.name} has axes {amap[stream]})")
        prefix = tok_axis.prefix
        shape = ax.shape_of(stream)
        grid = tuple(lab.size if lab is not None else 1 for lab in embed.grid)
        dim = shape[2]

        layout = self._layout(ctx)
        region = carrying(stream, amap, set(grid_labels))
        self._check_region(region, amap, set(grid_labels))
        # sizes: read the token count (and, packed, the batch: 1 once packed) from tensors from here on
        labels = set(grid_labels)
        if layout == "packed":
            batch_sizes_to_literals(region, amap, set(batch_labels))
            labels |= set(batch_labels)
        make_token_sizes_dynamic(gm, amap, labels, after=stream)

        hint, hint_slots = self._example_count(ctx, embed, prefix)
        hint_grid = hint - prefix * shape[0]
        state = RLTState(tubelet, grid, order, prefix, dim, self.tau, self.compare, self.length_embedding, hint,
                         hint_slots, hint_grid)
        name = "rlt"
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, state)

        graph = gm.graph
        with graph.inserting_before(conv):
            state_node = graph.get_attr(name)
            clip = video if embed.dims == (1, 2, 3, 4) else graph.call_function(aten.permute.default,
                                                                                (video, [0, *embed.dims]))
            keep = graph.call_function(rlt_keep, (state_node, clip))
        copy_scope(conv, keep)
        if embed.form == "convolution":  # embed the kept tubelets only; a Linear's tokens are dropped after it
            replace_node(conv, rlt_patch_embed, (state_node, video, conv.args[1], arg(conv, "bias"), keep))
        add = Inserter(stream)
        if layout == "packed":
            outs = Packed(*add.getitems(add(rlt_tokenize, state_node, keep, stream), len(Packed._fields)))
        else:
            outs = Padded(*add.getitems(add(rlt_tokenize_padded, state_node, keep, stream), len(Padded._fields)))
        stream.replace_all_uses_with(outs.tokens, delete_user_cb=lambda u: u is not add.nodes[0])
        sites = [n for n in graph.nodes if n.target is SDPA and n in region]
        for node in sites:
            self._check_site(node, region)
            if layout == "padded" and (problem := size_bias_problem(node, amap)):
                raise UnsupportedModelError(f"RLT cannot pad clips through attention {node.name}: {problem} (the "
                                            f"copies padding a clip must count as one token); layout='packed' can")
        inserted = set(add.nodes)
        if layout == "packed":
            self._packed_attention(sites, outs)
        else:
            inserted.update(n for node in sites for n in set_size_bias(gm, node, outs.size))
        exits = self._rewrite_exits(gm, region, amap, set(grid_labels), stream, state, outs, inserted)

        result.changed = True
        result.stats["rlt"] = state
        where = module_path(conv)
        how = ("clips packed into one sequence, block-diagonal attention" if layout == "packed" else
               "clips padded to the longest with copies of their last token, weighted as one token (ToMe sizes)")
        result.note(None, f"rlt: tubelets {tubelet[0]}x{tubelet[1]}x{tubelet[2]} from "
                          f"{where[-1] if where else conv.name}, grid {grid[0]}x{grid[1]}x{grid[2]}, tau={self.tau:g}, "
                          f"compare={self.compare}{', length embedding' if self.length_embedding else ''}; "
                          f"{how} at {len(sites)} attention sites; exits: {', '.join(exits)}; "
                          f"{hint - prefix * shape[0]} of {shape[0] * (shape[1] - prefix)} tokens kept on the example; "
                          f"tokens kept per clip after each forward: report.stats['rlt']")
        for b in blocks:
            result.note(b.name, f"rlt: {layout} clips")
        return result

    def _layout(self, ctx: PassContext) -> str:
        later = [p.name for p in getattr(ctx, "later", []) if p.changes_tokens]
        if self.layout == "packed" and later:
            raise PassSpecError(f"rlt layout='packed' leaves no per-clip attention for {', '.join(later)} to "
                                f"rewrite: use layout='padded' (or 'auto', which picks it)")
        if self.layout != "auto":
            return self.layout
        return "padded" if later else "packed"

    @staticmethod
    def _check_site(node: fx.Node, region: set[fx.Node]) -> None:
        q, k, v = node.args[:3]
        causal = arg(node, "is_causal", False)
        if arg(node, "attn_mask") is not None or causal:
            raise UnsupportedModelError(f"RLT cannot pack clips through attention {node.name}: it already has "
                                        f"{'a causal flag' if causal else 'a mask'}")
        if not all(n in region for n in (q, k, v) if isinstance(n, fx.Node)):
            raise UnsupportedModelError(f"RLT cannot pack clips through attention {node.name}: its keys or "
                                        f"values do not come from the video tokens")

    @staticmethod
    def _packed_attention(sites, outs: Packed) -> None:
        """Block-diagonal attention over the packed tokens at every site, one clip per row (whatever the
        leading dims: (B, H, N, d), (B, N, d), (B * H, N, d)), with no L x L mask: an L x L matmul would
        mix clips (0 x NaN is NaN) and cost attention over the whole batch."""
        for node in sites:
            q, k, v = node.args[:3]
            kwargs = {k: v for k, v in node.kwargs.items() if k != "attn_mask"}
            replace_node(node, rlt_attention, (q, k, v, outs.pad_idx, outs.key_bias, outs.unpad_idx), kwargs)

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _stream_in(analysis: Analysis, block: Block) -> fx.Node:
        """The residual stream entering `block`: the operand of its first residual add that does not
        come from the attention."""
        site = block.sites[0]
        if site.residual is None:
            raise UnsupportedModelError(f"RLT found no residual connection around {site.module}")
        stream = stream_in(site)
        if stream is None:
            raise UnsupportedModelError(f"RLT cannot tell the token stream entering {block.name}")
        shape = ax.shape_of(stream)
        tok = analysis.axes.axis_of(stream, 1)
        if shape is None or len(shape) != 3 or len({lab.kind for lab in _grid_labels(tok)}) != 3:
            raise UnsupportedModelError(
                f"RLT needs the tokens entering {block.name} as (batch, tokens, channels) with tokens over "
                f"(frames, rows, columns); found {stream.name} of shape {shape}")
        return stream

    @staticmethod
    def _order(grid_labels, conv_labels, model: str) -> tuple[int, int, int]:
        """Token order as a permutation of the embedding's (t, h, w) grid, major first."""
        conv_labels = list(conv_labels)
        try:
            order = tuple(conv_labels.index(lab) for lab in grid_labels)
        except ValueError:
            order = ()
        if sorted(order) != [0, 1, 2]:
            raise UnsupportedModelError(f"{model}: the tokens are not the tubelet grid of the patch embedding "
                                        f"(token axis {grid_labels}, grid {conv_labels})")
        return order

    @staticmethod
    def _check_region(region: set[fx.Node], amap: ax.AxisMap, grid: set) -> None:
        for n in region:
            if n.target in TOKEN_MIXING:
                raise UnsupportedModelError(f"RLT cannot pack clips: {n.name} ({n.target}) mixes tokens other "
                                            f"than through attention")
            if n.target is aten.slice.Tensor:
                d = n.args[1] if len(n.args) > 1 else 0
                if grid & set(amap.axis_of(n.args[0], d).labels):
                    raise UnsupportedModelError(f"RLT cannot pack clips: {n.name} slices the token axis")

    def _example_count(self, ctx: PassContext, embed: Tubelets, prefix: int) -> int:
        """Tokens kept (with prefix tokens) on the capture's example: the sequence length the graph's
        metadata shows."""
        v = values_at(ctx.gm, [embed.video], ctx.capture.flat_inputs())[embed.video].permute(0, *embed.dims)
        counts = keep_mask(v, embed.tubelet, self.tau, self.compare).reshape(v.shape[0], -1).sum(1) + prefix
        return int(counts.sum()), int(counts.max())

    @staticmethod
    def _rewrite_exits(gm, region, amap, grid, stream, state, outs: Packed | Padded, inserted: set) -> list[str]:
        """Replace each place where the tokens leave the token axis by its per-clip form."""
        prefix = state.prefix
        graph = gm.graph
        done = []
        packed = isinstance(outs, Packed)
        inserted = inserted | {stream}
        for n in [n for n in graph.nodes if n in region and n is not stream]:
            for user in list(n.users):
                if user in region or user in inserted or user.target in _OURS or user.target is aten.sym_size.int or \
                        "assert" in getattr(user.target, "__name__", ""):
                    continue
                if user.op == "output":
                    with graph.inserting_before(user):
                        new = graph.call_function(rlt_unpack, (n, outs.cover, stream))
                    copy_scope(n, new)
                    user.replace_input_with(n, new)
                    done.append("token output run-length decoded")
                    continue
                axes = amap[n]
                tok_dims = [d for d, a in enumerate(axes) if grid & set(a.labels)]
                if user.target is aten.mean.dim and tok_dims == [1]:
                    dims = arg(user, "dim")
                    dims = [dims] if isinstance(dims, int) else list(dims)
                    keepdim = bool(arg(user, "keepdim", False))
                    if [d % len(axes) for d in dims] == [1]:
                        if packed:
                            replace_node(user, rlt_pool, (n, outs.pool, outs.pad_idx, keepdim))
                        else:
                            replace_node(user, size_weighted_mean, (n, outs.size, 0, keepdim))
                        done.append("mean over tokens pooled per clip")
                        continue
                if user.target is aten.select.int and tok_dims == [1] and user.args[1] % len(axes) == 1:
                    index = user.args[2]
                    # prefix tokens and (tokens in (t, ...) order) the first tubelet are always kept, in place
                    first = state.grid[1] * state.grid[2] if state.order[0] == 0 else 0
                    if 0 <= index < prefix + first:
                        if packed:
                            replace_node(user, rlt_select, (n, outs.starts, index))
                        done.append(f"token {index} taken per clip")
                        continue
                raise UnsupportedModelError(
                    f"RLT cannot unpack the tokens at {user.name} ({user.target}): dittofx handles a mean over the "
                    f"tokens, taking a class token or a token of the first tubelet, and returning the token sequence")
        return sorted(set(done)) or ["none"]
