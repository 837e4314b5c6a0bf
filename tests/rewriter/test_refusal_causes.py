"""The facts that tell why merging tokens cannot follow a model: pooling stages between blocks, attention
over windows, a relative-position bias indexed by token position (PiT, Swin, BEiT and hand-written ones)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dittofx
from dittofx.passes.sdpa import CanonicalizeAttention
from dittofx.rewriter.analysis import analyze
from dittofx.rewriter.capture import capture
from tests.rewriter.test_patch_forms import HEADS, Block, D, pair


def analysed(model, x):
    cap = capture(model.eval(), (x,))
    return analyze(cap.graph_module, cap.batched_inputs)


def facts(analysis):
    return [(s.windowed, s.position_bias) for s in analysis.sites], [str(p) for p in analysis.poolings]


def test_a_plain_vit_has_none():
    model, _, x = pair("conv2d")
    assert facts(analysed(model, x)) == ([(False, False)] * 3, [])


class WindowAttention(nn.Module):
    """Attention within 2x2 windows of a (B, H, W, D) grid, optionally plus a relative-position bias
    table read at each pair's offset (Swin's, without the shift)."""

    def __init__(self, bias: bool):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.table = nn.Parameter(torch.randn(9, HEADS)) if bias else None
        pos = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(2), indexing="ij")).flatten(1)
        offset = (pos[:, :, None] - pos[:, None, :] + 1).permute(1, 2, 0)
        self.register_buffer("index", offset[..., 0] * 3 + offset[..., 1], persistent=False)

    def forward(self, x):
        b, h, w, _ = x.shape
        win = x.reshape(b, h // 2, 2, w // 2, 2, D).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, D)
        q, k, v = self.qkv(win).reshape(-1, 4, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        mask = self.table[self.index.flatten()].reshape(4, 4, HEADS).permute(2, 0, 1) if self.table is not None \
            else None
        o = self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(-1, 4, D))
        return o.reshape(b, h // 2, w // 2, 2, 2, D).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, D)


class WindowBlock(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(D), WindowAttention(bias), nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BiasAttention(nn.Module):
    """Global attention plus a relative-position bias (BEiT's): a table indexed by each pair's offset."""

    def __init__(self, side: int):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.table = nn.Parameter(torch.randn((2 * side - 1) ** 2, HEADS))
        pos = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")).flatten(1)
        offset = (pos[:, :, None] - pos[:, None, :] + side - 1).permute(1, 2, 0)
        self.register_buffer("index", offset[..., 0] * (2 * side - 1) + offset[..., 1], persistent=False)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index.flatten()].reshape(n, n, HEADS).permute(2, 0, 1)
        return self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, n, D))


class MaskedAttention(nn.Module):
    """Global attention with a mask given with the input (a padding mask): no position bias."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        mask = (x.detach().mean(-1) > -10)[:, None, None, :].expand(b, 1, n, n)
        return self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, D))


