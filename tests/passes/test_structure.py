"""Each pass on a small graph, in torch_tensorrt's style: which ops appear, which vanish, how many.

The numeric tests (exactness against plain-PyTorch references) live beside each pass's folder; these
say where each pass puts its nodes, counted against what the analysis found in the untouched graph.
"""

from collections import Counter

import pytest
import torch

import dittofx
from dittofx.models import zoo
from dittofx.passes.rlt import ops as rlt_ops
from dittofx.passes.tome import ops as tome_ops
from dittofx.rewriter import tokens
from dittofx.rewriter.analysis import analyze
from dittofx.runtime.pab import PyramidBroadcast, program

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


def ops(gm) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def optimized(name, passes):
    zm = zoo.build(name)
    untouched = dittofx.optimize(zm.model, [], zm.example_inputs, zm.example_kwargs).graph_module
    opt = dittofx.optimize(zm.model, passes, zm.example_inputs, zm.example_kwargs)
    return untouched, opt.graph_module


def test_tome_vit_one_matching_and_one_merge_per_block():
    before, after = optimized("vit", ["tome:r=4"])
    blocks = len(analyze(before).blocks)
    got = ops(after)
    assert got[tome_ops.head_mean] == got[tome_ops.bipartite_soft_matching] == blocks
    assert got[tome_ops.merge_wavg] == got[tome_ops.merge_sizes] == blocks
    assert got[tokens.proportional_bias] == blocks - 1  # after every merge but the last, which no attention follows
    assert got[SDPA] == ops(before)[SDPA]  # attention stays fused
    assert got[tokens.size_weighted_mean] + got[aten.select.int] >= 1  # the head reads sizes or the class token
    assert not got[aten.scatter_reduce.two]


def test_tome_r0_adds_nothing():
    before, after = optimized("vit", ["tome:r=0"])
    assert ops(after) == ops(before)


def test_tome_diffusion_merge_and_unmerge_around_each_spatial_attention():
    before, after = optimized("dit", ["tome:ratio=0.5"])
    spatial = sum(s.kind == "spatial" for s in analyze(before).sites)
    got = ops(after)
    assert got[tome_ops.grid_matching] == got[tome_ops.unmerge_index] == got[tome_ops.unmerge] == spatial
    assert not got[tokens.proportional_bias] and not got[tome_ops.bipartite_soft_matching]


def test_rlt_packed_replaces_the_tubelet_conv_and_every_attention():
    before, after = optimized("videomae", ["rlt"])
    sites = len(analyze(before).sites)
    got = ops(after)
    assert ops(before)[aten.conv3d.default] + ops(before)[aten.convolution.default] == 1
    assert not got[aten.conv3d.default] and not got[aten.convolution.default]
    assert got[rlt_ops.rlt_keep] == got[rlt_ops.rlt_patch_embed] == got[rlt_ops.rlt_tokenize] == 1
    assert got[rlt_ops.rlt_attention] == sites and not got[SDPA]  # block-diagonal, no L x L mask
    assert got[rlt_ops.rlt_pool] == 1 and not got[aten.mean.dim]  # VideoMAE's mean pooling, per clip


def test_rlt_padded_keeps_sdpa_with_token_sizes_for_a_later_tome():
    before, after = optimized("videomae", ["rlt", "tome:r=2"])
    sites = len(analyze(before).sites)
    got = ops(after)
    assert got[rlt_ops.rlt_tokenize_padded] == 1 and not got[rlt_ops.rlt_tokenize] and not got[rlt_ops.rlt_attention]
    assert got[SDPA] == sites
    assert got[tome_ops.bipartite_soft_matching] == sites  # ToMe continues from RLT's sizes in every block
    assert got[tokens.size_weighted_mean] == 1


def test_rlt_tau_below_zero_adds_nothing():
    before, after = optimized("videomae", ["rlt:tau=-1"])
    assert ops(after) == ops(before)


@pytest.mark.parametrize("name", ["latte", "cogvideox"])
def test_pab_moves_every_attention_into_a_site_and_broadcast_programs_skip_it(name):
    before, after = optimized(name, ["pab"])
    sites = len(analyze(before).sites)
    assert isinstance(after.pab, PyramidBroadcast) and len(after.pab.sites) == sites
    assert not ops(after)[SDPA]  # the main graph computes no attention itself
    calls = [n.target for n in after.graph.nodes if n.op == "call_module" and n.target.startswith("pab")]
    assert calls == ["pab"] + [f"pab.sites.{i}" for i in range(sites)]
    assert all(ops(site.attention)[SDPA] == 1 for site in after.pab.sites)
    assert ops(program(after, (True,) * sites))[SDPA] == sites
    assert ops(program(after, (False,) * sites))[SDPA] == 0
    first = tuple(i == 0 for i in range(sites))
    assert ops(program(after, first))[SDPA] == 1


def test_sdpa_canonicalises_unfused_timm_attention():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3).eval()
    for block in model.blocks:
        block.attn.fused_attn = False
    x = torch.randn(2, 3, 32, 32)
    before = dittofx.optimize(model, [], (x,)).graph_module
    after = dittofx.optimize(model, ["sdpa"], (x,)).graph_module
    assert not ops(before)[SDPA] and ops(after)[SDPA] == 2
    assert ops(before)[aten.softmax.int] == 2 and not ops(after)[aten.softmax.int]
