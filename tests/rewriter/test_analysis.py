"""Every attention of the model matrix is found and classified from the graph."""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dittofx.models import zoo
from dittofx.rewriter.analysis import analyze
from dittofx.rewriter.capture import capture


class CountSDPA(TorchFunctionMode):
    """Counts the attention calls of an eager forward: the independent truth for 'every attention found'."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def analysed(name):
    zm = zoo.build(name)
    cap = capture(zm.model, zm.example_inputs, zm.example_kwargs)
    with CountSDPA() as counter, torch.no_grad():
        zm.model(*zm.example_inputs, **zm.example_kwargs)
    return zm, cap, analyze(cap.graph_module, cap.batched_inputs), counter.calls


# Mochi's attention loops over the samples in Python (each keeps its own valid text tokens): the
# graph fixes the batch
STATIC_BATCH = {"mochi"}
# attention pools, not transformer blocks (no residual stream, no MLP)
POOLS = {"mochi": {"time_embed.pooler"}}


def parallel_block(name: str) -> bool:
    """Flux's and HunyuanVideo's single-stream blocks compute attention and MLP side by side and add
    them to the stream once: there is no separate MLP residual."""
    return name.startswith("single_transformer_blocks.")


@pytest.mark.parametrize("name", zoo.NAMES)
def test_every_attention_found_with_its_block_and_residuals(name):
    zm, cap, analysis, calls = analysed(name)
    assert len(analysis.sites) == calls > 0
    assert cap.dynamic_batch or name in STATIC_BATCH
    for block in analysis.blocks:
        if all(s.module in POOLS.get(name, ()) for s in block.sites):
            assert block.kinds == ["other"]
            continue
        assert (block.mlp_residual is None) == parallel_block(block.name), block.name
        for site in block.sites:
            assert site.residual is not None, site.module
            assert site.module.startswith(block.name), (site.module, block.name)
            # the module output is what the model adds to the residual stream (after the out-projection)
            assert site.output.meta["val"].shape[-1] == site.residual.meta["val"].shape[-1]


@pytest.mark.parametrize("name", ["vit", "deit_distilled", "vit_reg"])
def test_timm_prefix_tokens(name):
    zm, _, analysis, _ = analysed(name)
    assert analysis.latent_input is None  # logits are shaped like no input
    grid = zm.model.patch_embed.num_patches
    for block in analysis.blocks:
        assert block.kinds == ["spatial"]
        assert block.prefix == zm.model.num_prefix_tokens
        assert block.tokens == grid + zm.model.num_prefix_tokens
        assert block.token_dim == 1
    assert [b.name for b in analysis.blocks] == [f"blocks.{i}" for i in range(len(zm.model.blocks))]


def test_deit_distillation_token_is_prefix():
    _, _, analysis, _ = analysed("deit_distilled")
    assert all(b.prefix == 2 for b in analysis.blocks)


def test_transformers_vit():
    zm, _, analysis, _ = analysed("hf_vit")
    cfg = zm.model.config
    assert [b.name for b in analysis.blocks] == [f"vit.layers.{i}" for i in range(cfg.num_hidden_layers)] or \
        len(analysis.blocks) == cfg.num_hidden_layers
    for b in analysis.blocks:
        assert b.kinds == ["spatial"] and b.prefix == 1
        assert b.tokens == (cfg.image_size // cfg.patch_size) ** 2 + 1


def test_videomae_attention_is_joint_space_time():
    zm, _, analysis, _ = analysed("videomae")
    cfg = zm.model.config
    tokens = (cfg.num_frames // cfg.tubelet_size) * (cfg.image_size // cfg.patch_size) ** 2
    assert len(analysis.blocks) == cfg.num_hidden_layers
    assert all(b.kinds == ["joint"] and b.tokens == tokens and b.prefix == 0 for b in analysis.blocks)
    assert analysis.patch_embeddings[0].target is torch.ops.aten.conv3d.default


def test_dit_spatial_self_attention_and_timestep():
    zm, _, analysis, _ = analysed("dit")
    assert len(analysis.blocks) == zm.model.config.num_layers
    assert all(b.kinds == ["spatial"] for b in analysis.blocks)
    assert analysis.timestep_input is not None and analysis.timestep_input.name == "timestep"


def test_pixart_self_then_cross():
    zm, _, analysis, _ = analysed("pixart")
    assert all(b.kinds == ["spatial", "cross"] for b in analysis.blocks)
    cross = [s for s in analysis.sites if s.kind == "cross"]
    assert all(s.kv_tokens == zm.example_kwargs["encoder_hidden_states"].shape[1] for s in cross)
    assert analysis.timestep_input.name == "timestep"


def test_latte_temporal_blocks_are_temporal_and_attn2_is_cross():
    zm, _, analysis, _ = analysed("latte")
    # the latent input: shaped like the output but for its channels (Latte predicts the variance too)
    out_channels = zm.model(*zm.example_inputs, **zm.example_kwargs).sample.shape[1]
    assert out_channels != zm.example_inputs[0].shape[1] and analysis.latent_input.name == "hidden_states"
    frames = zm.example_inputs[0].shape[2]
    by_name = {b.name: b for b in analysis.blocks}
    n = zm.model.config.num_layers
    for i in range(n):
        spatial, temporal = by_name[f"transformer_blocks.{i}"], by_name[f"temporal_transformer_blocks.{i}"]
        assert spatial.kinds == ["spatial", "cross"]
        assert [s.module for s in spatial.sites] == [f"transformer_blocks.{i}.attn1", f"transformer_blocks.{i}.attn2"]
        assert temporal.kinds == ["temporal"] and temporal.sites[0].tokens == frames


def test_cogvideox_attention_is_joint_text_video():
    zm, _, analysis, _ = analysed("cogvideox")
    text = zm.example_kwargs["encoder_hidden_states"].shape[1]
    assert all(b.kinds == ["joint"] for b in analysis.blocks)
    for s in analysis.sites:
        assert s.tokens == s.kv_tokens and s.tokens > text
    for b in analysis.blocks:  # the residual stream is the video one, not the text one
        assert b.tokens == b.sites[0].tokens - text and b.prefix == 0


def test_attention_written_inline_in_the_block():
    """No attention submodule: SDPA, projection and both residual adds all live in the block."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, dim=32, heads=4):
            super().__init__()
            self.heads, self.norm1, self.norm2 = heads, nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.fc1, self.fc2 = nn.Linear(dim, 64), nn.Linear(64, dim)

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
            x = x + self.proj(a)
            return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 32, 4, 4)
            self.blocks = nn.Sequential(Block(), Block())

        def forward(self, img):
            return self.blocks(self.embed(img).flatten(2).transpose(1, 2)).mean(1)

    cap = capture(Net().eval(), (torch.randn(2, 3, 16, 16),))
    analysis = analyze(cap.graph_module, cap.batched_inputs)
    assert [b.name for b in analysis.blocks] == ["blocks.0", "blocks.1"]
    for block in analysis.blocks:
        site = block.sites[0]
        assert site.kind == "spatial" and site.tokens == 16 and block.token_dim == 1
        assert site.output.target is torch.ops.aten.linear.default  # the projection, not the block output
        assert site.residual is not None and block.mlp_residual is not None and site.residual is not block.mlp_residual
