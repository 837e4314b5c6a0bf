"""ToMe's diffusion mode: merge before each attention, unmerge after.

`ToMe(ratio=0.5)`, as tomesd, option for option: each output must keep every token, so in each block
at most `max_downsample` coarser than the finest grid, merge int(N * ratio) tokens before the spatial
self-attention (and, as asked, the cross-attention's queries and the MLP) and unmerge after it (each
source takes its destination's value). One matching per block: its metric is the block's input
tokens, its destinations one token per sy x sx cell of the grid (the top-left one, one drawn once
with `seed`, or with `use_rand` one drawn at every call by the `random_destinations` op from the
generator of the graph's `tome_draws`). There is no proportional attention.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from dittofx.passes.base import PassContext, PassResult
from dittofx.passes.tome.attention import attention_problem
from dittofx.passes.tome.attention import shape as _shape
from dittofx.passes.tome.joint import joint_check, run_joint
from dittofx.passes.tome.ops import (
    destination_draws,
    grid_destinations,
    grid_matching,
    merge_sizes,
    merge_wavg,
    unmerge,
    unmerge_index,
)
from dittofx.rewriter.analysis import (
    Analysis,
    AttentionSite,
    Block,
    feed_forward,
    patch_grid,
    projection_input,
    stream_in,
)
from dittofx.rewriter.edit import Inserter, descendants, reroute
from dittofx.rewriter.tokens import (
    make_token_sizes_dynamic,
    token_labels,
)

if TYPE_CHECKING:
    from dittofx.passes.tome import ToMe

aten = torch.ops.aten


def diffusion_check(tome: ToMe, analysis: Analysis, block: Block) -> str | None:
    reasons = [joint_check(s, analysis.axes, tome.grid) if s.kind == "joint" else site_check(s) for s in block.sites]
    return None if None in reasons else (reasons[0] or "no spatial self-attention")


def site_check(site: AttentionSite) -> str | None:
    if site.kind != "spatial":
        return f"{site.kind} attention (diffusion mode merges spatial self-attention)"
    if patch_grid(site) is None:
        return "the tokens are not exactly the patch grid"
    if problem := attention_problem(site):
        return problem
    x = projection_input(site.query)
    if x is None or any(projection_input(n) is not x for n in (site.key, site.value)):
        return "queries, keys and values do not come from one input"
    metric = stream_in(site)
    for node in (x, site.output, metric):
        if node is None or len(_shape(node)) != 3 or _shape(node)[1] != site.tokens:
            return "the attention input, output or residual is not (batch, tokens, channels)"
    return None


def run_diffusion(tome: ToMe, ctx: PassContext, result: PassResult) -> None:
    gm, analysis = ctx.gm, ctx.analysis
    run_joint(tome, ctx, result)  # joint text-image attention: joint.py
    places = [(b, s) for b in analysis.blocks for s in b.sites if site_check(s) is None]
    finest = finest_tokens(analysis, places)
    use_rand = tome.use_rand if tome.use_rand is not None else len({s.tokens for _, s in places}) > 1
    generator = torch.Generator().manual_seed(tome.seed) if tome.seed is not None and not use_rand else None
    draws = destination_draws(gm, tome.seed) if use_rand else None
    labels = frozenset().union(*(token_labels(s.seq_axis) for _, s in places))
    dynamic, done, skipped = False, set(), []
    for i, (block, site) in enumerate(places):
        downsample = math.ceil(math.sqrt(finest // site.tokens))  # tomesd's level of a block
        if downsample > tome.max_downsample:
            skipped.append(downsample)
            continue
        h, w = patch_grid(site)
        num_dst = (h // tome.sy) * (w // tome.sx)
        r = int(site.tokens * tome.ratio)
        if r > site.tokens - num_dst:
            result.note(block.name, f"ratio {tome.ratio} clamped to {site.tokens - num_dst} of {site.tokens} tokens "
                                    f"(one destination per {tome.sy}x{tome.sx} cell)")
            r = site.tokens - num_dst
        if r <= 0 or num_dst == 0:
            continue
        if not dynamic:
            make_token_sizes_dynamic(gm, analysis.axes, labels)
            dynamic = True
        metric = stream_in(site)  # tomesd's metric: the block's input tokens
        add = Inserter(metric)
        if draws is not None:
            a_pos, b_pos = draws.draw(add, metric, h, w, tome.sy, tome.sx)
        else:
            a_pos, b_pos = [add.constant(gm, f"tome_{ab}_pos_{i}", pos)
                            for ab, pos in zip("ab", grid_destinations(h, w, generator, tome.sy, tome.sx))]
        keep, src, dst = add.getitems(add(grid_matching, metric, a_pos, b_pos, r), 3)
        size = add(merge_sizes, metric, None, keep, src, dst)
        where = add(unmerge_index, keep, src, dst)
        merged = []
        for what, x, output, body in _targets(tome, block, site, first=block.name not in done):
            if x is None:
                result.note(block.name, f"tome: no {what} found to merge")
                continue
            into = Inserter(x)
            reroute(x, into(merge_wavg, x, None, size, keep, src, dst, num_dst), skip=into.nodes, only=body(x))
            after = Inserter(output)
            reroute(output, after(unmerge, output, where), skip=after.nodes)
            merged.append(what)
        done.add(block.name)
        text = " and ".join(merged) if merged else "nothing (merge_attn, merge_crossattn and merge_mlp are off)"
        result.note(block.name, f"tome: {site.module}: merged {r} of {site.tokens} tokens around the {text}")
        result.changed = True
    if skipped and not result.changed:
        result.note(None, f"tome: max_downsample={tome.max_downsample}: no spatial attention that fine (the finest is "
                          f"at downsample {min(skipped)}): nothing merged")
    elif skipped:
        result.note(None, f"tome: max_downsample={tome.max_downsample}: {len(skipped)} attention(s) at coarser "
                          f"resolutions left as they are")
    if not result.changed and not skipped:
        result.note(None, f"tome: ratio={tome.ratio}, nothing merged")


def finest_tokens(analysis: Analysis, places) -> int:
    """The token count at downsample 1: the grid the patch embedding makes of the latent (a UNet's
    conv_in keeps the latent's size, as tomesd's reference), else the largest attended grid."""
    largest = max((s.tokens for _, s in places), default=1)
    for node in analysis.patch_embeddings:
        shape = _shape(node)
        if len(shape) == 4 and shape[2] * shape[3] >= largest:
            return shape[2] * shape[3]
    return largest


def _targets(tome: ToMe, block: Block, site: AttentionSite, first: bool):
    """(what, its input, its output, which users of the input read the merged tokens) for each place
    the options merge around; input None where the block has no such place. The cross-attention and
    the MLP go with the block's first merged self-attention."""
    def toward(node):
        return lambda x: {u for u in x.users if node in descendants(u)}

    if tome.merge_attn:
        yield "attention", projection_input(site.query), site.output, toward(site.node)
    if tome.merge_crossattn and first:
        cross = next((s for s in block.sites if s.kind == "cross"), None)
        x = projection_input(cross.query) if cross is not None else None
        fits = x is not None and _shape(x)[1:2] == (site.tokens,) and _shape(cross.output)[1:2] == (site.tokens,)
        yield ("cross-attention", x if fits else None, cross.output if fits else None,
               toward(cross.query) if fits else None)
    if tome.merge_mlp and first:
        ff = feed_forward(block)
        fits = ff is not None and ff.output is not None and _shape(ff.input)[1:2] == (site.tokens,)
        yield "MLP", ff.input if fits else None, ff.output if fits else None, (lambda x: ff.body) if fits else None
