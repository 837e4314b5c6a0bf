"""The token-size facility: a graph whose token count changes mid-way runs at any count, exactly."""

import pytest
import torch

from dittofx.models import zoo
from dittofx.passes.sdpa import drop_trivial_masks
from dittofx.rewriter import axes
from dittofx.rewriter.analysis import analyze
from dittofx.rewriter.capture import capture
from dittofx.rewriter.edit import insert_after
from dittofx.rewriter.tokens import make_token_sizes_dynamic, token_labels

DROP = {"k": 0}


def drop_last_tokens(x):
    """Test op: drop DROP["k"] tokens from the end of the token axis (dim 1)."""
    return x[:, : x.shape[1] - DROP["k"]]


axes.register_rule(drop_last_tokens, axes.same_as_first_input)


def rewritten(zm, block_index):
    cap = capture(zm.model, zm.example_inputs, zm.example_kwargs)
    gm = cap.graph_module
    drop_trivial_masks(gm, cap.flat_inputs())  # transformers' all-true mask hard-codes the token count
    analysis = analyze(gm, cap.batched_inputs)
    block = analysis.blocks[block_index]
    assert block.token_dim == 1
    changed = make_token_sizes_dynamic(gm, analysis.axes, token_labels(analysis.axes.axis_of(block.stream, 1)))
    assert changed > 0
    insert_after(block.stream, drop_last_tokens, (block.stream,))
    gm.recompile()
    return gm


def timm_reference(model, x, block_index, k):
    """Plain timm forward with the last k tokens dropped after block `block_index`'s attention."""
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for i, blk in enumerate(model.blocks):
        t = t + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(t))))
        if i == block_index:
            t = t[:, : t.shape[1] - k]
        t = t + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(t))))
    return model.forward_head(model.norm(t))


@pytest.mark.parametrize("name", ["vit", "vit_reg"])
def test_timm_graph_runs_at_several_token_counts(name):
    zm = zoo.build(name, batch=3)
    gm = rewritten(zm, 1)
    x = zm.example_inputs[0]
    for k in (0, 1, 7, 20):
        DROP["k"] = k
        with torch.no_grad():
            out, ref = gm(x), timm_reference(zm.model, x, 1, k)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    DROP["k"] = 0
    with torch.no_grad():
        torch.testing.assert_close(gm(x[:1]), zm.model(x[:1]), rtol=1e-5, atol=1e-5)  # batch still dynamic


def test_transformers_vit_runs_at_several_token_counts():
    zm = zoo.build("hf_vit", batch=2)
    gm = rewritten(zm, 0)
    x = zm.example_inputs[0]
    vit = zm.model.vit
    for k in (0, 3, 11):
        DROP["k"] = k
        with torch.no_grad():
            h = vit.embeddings(x)
            for i, layer in enumerate(vit.layers):  # transformers 5 layout
                h = layer.attention(layer.layernorm_before(h))[0] + h
                if i == 0:
                    h = h[:, : h.shape[1] - k]
                h = layer.mlp(layer.layernorm_after(h)) + h
            ref = zm.model.classifier(vit.layernorm(h)[:, 0])
            out = gm(x).logits
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    DROP["k"] = 0


def test_reshape_groups():
    assert axes.reshape_groups((2, 197, 1152), (2, 197, 3, 6, 64)) == [([0], [0]), ([1], [1]), ([2], [2, 3, 4])]
    assert axes.reshape_groups((8, 16, 32), (2, 4, 16, 32)) == [([0], [0, 1]), ([1], [2]), ([2], [3])]
    assert axes.reshape_groups((2, 4, 16, 32), (2, 64, 32)) == [([0], [0]), ([1, 2], [1]), ([3], [2])]
