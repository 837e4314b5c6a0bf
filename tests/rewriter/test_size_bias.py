"""Token sizes bias attention whatever the layout of its queries: (B, H, N, d), the heads folded
batch-major into the batch (B·H, N, d), or one head (B, N, d). Each layout computes what the
(B, H, N, d) model with the same weights computes, under ToMe and under RLT's padded clips."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dittofx
from dittofx.errors import UnsupportedModelError

D = 32


class Attention(nn.Module):
    def __init__(self, heads: int, layout: str):
        super().__init__()
        self.qkv, self.proj, self.heads, self.layout = nn.Linear(D, 3 * D), nn.Linear(D, D), heads, layout

    def forward(self, x):
        b, n, _ = x.shape
        h, d = self.heads, D // self.heads
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.layout == "tokens":  # one head, no head axis at all
            return self.proj(F.scaled_dot_product_attention(q, k, v))
        split = [t.reshape(b, n, h, d).transpose(1, 2) for t in (q, k, v)]  # (B, H, N, d)
        if self.layout == "folded":  # batch-major (B·H, N, d), as diffusers' head_to_batch_dim
            o = F.scaled_dot_product_attention(*(t.reshape(b * h, n, d) for t in split)).reshape(b, h, n, d)
        elif self.layout == "heads_major":  # (H·B, N, d): an order token sizes cannot follow
            o = F.scaled_dot_product_attention(*(t.transpose(0, 1).reshape(h * b, n, d) for t in split))
            o = o.reshape(h, b, n, d).transpose(0, 1)
        else:
            o = F.scaled_dot_product_attention(*split)
        return self.proj(o.transpose(1, 2).reshape(b, n, D))


class Block(nn.Module):
    def __init__(self, heads, layout):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(D), Attention(heads, layout), nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VideoViT(nn.Module):
    """A video ViT (tubelets 2x4x4 of 8 frames of 16x16) with a class token, or an image ViT."""

    def __init__(self, heads, layout, video):
        super().__init__()
        self.video = video
        self.embed = nn.Conv3d(3, D, (2, 4, 4), (2, 4, 4)) if video else nn.Conv2d(3, D, 4, 4)
        tokens = (4 if video else 1) * 16
        self.cls = nn.Parameter(torch.randn(1, 1, D))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, D) * 0.1)
        self.blocks = nn.ModuleList(Block(heads, layout) for _ in range(3))
        self.head = nn.Linear(D, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        for blk in self.blocks:
            t = blk(t)
        return self.head(t[:, 0])


def pair(heads, layout, video):
    torch.manual_seed(0)
    standard = VideoViT(heads, "split", video).eval()
    model = VideoViT(heads, layout, video).eval()
    model.load_state_dict(standard.state_dict())
    return model, standard


def clips():
    g = torch.Generator().manual_seed(1)
    still = torch.randn(1, 3, 1, 16, 16, generator=g).expand(-1, -1, 8, -1, -1)
    return torch.cat([still, torch.randn(1, 3, 8, 16, 16, generator=g)])


@pytest.mark.parametrize("heads,layout", [(4, "folded"), (1, "tokens")])
def test_tome_on_any_query_layout_equals_the_split_heads_model(heads, layout):
    model, standard = pair(heads, layout, video=False)
    x = torch.randn(2, 3, 16, 16)
    opt, want = (dittofx.optimize(m, ["tome:r=4"], (x,)) for m in (model, standard))
    with torch.no_grad():
        torch.testing.assert_close(opt(x), want(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,layout", [(4, "folded"), (1, "tokens")])
def test_rlt_padded_on_any_query_layout_equals_the_split_heads_model(heads, layout):
    model, standard = pair(heads, layout, video=True)
    x = clips()
    opt, want = (dittofx.optimize(m, ["rlt:tau=0.1,layout='padded'"], (x,)) for m in (model, standard))
    with torch.no_grad():
        torch.testing.assert_close(opt(x), want(x), rtol=1e-5, atol=1e-5)
    assert opt.report.stats["rlt"].kept == [16, 64]  # the still clip padded with copies of its last token


def test_heads_folded_head_major_is_refused_naming_the_layout():
    model, _ = pair(4, "heads_major", video=False)
    with pytest.raises(UnsupportedModelError, match="heads folded batch-major"):
        dittofx.optimize(model, ["tome:r=4"], (torch.randn(2, 3, 16, 16),))
    video, _ = pair(4, "heads_major", video=True)
    with pytest.raises(UnsupportedModelError, match="heads folded batch-major"):
        dittofx.optimize(video, ["rlt:tau=0.1,layout='padded'"], (clips(),))
