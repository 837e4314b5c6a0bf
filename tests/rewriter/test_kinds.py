"""Attention kinds where the tokens are not made by a convolution: a Linear over patchified or packed
latents, joint text + image streams, text-only attention; the latent input and the timestep scale.

The small models here are written for the test (dittofx never saw them); the families are the zoo's
diffusers builds, whose expected kinds come from their architectures."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dittofx.models import zoo
from dittofx.rewriter.analysis import analyze, patch_grid
from dittofx.rewriter.capture import capture

D, HEADS, TEXT = 32, 2, 5


class Attention(nn.Module):
    def __init__(self, kv_dim: int = D):
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(D, D), nn.Linear(kv_dim, D), nn.Linear(kv_dim, D), nn.Linear(D, D)

    def forward(self, x, context=None):
        context = x if context is None else context

        def heads(t):
            return t.unflatten(-1, (HEADS, -1)).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(context)), heads(self.v(context)))
        return self.out(o.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Self-attention (attn1), optionally cross-attention to the text (attn2), feed-forward."""

    def __init__(self, cross: bool = False):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn1 = Attention()
        self.attn2 = Attention() if cross else None
        self.ff = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x, text=None):
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), text)
        return x + self.ff(self.norm3(x))


def sinusoidal(t: torch.Tensor, dim: int = D) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class PackedNet(nn.Module):
    """A DiT over latents the pipeline packed into (B, N, C) tokens (LTX-Video-like): frames and rows
    are one token axis. `t_factor` multiplies the timestep before its embedding (Flux: 1000)."""

    def __init__(self, channels=8, t_factor=None):
        super().__init__()
        self.t_factor = t_factor
        self.embed, self.text_embed, self.t_embed = nn.Linear(channels, D), nn.Linear(12, D), nn.Linear(D, D)
        self.blocks = nn.ModuleList([Block(cross=True), Block(cross=True)])
        self.proj_out = nn.Linear(D, channels)

    def forward(self, latent, timestep, text):
        t = timestep.to(latent.dtype)
        if self.t_factor is not None:
            t = t * self.t_factor
        x = self.embed(latent) + self.t_embed(sinusoidal(t))[:, None]
        text = self.text_embed(text)
        for block in self.blocks:
            x = block(x, text)
        return self.proj_out(x)


class JointPackedNet(nn.Module):
    """Flux-like: the text is refined by a text-only self-attention, then one stream runs over
    cat(text, packed image tokens); the model returns the image tokens."""

    def __init__(self, channels=16):
        super().__init__()
        self.embed, self.text_embed, self.t_embed = nn.Linear(channels, D), nn.Linear(12, D), nn.Linear(D, D)
        self.refiner = Block()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.proj_out = nn.Linear(D, channels)

    def forward(self, latent, timestep, prompt):
        text = self.refiner(self.text_embed(prompt))
        x = torch.cat([text, self.embed(latent)], dim=1) + self.t_embed(sinusoidal(timestep / 1000))[:, None]
        for block in self.blocks:
            x = block(x)
        return self.proj_out(x[:, prompt.shape[1]:])


