"""ToMe(r, unmerge_output=True) on backbones whose output is every token (Dinov2, CLIP vision):
merged as in the paper, then every token takes its merged token's value at the end of the last
merging block. Checked against the plain-PyTorch reference (reference.py) re-running the layers."""

import pytest
import torch

import dittofx
from dittofx.errors import PassSpecError, UnsupportedModelError
from dittofx.passes.tome import ToMe

try:  # tests/passes is a package
    from . import reference as ref
except ImportError:  # run as loose files
    import reference as ref

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=4,
             intermediate_size=64)


@pytest.fixture(scope="module")
def dinov2():
    torch.manual_seed(0)
    model = transformers.Dinov2Model(transformers.Dinov2Config(**SMALL, layerscale_value=0.5)).eval()
    return model, torch.randn(2, 3, 32, 32)


def unmerged(t, covers):
    """Every original token, each with the value of the merged token that covers it."""
    out = torch.empty(t.shape[0], sum(len(c) for c in covers[0]), t.shape[-1])
    for b, groups in enumerate(covers):
        for row, members in enumerate(groups):
            out[b, members] = t[b, row]
    return out


def run_layers(t, layers, schedule, parts):
    """The encoder with ToMe after each layer's attention, then every token unmerged. `parts(layer)`
    gives (norm1, attention, scale1, norm2, mlp, scale2), the attention with q/k/v/out projections."""
    size = torch.ones(t.shape[:2])
    covers = [[[i] for i in range(t.shape[1])] for _ in range(t.shape[0])]
    merged = False
    for layer, r in zip(layers, schedule):
        norm1, a, scale1, norm2, mlp, scale2 = parts(layer)
        h = norm1(t)
        b, n, _ = h.shape

        def heads(proj):
            return proj(h).view(b, n, -1, a.head_dim).transpose(1, 2)

        q, k, v = heads(a.q_proj), heads(a.k_proj), heads(a.v_proj)
        o = ref.attend(q, k, v, size if merged else None, scale=a.head_dim ** -0.5)
        out = a.o_proj if hasattr(a, "o_proj") else a.out_proj
        t = t + scale1(out(o.transpose(1, 2).reshape(b, n, -1)))
        if r > 0:
            t, size, groups = ref.tome_merge(t, k.mean(1), size, r, 1)
            covers = [[sum((c[j] for j in g), []) for g in gs] for c, gs in zip(covers, groups)]
            merged = True
        t = t + scale2(mlp(norm2(t)))
    return unmerged(t, covers)


@torch.no_grad()
def dinov2_reference(model, x, schedule):
    def parts(layer):
        return layer.norm1, layer.attention, layer.layer_scale1, layer.norm2, layer.mlp, layer.layer_scale2

    seq = model.layernorm(run_layers(model.embeddings(x), model.encoder.layer, schedule, parts))
    return seq, seq[:, 0]


@torch.no_grad()
def clip_reference(model, x, schedule):
    def parts(layer):
        same = torch.nn.Identity()
        return layer.layer_norm1, layer.self_attn, same, layer.layer_norm2, layer.mlp, same

    t = model.pre_layrnorm(model.embeddings(x))
    seq = run_layers(t, model.encoder.layers, schedule, parts)
    return seq, model.post_layernorm(seq[:, 0])


@pytest.mark.parametrize("r", [3, [5, 0, 2], [2, 2, 0]])
def test_dinov2_backbone_matches_reference(dinov2, r):
    model, x = dinov2
    opt = dittofx.optimize(model, [ToMe(r=r, unmerge_output=True)], example_inputs=(x,))
    schedule = [r] * 3 if isinstance(r, int) else r
    want_seq, want_pool = dinov2_reference(model, x, schedule)
    with torch.no_grad():
        got = opt(x)
    assert got.last_hidden_state.shape == want_seq.shape == (2, 65, 32)
    torch.testing.assert_close(got.last_hidden_state, want_seq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.pooler_output, want_pool, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # tokens really merged: some output tokens are copies of others
        first = got.last_hidden_state[0, 1:]
        assert len(torch.unique(first, dim=0)) < first.shape[0]
    assert "unmerged after encoder.layer.2" in " ".join(opt.report.blocks[-1].actions)


def test_r0_is_the_untouched_backbone(dinov2):
    model, x = dinov2
    opt = dittofx.optimize(model, [ToMe(r=0, unmerge_output=True)], example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(opt(x).last_hidden_state, model(x).last_hidden_state)


def test_off_is_refused_with_the_option_named(dinov2):
    model, x = dinov2
    with pytest.raises(UnsupportedModelError, match="outputs every token: unmerge at the output with "
                                                    "tome:unmerge_output=True"):
        dittofx.optimize(model, [ToMe(r=2)], example_inputs=(x,))


def test_clip_vision_backbone_matches_reference():
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SMALL)).eval()
    x = torch.randn(2, 3, 32, 32)
    opt = dittofx.optimize(model, [ToMe(r=4, unmerge_output=True)], example_inputs=(x,))
    want_seq, want_pool = clip_reference(model, x, [4] * 3)
    with torch.no_grad():
        got = opt(x)
    torch.testing.assert_close(got.last_hidden_state, want_seq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.pooler_output, want_pool, rtol=1e-5, atol=1e-5)


def test_unmerge_output_is_for_r_mode():
    with pytest.raises(PassSpecError, match="unmerge_output applies to r"):
        ToMe(ratio=0.5, unmerge_output=True)
