"""ToMe(r) on ViTs with rotary position embeddings (timm EVA02, transformers VJEPA2): the rotary tables follow
the merged tokens (each token keeps the position it carries; a merged token its destination's), against an
independent plain-PyTorch reference written here, which re-runs the models' submodules with its own
rotary embedding applied at the kept positions."""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import dittofx
from dittofx.errors import UnsupportedModelError
from dittofx.passes.tome import ToMe, parse_r

try:  # tests/passes is a package
    from . import reference as ref
except ImportError:  # run as loose files
    import reference as ref


def assert_close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def rotate_pairs(x, sin, cos):
    """Rotary embedding on interleaved pairs: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos + turned * sin


def merge_with_positions(t, metric, size, pos, r, protected):
    """ToMe's merge (reference.tome_merge) and the position each output token carries: its group's
    destination's (the first member of a group is the one it merges into, or the token itself)."""
    t, size, groups = ref.tome_merge(t, metric, size, r, protected)
    pos = torch.stack([pos[b, [g[0] for g in groups[b]]] for b in range(len(groups))])
    return t, size, pos


# ---------------------------------------------------------------------------------------------
# timm EVA02: rope over the patch tokens (not the class token), sin and cos halves of one table


def eva_model(depth=3):
    torch.manual_seed(0)
    return timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56, depth=depth,
                             num_classes=10).eval()