class PatchifiedVideoNet(nn.Module):
    """CogVideoX-1.5-like: (B, F, C, H, W) cut into tubelets of (pt, p, p) by reshape / permute /
    flatten, then a Linear; a 3D attention, a per-frame spatial one and a per-location temporal one;
    the output unpatchified back to the input's shape."""

    def __init__(self, channels=4, pt=2, p=2):
        super().__init__()
        self.pt, self.p = pt, p
        self.embed = nn.Linear(channels * pt * p * p, D)
        self.t_embed = nn.Linear(D, D)
        self.full, self.spatial, self.temporal = Block(), Block(), Block()
        self.proj_out = nn.Linear(D, channels * pt * p * p)

    def forward(self, video, timestep):
        b, f, c, h, w = video.shape
        pt, p = self.pt, self.p
        ft, ht, wt = f // pt, h // p, w // p
        x = video.permute(0, 1, 3, 4, 2).reshape(b, ft, pt, ht, p, wt, p, c)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6).flatten(4).flatten(1, 3)  # (B, F'H'W', C pt p p)
        x = self.embed(x) + self.t_embed(sinusoidal(timestep))[:, None]
        x = self.full(x)
        x = self.spatial(x.reshape(b * ft, ht * wt, D)).reshape(b, ft * ht * wt, D)
        x = x.reshape(b, ft, ht * wt, D).transpose(1, 2).reshape(b * ht * wt, ft, D)
        x = self.temporal(x).reshape(b, ht * wt, ft, D).transpose(1, 2).reshape(b, ft * ht * wt, D)
        x = self.proj_out(x).reshape(b, ft, ht, wt, c, pt, p, p).permute(0, 1, 5, 4, 2, 6, 3, 7)
        return x.reshape(b, f, c, h, w)


def analysed(model, *inputs):
    cap = capture(model.eval(), inputs)
    return analyze(cap.graph_module, cap.batched_inputs)


def sites_by_module(analysis):
    return {s.module: s for s in analysis.sites}


def test_linear_over_packed_latents_is_spatial_with_a_note():
    analysis = analysed(PackedNet(), torch.randn(2, 48, 8), torch.tensor([500, 300]), torch.randn(2, TEXT, 12))
    assert analysis.latent_input.name == "latent"
    sites = sites_by_module(analysis)
    for i in range(2):
        attn1, attn2 = sites[f"blocks.{i}.attn1"], sites[f"blocks.{i}.attn2"]
        assert (attn1.kind, attn2.kind) == ("spatial", "cross")
        assert attn1.tokens == 48 and attn2.kv_tokens == TEXT
        assert "packed latent input latent" in attn1.kind_note and "spatial range" in attn1.kind_note
        assert attn2.kind_note is None
        assert patch_grid(attn1) is None  # rows and columns are unknown: no grid to merge on
    assert analysis.timestep_scale == 1.0


def test_joint_stream_over_text_and_packed_tokens_and_text_only_attention():
    analysis = analysed(JointPackedNet(), torch.randn(2, 64, 16), torch.tensor([500.0, 300.0]),
                        torch.randn(2, TEXT, 12))
    sites = sites_by_module(analysis)
    for i in range(2):
        site = sites[f"blocks.{i}.attn1"]
        assert site.kind == "joint" and site.tokens == TEXT + 64
        assert site.seq_axis.prefix == TEXT  # the text tokens lead
        assert "prompt" in site.kind_note and "packed latent input latent" in site.kind_note
    refiner = sites["refiner.attn1"]
    assert refiner.kind == "other" and refiner.tokens == TEXT  # text tokens only: never a spatial range
    assert "prompt" in refiner.kind_note
    assert analysis.timestep_scale == pytest.approx(1e-3)  # fed t, embeds t / 1000


@pytest.mark.parametrize("factor", [1000, 0.5])
def test_timestep_scale_is_the_constant_before_the_embedding(factor):
    analysis = analysed(PackedNet(t_factor=factor), torch.randn(2, 48, 8), torch.tensor([0.5, 0.3]),
                        torch.randn(2, TEXT, 12))
    assert analysis.timestep_input.name == "timestep"
    assert analysis.timestep_scale == pytest.approx(factor)


