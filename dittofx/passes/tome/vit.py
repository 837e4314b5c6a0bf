"""ToMe's ViT mode: merge for good after each attention.

`ToMe(r=16)`. In every block, between attention and MLP, merge the r most similar tokens:

  1. metric: the block's attention keys, averaged over heads, L2-normalised;
  2. split the tokens alternately into A (even positions) and B (odd positions); protected prefix
     tokens (class, distillation, register) take part in neither side;
  3. score every A token against every B token (cosine similarity); keep each A token's best edge;
  4. the r A tokens with the best edges (sources) merge into their B match (destinations) by a
     size-weighted average; sizes start at 1 and add up;
  5. output order: the prefix, the unmerged A tokens (in original order when there is a prefix,
     else in decreasing score order, as the reference code), then B.

  Later attentions add log(size) to their logits (proportional attention, an additive SDPA mask so
  the fused kernel stays); heads that average tokens weight them by size. Their rotary tables (EVA02,
  VJEPA2) take the rows of the positions the tokens carry, a merged token its destination's
  (`rewriter/positions.py`). r is an int, a list (one
  per block) or (r, inflection): a linear ramp from r(1 - i) to r(1 + i). It is clamped to half the
  unprotected tokens of each block.

  Without r (`ToMe()`, `--pass tome`), r is chosen when the pass runs, from the graph: the largest
  constant r that still leaves half the unprotected tokens after the last block,
  r = (N - prefix) // (2 L) for N tokens into the first of L blocks (at least 1; `default_r`). For
  ViT-S/B/16 at 224 (197 tokens, 12 blocks) that is r=8, the paper's mild setting (a few tenths of
  a point of top-1 off the shelf; r=16, about 2x, leaves 5 tokens by the last block). The report
  says which r was chosen. `r=0` merges nothing (the exact setting).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dittofx.errors import PassSpecError
from dittofx.passes.base import PassContext, PassResult
from dittofx.passes.tome.attention import attention_problem
from dittofx.passes.tome.attention import shape as _shape
from dittofx.passes.tome.ops import (
    SourceRecorder,
    bipartite_soft_matching,
    compose_where,
    head_mean,
    merge_sizes,
    merge_source,
    merge_wavg,
    num_destinations,
    parse_r,
    unmerge,
    unmerge_index,
)
from dittofx.rewriter.analysis import (
    Analysis,
    AttentionSite,
    Block,
    outputs_carry,
)
from dittofx.rewriter.edit import Inserter, arg, replace_node, reroute, set_arg
from dittofx.rewriter.positions import follow_tokens, kept_positions, positional_problem
from dittofx.rewriter.tokens import (
    folded_heads_problem,
    make_token_sizes_dynamic,
    set_size_bias,
    size_bias_problem,
    size_weighted_mean,
    sizes_at,
    token_labels,
)

if TYPE_CHECKING:
    from dittofx.passes.tome import ToMe

aten = torch.ops.aten


def vit_sites(block: Block) -> list[AttentionSite]:
    return [s for s in block.sites if s.is_self and s.kind in ("spatial", "joint")]


def vit_check(tome: ToMe, analysis: Analysis, block: Block) -> str | None:
    sites = vit_sites(block)
    if not sites:
        return "no self-attention over image tokens"
    for site in sites:
        if site.windowed or site.position_bias:  # before the stream checks: Swin's is windowed away
            return attention_problem(site)
    if analysis.poolings:
        return (f"the token count changes between blocks by pooling ({analysis.poolings[0]}): merged tokens "
                f"are no grid to pool")
    if block.stream is None or block.token_dim != 1 or len(_shape(block.stream)) != 3:
        return "no (batch, tokens, channels) residual stream after the attention"
    key = sites[-1].key
    if len(_shape(key)) not in (3, 4) or _shape(key)[-2] != block.tokens or \
            (len(_shape(key)) == 3 and folded_heads_problem(key, analysis.axes)):
        return "the attention keys are not (batch, heads, tokens, dim) nor heads folded batch-major into the batch"
    for site in sites:
        if problem := attention_problem(site) or positional_problem(site) or \
                (tome.prop_attn and size_bias_problem(site.node, analysis.axes)):
            return problem
    if not tome.unmerge_output and outputs_carry(analysis, token_labels(analysis.axes.axis_of(block.stream, 1))):
        return ("the model outputs every token: unmerge at the output with tome:unmerge_output=True (a backbone), "
                "or merge and unmerge around each attention with tome:ratio=...")
    return None


def default_r(tokens: int, prefix: int, blocks: int) -> int:
    """ToMe's r when none is given: the largest constant r that leaves at least half of the `tokens - prefix`
    unprotected tokens after `blocks` merges, at least 1 (r=8 for 197 tokens, 1 protected, 12 blocks)."""
    return max(1, (tokens - prefix) // (2 * max(1, blocks)))


def run_vit(tome: ToMe, ctx: PassContext, result: PassResult) -> None:
    gm, analysis = ctx.gm, ctx.analysis
    blocks = [b for b in analysis.blocks if vit_check(tome, analysis, b) is None]
    labels = token_labels(analysis.axes.axis_of(blocks[0].stream, 1))
    blocks = [b for b in blocks if token_labels(analysis.axes.axis_of(b.stream, 1)) == labels]
    if not (blocks := _after_fixed_positions(analysis, blocks, labels, result)):
        return
    r = tome.r
    if r is None:
        r = default_r(blocks[0].tokens, blocks[0].prefix, len(blocks))
        result.note(None, f"tome: r={r} (default for {len(blocks)} blocks of {blocks[0].tokens} tokens: leaves "
                          f"half the unprotected tokens after the last block; tome:r=N to choose)")
    schedule = parse_r(len(blocks), r)
    if len(schedule) > len(blocks):
        raise PassSpecError(f"tome: r lists {len(schedule)} layers but the model has {len(blocks)} blocks "
                            f"where ToMe applies")
    make_token_sizes_dynamic(gm, analysis.axes, labels)
    tokens, size, biased, source, last, where = blocks[0].tokens, None, None, None, None, None
    masks = {}  # each biased attention's own mask (unmerge_output: blocks after the last merge keep it)
    # token sizes an earlier pass gave (RLT's padded clips: a clip's last token and its copies count
    # as one), as the proportional bias of the first attention: continue from those sizes
    given = next((sizes_at(s.node) for s in vit_sites(blocks[0]) if sizes_at(s.node) is not None), None)
    if given is not None:
        size = given
    positions, merges = None, []  # the captured position each token carries (rotary tables follow it)
    for block, r in zip(blocks, schedule):
        sites = vit_sites(block)
        for site in sites if biased is not None else ():
            masks[site.node] = arg(site.node, "attn_mask")
            set_size_bias(gm, site.node, biased)  # proportional attention (replacing RLT's, which `size` continues)
        limit = (tokens - block.prefix) // 2
        if r > limit:
            result.note(block.name, f"r={r} clamped to {limit} (half the {tokens - block.prefix} "
                                    f"unprotected tokens)")
            r = limit
        if r <= 0:
            continue
        add = Inserter(block.stream)
        metric = add(head_mean, sites[-1].key, block.stream)
        keep, src, dst = add.getitems(add(bipartite_soft_matching, metric, r, block.prefix), 3)
        new_size = add(merge_sizes, block.stream, size, keep, src, dst)
        num_dst = num_destinations(tokens, block.prefix)
        if given is not None:  # the token count depends on the data (RLT's clips): read it at run time
            num_dst = add(num_destinations, add(aten.sym_size.int, block.stream, 1), block.prefix)
        merged = add(merge_wavg, block.stream, size, new_size, keep, src, dst, num_dst)
        positions = add(kept_positions, positions, keep)
        merges.append((merged, positions))
        if tome.trace_source:
            source = add(merge_source, block.stream, source, keep, src, dst)
        if tome.unmerge_output:
            where = add(compose_where, add(unmerge_index, keep, src, dst), where)
        reroute(block.stream, merged, skip=add.nodes)
        size, last, last_block = new_size, merged, block
        if tome.prop_attn:
            biased = size
        protected = f", {block.prefix} protected" if block.prefix else ""
        result.note(block.name, f"tome: merged {r} tokens after attention ({tokens} -> {tokens - r}{protected})")
        tokens -= r
    _follow_positions(gm, analysis, labels, merges, tome.unmerge_output, result)
    if last is None:
        result.note(None, "tome: every block has r=0, nothing merged")
        return
    if tome.trace_source:  # keep the final source matrix for `opt.tome_source`
        recorder = SourceRecorder()
        Inserter(source).module(gm, "tome_source", recorder, source)
        result.stats["tome_source"] = recorder
    result.note(None, f"tome: {blocks[0].tokens} tokens -> {tokens} after {len(blocks)} blocks")
    result.changed = True
    if tome.unmerge_output:
        # at the output: after the last block ToMe runs in (blocks of r=0 after the last merge attend
        # over the merged tokens), or after the last merge where that block has no MLP sub-block to close it
        end_block = blocks[-1] if blocks[-1].mlp_residual is not None else last_block
        _unmerge_after(gm, end_block, last, where, masks, result)
    else:
        _weight_means(gm, analysis, labels, last, size, tokens, blocks[-1].prefix, result)


def _after_fixed_positions(analysis, blocks, labels, result) -> list[Block]:
    """The blocks after the last attention over these tokens whose position tables cannot follow merged
    tokens (`positional_problem`): a merge before it would break it."""
    fixed = [(s, why) for s in analysis.sites if s.is_self and labels & set(s.seq_axis.labels)
             and (why := positional_problem(s))]
    if not fixed:
        return blocks
    site, why = fixed[-1]
    after = [b for b in blocks if b.stream > site.node]  # fx nodes compare by their order in the graph
    if len(after) < len(blocks):
        result.note(None, f"tome: no merge before {site.module}: {why}")
    return after


def _follow_positions(gm, analysis, labels, merges, unmerged, result) -> None:
    """Every attention over the merged tokens after a merge: its rotary tables take the rows of the
    positions its tokens carry (`rewriter/positions.py`). With `unmerged`, the tokens after the last merge
    are the original ones again."""
    if not merges:
        return
    count = 0
    for site in analysis.sites:
        if not site.is_self or site.tokens <= 1 or not labels & set(site.seq_axis.labels):
            continue
        before = [p for m, p in merges if m < site.node]  # in graph order
        if not before or (unmerged and site.node > merges[-1][0]):
            continue
        count += follow_tokens(gm, site, before[-1])
    if count:
        result.note(None, f"tome: {count} position tables (rotary) follow the merged tokens' positions")


def _unmerge_after(gm, block, merged, where, masks, result) -> None:
    """Every original token back at the end of `block`: what follows (final norm, heads, later blocks,
    the outputs) sees the original token count, each token its merged token's value, and attends with
    its own mask again (no token sizes)."""
    end = block.mlp_residual if block.mlp_residual is not None else merged
    add = Inserter(end)
    reroute(end, add(unmerge, end, where), skip=add.nodes)
    for sdpa, mask in masks.items():
        if sdpa > end:  # in graph order
            set_arg(sdpa, "attn_mask", mask)
    result.note(block.name, f"tome: every token unmerged after {block.name} (unmerge_output)")


def _weight_means(gm, analysis, labels, last, size, tokens, prefix, result) -> None:
    """Means over tokens after the last merge count each token by its size (global pooling)."""
    nodes = list(gm.graph.nodes)
    for node in nodes[nodes.index(last) + 1:]:
        if node.target is size_weighted_mean and node.args[1] is not size:  # an earlier pass's (RLT)
            node.args = (node.args[0], size) + tuple(node.args[2:])
            continue
        if node.target is not aten.mean.dim or node not in analysis.axes.tensors:
            continue
        x, axes = node.args[0], analysis.axes[node.args[0]]
        dims = [d % len(axes) for d in node.args[1]] if axes else []
        if not any(labels & set(axes[d].labels) for d in dims):
            continue
        keepdim = bool(arg(node, "keepdim", False))
        offset = prefix - axes[1].prefix
        if dims != [1] or len(axes) != 3 or not 0 <= offset <= prefix:
            result.note(None, f"tome: cannot weight the mean {node.name} by token size")
            continue
        replace_node(node, size_weighted_mean, (x, size, offset, keepdim))
        result.note(None, "tome: the mean over tokens in the head weights tokens by size")