class Net(nn.Module):
    """A 4x4 patch grid through `blocks`; `stage` between two of them may pool it to 2x2."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.embed = nn.Conv2d(3, D, 4, 4)
        if kind in ("windows", "windows_bias"):
            self.blocks = nn.ModuleList(WindowBlock(kind == "windows_bias") for _ in range(2))
        else:
            self.blocks = nn.ModuleList(Block() for _ in range(2))
            if kind in ("bias", "mask"):
                for blk in self.blocks:
                    blk.attn = BiasAttention(4) if kind == "bias" else MaskedAttention()
        self.pool = nn.Conv2d(D, D, 2, 2, groups=D)  # PiT's depthwise strided conv
        self.head = nn.Linear(D, 5)

    def forward(self, x):
        t = self.embed(x)  # (B, D, 4, 4)
        if self.kind.startswith("windows"):
            t = t.permute(0, 2, 3, 1)
            for blk in self.blocks:
                t = blk(t)
            return self.head(t.mean((1, 2)))
        t = t.flatten(2).transpose(1, 2)
        t = self.blocks[0](t)
        if self.kind in ("conv_pool", "avg_pool"):
            grid = t.transpose(1, 2).reshape(-1, D, 4, 4)
            grid = self.pool(grid) if self.kind == "conv_pool" else F.avg_pool2d(grid, 2)
            t = grid.flatten(2).transpose(1, 2)
        t = self.blocks[1](t)
        return self.head(t.mean(1))


@pytest.mark.parametrize("kind, expected", [
    ("plain", ([(False, False)] * 2, [])),
    ("conv_pool", ([(False, False)] * 2, ["16 -> 4 tokens at pool, between blocks.0 and blocks.1"])),
    ("avg_pool", ([(False, False)] * 2, ["16 -> 4 tokens at avg_pool2d, between blocks.0 and blocks.1"])),
    ("windows", ([(True, False)] * 2, [])),
    ("windows_bias", ([(True, True)] * 2, [])),
    ("bias", ([(False, True)] * 2, [])),
    ("mask", ([(False, False)] * 2, [])),
])
def test_hand_written_causes(kind, expected):
    assert facts(analysed(Net(kind), torch.randn(2, 3, 16, 16))) == expected


# ---------------------------------------------------------------------------------------------
# timm's models, small configs


def test_pit_pools_between_its_stages():
    timm = pytest.importorskip("timm")
    model = timm.create_model("pit_ti_224", pretrained=False, img_size=64, num_classes=10)
    windows_bias, pools = facts(analysed(model, torch.randn(2, 3, 64, 64)))
    assert set(windows_bias) == {(False, False)}
    assert pools == ["50 -> 17 tokens at transformers.1.pool.conv, between transformers.0.blocks.1 and "
                     "transformers.1.blocks.0",
                     "17 -> 5 tokens at transformers.2.pool.conv, between transformers.1.blocks.5 and "
                     "transformers.2.blocks.0"]


def test_swin_attends_over_windows_with_a_relative_position_bias_and_merges_patches():
    timm = pytest.importorskip("timm")
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=4,
                              depths=(2, 2), num_heads=(2, 4), embed_dim=32, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    # timm's Swin writes its attention out (softmax(q k^T + bias) v): as every pass sees it, one SDPA
    opt = dittofx.optimize(model, [CanonicalizeAttention()], (x,))
    analysis = analyze(opt.graph_module)
    windows_bias, pools = facts(analysis)
    assert windows_bias and set(windows_bias) == {(True, True)}
    assert [p.where for p in analysis.poolings] == ["layers.1.downsample.reduction"]
    assert analysis.poolings[0].tokens == (256, 64)


def test_beit_adds_a_relative_position_bias():
    timm = pytest.importorskip("timm")
    model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=64, depth=2, embed_dim=64,
                              num_heads=2, num_classes=10)
    assert facts(analysed(model, torch.randn(2, 3, 64, 64))) == ([(False, True)] * 2, [])


@pytest.mark.parametrize("arch,kwargs,cause", [
    ("pit_ti_224", {}, "the token count changes between blocks by pooling (50 -> 17 tokens"),
    ("swin_tiny_patch4_window7_224", dict(window_size=4, depths=(2, 2), num_heads=(2, 4), embed_dim=32),
     "the attention runs over windows of the patch grid"),
    ("beit_base_patch16_224", dict(depth=2, embed_dim=64, num_heads=2),
     "the attention adds a learned relative-position bias"),
])
def test_tome_refuses_naming_the_cause(arch, kwargs, cause):
    timm = pytest.importorskip("timm")
    model = timm.create_model(arch, pretrained=False, img_size=64, num_classes=10, **kwargs).eval()
    with pytest.raises(dittofx.errors.UnsupportedModelError) as e:
        dittofx.optimize(model, ["tome:r=2"], (torch.randn(2, 3, 64, 64),))
    assert cause in str(e.value) and "\n" not in str(e.value)
