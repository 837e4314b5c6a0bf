"""Hand-written attention becomes one SDPA node, with the same outputs."""

import timm
import torch
from torch import nn

import dittofx
from dittofx.api import rewrite
from dittofx.passes.sdpa import CanonicalizeAttention

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def count_sdpa(opt):
    return sum(n.target is SDPA for n in opt.graph_module.graph.nodes)


class ManualAttention(nn.Module):
    """q @ k^T / sqrt(d) + additive mask, softmax, dropout(0), @ v: the textbook form."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.0)

    def forward(self, x, mask):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        logits = torch.matmul(q, k.transpose(-2, -1)) / (c // self.heads) ** 0.5 + mask
        attn = self.drop(logits.softmax(dim=-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)) + x


def test_manual_attention_with_mask_and_scale():
    model = ManualAttention().eval()
    x, mask = torch.randn(2, 10, 32), torch.randn(2, 1, 10, 10)
    opt = dittofx.optimize(model, [CanonicalizeAttention()], (x, mask))
    assert count_sdpa(opt) == 1
    assert not any(n.target is torch.ops.aten.softmax.int for n in opt.graph_module.graph.nodes)
    torch.testing.assert_close(opt(x, mask), model(x, mask), rtol=1e-5, atol=1e-5)


def test_timm_unfused_attention():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64).eval()
    for blk in model.blocks:
        blk.attn.fused_attn = False  # q * scale, q @ k^T, softmax, @ v
    x = torch.randn(2, 3, 64, 64)
    opt = dittofx.optimize(model, ["sdpa"], (x,))
    assert count_sdpa(opt) == 2
    torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)


def test_transformers_eager_attention():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    image_size=32, patch_size=8, num_labels=10, attn_implementation="eager")
    model = ViTForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    opt = dittofx.optimize(model, ["sdpa"], (x,))
    assert count_sdpa(opt) == 2
    torch.testing.assert_close(opt(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_not_attention_is_left_alone():
    class SoftmaxMLP(nn.Module):  # a softmax between matmuls, but not over q @ k^T
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return torch.softmax(x @ self.w, dim=-1) @ self.w

    model = SoftmaxMLP().eval()
    x = torch.randn(2, 5, 8)
    gm, _, report = rewrite(model, [CanonicalizeAttention()], (x,), {})
    assert not any(n.target is SDPA for n in gm.graph.nodes) and not report.notes
    torch.testing.assert_close(gm(x), model(x))