@torch.no_grad()
def eva_reference(model, x, schedule, follow=True):
    npt = model.num_prefix_tokens
    t, rope = model._pos_embed(model.patch_embed(x))
    t = model.norm_pre(t)
    sin_table, cos_table = rope.chunk(2, dim=-1)  # (patches, head_dim) each
    batch, n = t.shape[:2]
    size = torch.ones(batch, n)
    pos = torch.arange(n).expand(batch, n)
    merged = False
    for blk, r in zip(model.blocks, schedule):
        attn = blk.attn
        assert attn.gate is None and blk.gamma_1 is None and attn.qkv is not None  # what this reference covers
        h = blk.norm1(t)
        b, n, c = h.shape
        qkv = F.linear(h, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        q, k, v = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        rows = pos[:, npt:] - npt  # the table row of each patch token's position
        if not follow:  # the wrong rewrite: the first rows of the tables, whatever the tokens
            rows = torch.arange(n - npt).expand(b, n - npt)
        sin, cos = sin_table[rows][:, None], cos_table[rows][:, None]
        q = torch.cat([q[:, :, :npt], rotate_pairs(q[:, :, npt:], sin, cos)], dim=2)
        k = torch.cat([k[:, :, :npt], rotate_pairs(k[:, :, npt:], sin, cos)], dim=2)
        o = ref.attend(q, k, v, size if merged else None)
        t = t + attn.proj(attn.norm(o.transpose(1, 2).reshape(b, n, c)))
        if r > 0:
            t, size, pos = merge_with_positions(t, k.mean(1), size, pos, r, npt)
            merged = True
        t = t + blk.mlp(blk.norm2(t))
    t = model.norm(t)
    assert model.global_pool == "avg"
    return model.head(model.fc_norm(ref.weighted_pool(t, size, npt)))


@pytest.fixture(scope="module")
def eva():
    return eva_model()


@pytest.mark.parametrize("r", [3, [4, 2, 1], (3, 0.5)])
def test_eva02_matches_reference(eva, r):
    x = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    opt = dittofx.optimize(eva, [ToMe(r=r)], (x,))
    assert any("position tables (rotary) follow" in n for n in opt.report.notes)
    with torch.no_grad():
        assert_close(opt(x), eva_reference(eva, x, parse_r(3, r)))


def test_eva02_tables_matter(eva):
    """The reference is sensitive to the rows taken: the tables read at 0..N'-1 (as a rewrite that only
    resized them would) give another result."""
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    want = eva_reference(eva, x, [4, 2, 1])
    opt = dittofx.optimize(eva, [ToMe(r=[4, 2, 1])], (x,))
    with torch.no_grad():
        got = opt(x)
    assert_close(got, want)
    with pytest.raises(AssertionError):  # the tolerance tells the right rows from the first ones
        assert_close(got, eva_reference(eva, x, [4, 2, 1], follow=False))


def test_eva02_r0_is_exact(eva):
    x = torch.randn(2, 3, 56, 56)
    opt = dittofx.optimize(eva, [ToMe(r=0)], (x,))
    with torch.no_grad():
        assert torch.equal(opt(x), eva(x))


# ---------------------------------------------------------------------------------------------
# transformers VJEPA2: 3-D rope from arange(N) computed in every attention (frame, row, column ids)


class VJEPA2Pooled(nn.Module):
    """VJEPA2's encoder with a mean over the tokens: a model that returns no per-token output."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, video):
        return self.encoder(video).last_hidden_state.mean(1)


def vjepa2_model():
    from transformers import VJEPA2Config
    from transformers.models.vjepa2.modeling_vjepa2 import VJEPA2Encoder

    torch.manual_seed(0)
    cfg = VJEPA2Config(hidden_size=48, num_attention_heads=2, num_hidden_layers=3, crop_size=32, patch_size=8,
                       frames_per_clip=4, tubelet_size=2, attn_implementation="sdpa")
    return VJEPA2Pooled(VJEPA2Encoder(cfg)).eval(), cfg


def vjepa2_rope(x, ids, cfg):
    """VJEPA2's rope written from its description: head dims in three parts rotated by the frame, row and
    column of each token's position (frequencies 10000^(-i / (D/2)), tiled over the part), the rest as is."""
    grid = cfg.crop_size // cfg.patch_size
    frame, row, col = ids // (grid * grid), (ids % (grid * grid)) // grid, ids % grid
    head_dim = x.shape[-1]
    part = 2 * ((head_dim // 3) // 2)
    out = []
    for i, p in enumerate((frame, row, col)):
        omega = 1.0 / 10000 ** (torch.arange(part // 2, dtype=x.dtype) / (part / 2))
        angle = p[:, None, :, None].to(x.dtype) * omega  # (B, 1, N, part/2)
        angle = torch.cat([angle, angle], dim=-1)
        out.append(rotate_pairs(x[..., i * part:(i + 1) * part], angle.sin(), angle.cos()))
    return torch.cat(out + [x[..., 3 * part:]], dim=-1)


@torch.no_grad()
def vjepa2_reference(model, cfg, video, schedule):
    enc = model.encoder
    t = enc.embeddings(video)
    batch, n = t.shape[:2]
    size, pos, merged = torch.ones(batch, n), torch.arange(n).expand(batch, n), False
    for layer, r in zip(enc.layer, schedule):
        a = layer.attention
        h = layer.norm1(t)
        b, n, _ = h.shape

        def heads(proj):
            return proj(h).view(b, n, -1, a.attention_head_size).transpose(1, 2)

        q, k, v = vjepa2_rope(heads(a.query), pos, cfg), vjepa2_rope(heads(a.key), pos, cfg), heads(a.value)
        o = ref.attend(q, k, v, size if merged else None, scale=a.scaling)
        t = t + a.proj(o.transpose(1, 2).reshape(b, n, -1))
        if r > 0:
            t, size, pos = merge_with_positions(t, k.mean(1), size, pos, r, 0)
            merged = True
        t = t + layer.mlp(layer.norm2(t))
    return ref.weighted_pool(enc.layernorm(t), size, 0)


@pytest.fixture(scope="module")
def vjepa2():
    pytest.importorskip("transformers.models.vjepa2")
    model, cfg = vjepa2_model()
    return model, cfg, torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("r", [4, [6, 3, 0]])
def test_vjepa2_matches_reference(vjepa2, r):
    model, cfg, video = vjepa2
    opt = dittofx.optimize(model, [ToMe(r=r)], (video,))
    with torch.no_grad():
        assert_close(opt(video), vjepa2_reference(model, cfg, video, parse_r(3, r)))


def test_vjepa2_r0_is_exact(vjepa2):
    model, _, video = vjepa2
    with torch.no_grad():
        assert torch.equal(dittofx.optimize(model, [ToMe(r=0)], (video,))(video), model(video))


# ---------------------------------------------------------------------------------------------
# where the tables cannot follow: `check` refuses with the reason, before any rewrite


class FoldedRope(nn.Module):
    """A ViT whose rope multiplies queries and keys with the heads folded into the token axis,
    (B, H N, d) against a (H N, d) table: which rows belong to which token is not an axis of its own."""

    def __init__(self, dim=32, heads=2, grid=4):
        super().__init__()
        self.heads, n = heads, grid * grid
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)
        self.register_buffer("table", torch.randn(heads * n, dim // heads))

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q = (q.reshape(b, self.heads * n, -1) * self.table).reshape(b, self.heads, n, -1)
        k = (k.reshape(b, self.heads * n, -1) * self.table).reshape(b, self.heads, n, -1)
        o = F.scaled_dot_product_attention(q, k, v)
        t = t + self.proj(o.transpose(1, 2).reshape(b, n, c))
        t = t + self.mlp(t)
        return self.head(t.mean(1))


def test_refused_with_the_reason_before_the_rewrite():
    torch.manual_seed(0)
    model = FoldedRope().eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(UnsupportedModelError) as err:
        dittofx.optimize(model, [ToMe(r=2)], (x,))
    msg = str(err.value)
    assert "position-indexed operands of the attention cannot follow moved tokens" in msg
    assert "folds the tokens into another axis" in msg
    assert "does not run" not in msg and "\n" not in msg.strip()