@pytest.mark.parametrize("pt", [2, 1])
def test_linear_over_patchified_video_gives_frames_rows_and_columns(pt):
    frames, size, p = 4, 8, 2
    analysis = analysed(PatchifiedVideoNet(pt=pt, p=p), torch.randn(2, frames, 4, size, size), torch.tensor([5, 7]))
    sites = sites_by_module(analysis)
    grid = (size // p, size // p)
    full, spatial, temporal = sites["full.attn1"], sites["spatial.attn1"], sites["temporal.attn1"]
    assert (full.kind, spatial.kind, temporal.kind) == ("joint", "spatial", "temporal")
    assert full.tokens == frames // pt * grid[0] * grid[1] and temporal.tokens == frames // pt
    assert patch_grid(spatial) == grid
    sizes = {lab.kind: lab.size for lab in full.seq_axis.labels if lab.kind != "batch"}
    assert (sizes["grid_h"], sizes["grid_w"]) == grid
    # a temporal patch: the frames are a grid axis too; without one they stay the latent's frame axis
    assert sizes.get("grid_t") == (frames // pt if pt > 1 else None)
    assert all(s.kind_note is None for s in analysis.sites)
    assert analysis.latent_input.name == "video"


class ProjectionlessAttention(Attention):
    def forward(self, x, context=None):
        def heads(t):
            return t.unflatten(-1, (HEADS, -1)).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
        return o.transpose(1, 2).flatten(2)


class ParallelBlock(nn.Module):
    """Flux's single-stream block: an attention without output projection beside an MLP, both
    projected by one Linear and added to the stream once."""

    def __init__(self):
        super().__init__()
        self.norm, self.attn, self.mlp = nn.LayerNorm(D), ProjectionlessAttention(), nn.Linear(D, 2 * D)
        self.proj_out = nn.Linear(3 * D, D)

    def forward(self, x):
        h = self.norm(x)
        return x + self.proj_out(torch.cat([self.attn(h), F.gelu(self.mlp(h))], dim=-1))


def test_attention_without_output_projection_is_its_own_module():
    net = PackedNet()
    net.blocks = nn.ModuleList([ParallelBlock(), ParallelBlock()])
    net.forward = lambda latent, timestep: net.proj_out(
        net.blocks[1](net.blocks[0](net.embed(latent) + net.t_embed(sinusoidal(timestep))[:, None])))
    analysis = analysed(net, torch.randn(2, 48, 8), torch.tensor([500, 300]))
    assert [(s.module, s.kind) for s in analysis.sites] == [("blocks.0.attn", "spatial"), ("blocks.1.attn", "spatial")]
    for block, site in zip(analysis.blocks, analysis.sites):
        assert block.name == site.module.rsplit(".", 1)[0] and block.mlp_residual is None
        assert site.output.target is not torch.ops.aten.linear.default  # the attention's, before the joint projection


def test_text_through_a_linear_is_not_latent_tokens():
    """Only the latent's values make packed tokens: a text input through its Linear stays text."""
    analysis = analysed(PackedNet(), torch.randn(2, 48, 8), torch.tensor([500, 300]), torch.randn(2, 48, 12))
    assert analysis.latent_input.name == "latent"  # same token count, but only the latent is shaped like the output
    kinds = {s.module: s.kind for s in analysis.sites}
    assert kinds["blocks.0.attn1"] == "spatial" and kinds["blocks.0.attn2"] == "cross"


# ---------------------------------------------------------------------------------------------
# the diffusers families (zoo builds)


@functools.cache
def zoo_analysis(name):
    zm = zoo.build(name)
    cap = capture(zm.model, zm.example_inputs, zm.example_kwargs)
    return zm, analyze(cap.graph_module, cap.batched_inputs)


def kinds_of(analysis) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for s in analysis.sites:
        found.setdefault(s.module, set()).add(s.kind)
    return found


def per_layer(pattern: dict[str, str], layers: int) -> dict[str, set[str]]:
    return {m.format(i): {k} for i in range(layers) for m, k in pattern.items()}


EXPECTED = {
    "wan": lambda c: per_layer({"blocks.{}.attn1": "joint", "blocks.{}.attn2": "cross"}, c.num_layers),
    "hunyuanvideo": lambda c: {
        **per_layer({"context_embedder.token_refiner.refiner_blocks.{}.attn": "other"}, c.num_refiner_layers),
        **per_layer({"transformer_blocks.{}.attn": "joint"}, c.num_layers),
        **per_layer({"single_transformer_blocks.{}.attn": "joint"}, c.num_single_layers)},
    # the attention pool of the time embedding reads the text only; the blocks' attention runs once per
    # sample over [video, that sample's valid text]
    "mochi": lambda c: {"time_embed.pooler": {"other"}, **per_layer({"transformer_blocks.{}.attn1": "joint"},
                                                                   c.num_layers)},
    "ltx_video": lambda c: per_layer({"transformer_blocks.{}.attn1": "spatial", "transformer_blocks.{}.attn2": "cross"},
                                     c.num_layers),
    "cogvideox": lambda c: per_layer({"transformer_blocks.{}.attn1": "joint"}, c.num_layers),
    "cogvideox5b": lambda c: per_layer({"transformer_blocks.{}.attn1": "joint"}, c.num_layers),
    "cogvideox15": lambda c: per_layer({"transformer_blocks.{}.attn1": "joint"}, c.num_layers),
    "allegro": lambda c: per_layer({"transformer_blocks.{}.attn1": "joint", "transformer_blocks.{}.attn2": "cross"},
                                   c.num_layers),
    "flux": lambda c: {**per_layer({"transformer_blocks.{}.attn": "joint"}, c.num_layers),
                       **per_layer({"single_transformer_blocks.{}.attn": "joint"}, c.num_single_layers)},
    "sd3": lambda c: per_layer({"transformer_blocks.{}.attn": "joint"}, c.num_layers),
    "easyanimate": lambda c: per_layer({"transformer_blocks.{}.attn1": "joint"}, c.num_layers),
}
SLOW = {"wan", "mochi", "hunyuanvideo", "allegro", "easyanimate", "cogvideox5b"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in EXPECTED])
def test_family_kinds(name):
    zm, analysis = zoo_analysis(name)
    assert kinds_of(analysis) == EXPECTED[name](zm.model.config)
    assert analysis.latent_input is not None and analysis.latent_input.name == "hidden_states"
    for s in analysis.sites:
        if s.kind in ("spatial", "joint") and name in ("ltx_video", "flux"):  # packed by the pipeline
            assert s.kind_note and "packed latent input hidden_states" in s.kind_note
        elif s.kind != "other":
            assert s.kind_note is None, (s.module, s.kind_note)


@pytest.mark.parametrize("name", ["flux", "sd3", "ltx_video", "cogvideox"])
def test_timestep_scale_of_families(name):
    # Flux's pipeline feeds t / 1000 and the model multiplies it by 1000; the others embed t as fed
    _, analysis = zoo_analysis(name)
    assert analysis.timestep_input.name == "timestep"
    assert analysis.timestep_scale == (1000.0 if name == "flux" else 1.0)


def test_cogvideox15_tubelet_grid_from_the_linear_patchify():
    zm, analysis = zoo_analysis("cogvideox15")
    cfg, latent = zm.model.config, zm.example_inputs[0]
    frames, height, width = latent.shape[1], latent.shape[3], latent.shape[4]
    grid = {"grid_t": frames // cfg.patch_size_t, "grid_h": height // cfg.patch_size, "grid_w": width // cfg.patch_size}
    text = zm.example_kwargs["encoder_hidden_states"].shape[1]
    for site in analysis.sites:
        assert {lab.kind: lab.size for lab in site.seq_axis.labels if lab.is_grid} == grid
        assert site.seq_axis.prefix == text and site.tokens == text + math.prod(grid.values())


def test_flux_dual_block_residual_is_the_image_stream():
    """The dual-stream attention ends in two projections (text, image): the site's output and residual
    are the image stream's, the one that carries the latent's tokens."""
    zm, analysis = zoo_analysis("flux")
    tokens = zm.example_inputs[0].shape[1]
    block = next(b for b in analysis.blocks if b.name == "transformer_blocks.0")
    assert block.tokens == tokens and block.prefix == 0
    assert block.sites[0].output.meta["val"].shape[1] == tokens
