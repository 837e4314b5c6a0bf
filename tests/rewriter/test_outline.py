"""Outlining respects in-place writes: writes into memory a region reads move with it, and a write that
cannot move makes outlining refuse. The model here is none of the zoo's: a small DiT-like module whose
rotary embedding is written into slices of an empty_like, as Wan and CogVideoX 5B do."""

import math

import pytest
import torch
from torch import nn

import dittofx
from dittofx.rewriter.alias import Storage
from dittofx.rewriter.outline import OutlineError, exclusive_cone, outline

aten = torch.ops.aten


def rotate_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding over pairs of channels, written into a fresh tensor slice by slice."""
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, cos, sin):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rotate_in_place(q, cos, sin), rotate_in_place(k, cos, sin)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ada = nn.Linear(dim, dim)

    def forward(self, x, t, cos, sin):
        x = x + self.attn(self.norm1(x) * (1 + self.ada(t)[:, None]), cos, sin)
        return x + self.mlp(self.norm2(x))


class RotaryDiT(nn.Module):
    """Patchify (conv) -> blocks with rotary self-attention -> unpatchify; timestep via sin/cos."""

    def __init__(self, dim: int = 32, heads: int = 2, depth: int = 2, grid: int = 8):
        super().__init__()
        self.patch = nn.Conv2d(4, dim, 2, 2)
        self.time = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, 4 * 4)
        angles = torch.arange(grid * grid)[:, None] / 10 ** (torch.arange((dim // heads) // 2) / 4)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x, timestep):
        b, _, h, w = x.shape
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        half = tokens.shape[-1] // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
        args = timestep[:, None].float() * freqs[None]
        t = self.time(torch.cat([args.cos(), args.sin()], -1))
        for block in self.blocks:
            tokens = block(tokens, t, self.cos, self.sin)
        out = self.head(tokens).reshape(b, h // 2, w // 2, 4, 2, 2)
        return out.permute(0, 3, 1, 4, 2, 5).reshape(b, 4, h, w)


@pytest.fixture(scope="module")
def rotary():
    torch.manual_seed(0)
    return RotaryDiT().eval(), torch.randn(2, 4, 16, 16), torch.tensor([500, 500])


def test_pab_without_broadcast_equals_the_model_on_in_place_rotary(rotary):
    model, x, t = rotary
    opt = dittofx.optimize(model, ["pab:spatial=1"], (x, t))
    assert "not wrapped" not in str(opt.report)
    with torch.no_grad():
        expected = model(x, t)
        for _ in range(3):  # every call computes: equal, and equal from call to call
            assert torch.equal(opt(x, t), expected)
    child = opt.graph_module.pab.sites[0].attention
    assert any(n.target is aten.copy_.default for n in child.graph.nodes)  # the writes moved with it


def _exported(fn):
    class M(nn.Module):
        def forward(self, x):
            return fn(x)

    return torch.export.export(M(), (torch.randn(4, 4),)).module()


def _node(gm, target):
    return next(n for n in gm.graph.nodes if n.target is target)


def test_a_write_between_the_regions_reads_makes_outlining_refuse():
    def fn(x):
        y = x * 2
        a = y.sin()
        y.add_(1)  # the region reads y before (sin) and after (cos) this write, which stays outside
        b = y.cos()
        return a + b

    gm = _exported(fn)
    region = {_node(gm, aten.sin.default), _node(gm, aten.cos.default)}
    with pytest.raises(OutlineError, match="writes in place"):
        outline(gm, region, "part", lambda child: child)


def test_writes_into_what_the_cone_reads_join_it():
    def fn(x):
        out = torch.empty_like(x)
        out[:, :2] = x[:, :2].sin()
        out[:, 2:] = x[:, 2:].cos()
        return out.exp()

    gm = _exported(fn)
    exp = _node(gm, aten.exp.default)
    region = exclusive_cone([exp])
    writes = [n for n in gm.graph.nodes if n.target is aten.copy_.default]
    assert len(writes) == 2 and set(writes) <= region
    x = torch.randn(4, 4)
    expected = fn(x)
    outline(gm, region, "part", lambda child: child)
    gm.recompile()
    assert torch.equal(gm(x), expected)


def test_storage_follows_views_and_writes():
    def fn(x):
        y = x.clone()
        v = y[:, 1:].transpose(0, 1)
        v.mul_(3)
        return y

    gm = _exported(fn)
    storage = Storage(gm.graph)
    clone, mul = _node(gm, aten.clone.default), _node(gm, aten.mul_.Tensor)
    assert storage.writes(mul) == {storage.root(clone)}
    assert storage.root(_node(gm, aten.transpose.int)) is storage.root(clone)
