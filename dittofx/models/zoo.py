"""A zoo of small random-config models, built in code (no hub): for tests, examples, benchmarks and
the CLI spec `zoo:NAME`.

    from dittofx.models import zoo
    z = zoo.build("vit", batch=2)
    z.model(*z.example_inputs, **z.example_kwargs)

Each model keeps the architecture of a real one (class / distillation / register tokens, cross
attention, spatial + temporal blocks, joint text-video attention, dual- then single-stream blocks,
rotary embeddings, packed latents, temporal patches) at a size whose forward takes a few
milliseconds on a CPU (10-25 ms for the video diffusion models). Weights are random but
deterministic (`seed`), and every parameter that the libraries initialise to zero or to almost
zero (biases, diffusers' output projections, timm's class and register tokens) is given small random
values, so the output depends on every layer: a test comparing outputs then sees a bug anywhere in
the model.

| name             | family       | main input (B = batch) | tokens per attention                       |
|------------------|--------------|------------------------|--------------------------------------------|
| `vit`            | timm         | (B, 3, 64, 64)         | 65 = 1 class + 8x8 patches of 8            |
| `deit_distilled` | timm         | (B, 3, 64, 64)         | 66 = class + distillation + 64             |
| `vit_reg`        | timm         | (B, 3, 64, 64)         | 69 = class + 4 registers + 64              |
| `hf_vit`         | transformers | (B, 3, 64, 64)         | 65 = 1 class + 64                          |
| `videomae`       | transformers | (B, 8, 3, 32, 32)      | 64 = 4 tubelets of 2 frames x 4x4 patches  |
| `dit`            | diffusers    | (B, 4, 16, 16)         | 64 = 8x8 patches of 2                      |
| `pixart`         | diffusers    | (B, 4, 16, 16)         | 64 self, 64 x 6 text tokens cross          |
| `latte`          | diffusers    | (B, 4, 4, 16, 16)      | 64 spatial per frame, 4 temporal, 6 text   |
| `cogvideox`      | diffusers    | (B, 3, 4, 16, 16)      | 198 = 6 text + 3 frames x 64 (joint)       |
| `cogvideox5b`    | diffusers    | (B, 3, 4, 16, 16)      | 198 as `cogvideox`, 3D rotary (5B)         |
| `cogvideox15`    | diffusers    | (B, 4, 4, 16, 16)      | 134 = 6 text + 2 tubelets of 2 frames x 64 |
| `wan`            | diffusers    | (B, 4, 3, 16, 16)      | 192 = 3 frames x 64 self (rotary), 6 cross |
| `hunyuanvideo`   | diffusers    | (B, 4, 3, 16, 16)      | 198 = 192 video + 6 text (joint, text last)|
| `mochi`          | diffusers    | (B, 4, 3, 16, 16)      | 192 video + the valid of 6 text (joint)    |
| `ltx_video`      | diffusers    | (B, 192, 8) packed     | 192 = 3 frames x 8x8 self, 6 cross         |
| `allegro`        | diffusers    | (B, 4, 3, 16, 16)      | 192 = 3 frames x 64 self (rotary), 6 cross |
| `flux`           | diffusers    | (B, 64, 16) packed     | 70 = 6 text + 8x8 image (joint)            |
| `sd3`            | diffusers    | (B, 4, 16, 16)         | 70 = 64 image + 6 text (joint, text last)  |
| `easyanimate`    | diffusers    | (B, 4, 3, 16, 16)      | 198 = 6 text + 3 frames x 64 (joint)       |

The diffusion models take what their diffusers pipeline passes: text masks with padding (Mochi,
HunyuanVideo, LTX-Video, Allegro), pooled projections, HunyuanVideo's guidance (scale x 1000),
LTX-Video's num_frames / height / width / rope_interpolation_scale, Flux's img_ids / txt_ids and
timestep / 1000, CogVideoX's and Allegro's rotary tables as their pipelines build them
(`example_inputs.cogvideox_rotary_emb`, `allegro_rotary_emb`). Flow-matching models get float
timesteps, as their schedulers give.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dittofx.errors import ModelSpecError
from dittofx.models.example_inputs import allegro_rotary_emb, cogvideox_rotary_emb

NAMES = ("vit", "deit_distilled", "vit_reg", "hf_vit", "videomae", "dit", "pixart", "latte", "cogvideox",
         "cogvideox5b", "cogvideox15", "wan", "hunyuanvideo", "mochi", "ltx_video", "allegro", "flux", "sd3",
         "easyanimate")

FAMILIES = ("timm", "transformers", "diffusers")


@dataclass
class ZooModel:
    """A built zoo model: `model(*example_inputs, **example_kwargs)` runs it.

    `info` describes the token layout (`tokens`: sequence length of the main self-attention,
    `prefix_tokens`: class/distillation/register tokens at its start, plus `frames`,
    `text_tokens`, `grid` where they apply), for tests that need to know what to expect.
    """

    model: nn.Module
    example_inputs: tuple
    example_kwargs: dict
    family: str
    name: str = ""
    info: dict = field(default_factory=dict)


def build(name: str, batch: int = 2, seed: int = 0) -> ZooModel:
    """Build zoo model `name` in eval mode with example inputs of batch size `batch`.

    The same (name, seed) gives the same weights; the same (name, batch, seed) the same inputs.
    """
    if name not in _BUILDERS:
        raise ModelSpecError(f"unknown zoo model {name!r}; accepted: {', '.join(NAMES)}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ModelSpecError(f"zoo batch must be a positive integer, got {batch!r}")
    torch.manual_seed(seed)
    model, family, info = _BUILDERS[name]()
    _randomise_degenerate(model, seed)
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    args, kwargs = _INPUTS[name](batch, gen, getattr(model, "config", None))
    return ZooModel(model=model, example_inputs=args, example_kwargs=kwargs, family=family, name=name, info=info)


# ---------------------------------------------------------------------------------------------
# weight initialisation


def _randomise_degenerate(model: nn.Module, seed: int) -> None:
    """Give every parameter that is all (almost) zero small random values.

    Libraries zero-initialise biases, output projections and adaLN modulations, and timm starts
    class/register tokens at std 1e-6; such a parameter makes its layer invisible in the output.
    """
    gen = torch.Generator().manual_seed(seed + 12345)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and p.is_floating_point() and p.detach().abs().max() < 1e-4:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.02)


# ---------------------------------------------------------------------------------------------
# models


def _timm(arch: str, **kwargs) -> nn.Module:
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=10, **kwargs)


def _vit():
    m = _timm("vit_tiny_patch16_224", depth=4, img_size=64, patch_size=8)
    return m, "timm", {"tokens": 65, "prefix_tokens": 1, "grid": (8, 8)}


def _deit_distilled():
    m = _timm("deit_tiny_distilled_patch16_224", depth=4, img_size=64, patch_size=8)
    return m, "timm", {"tokens": 66, "prefix_tokens": 2, "grid": (8, 8)}


def _vit_reg():
    # DINOv2 with registers: no position embedding on the prefix tokens, LayerScale in each block
    # (init_values raised from 1e-5 so that the blocks matter), 1 class + 4 register tokens.
    m = _timm(
        "vit_small_patch14_reg4_dinov2", depth=4, img_size=64, patch_size=8, embed_dim=192, num_heads=3, init_values=0.5
    )
    return m, "timm", {"tokens": 69, "prefix_tokens": 5, "grid": (8, 8)}


def _hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=64,
        patch_size=8,
        num_channels=3,
        num_labels=10,
    )
    return ViTForImageClassification(cfg), "transformers", {"tokens": 65, "prefix_tokens": 1, "grid": (8, 8)}


def _videomae():
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    cfg = VideoMAEConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_channels=3,
        num_frames=8,
        tubelet_size=2,
        num_labels=10,
    )
    info = {"tokens": 64, "prefix_tokens": 0, "frames": 8, "tubelets": 4, "grid": (4, 4)}
    return VideoMAEForVideoClassification(cfg), "transformers", info


def _dit():
    from diffusers import DiTTransformer2DModel

    m = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        num_layers=2,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    return m, "diffusers", {"tokens": 64, "prefix_tokens": 0, "grid": (8, 8)}


def _pixart():
    from diffusers import PixArtTransformer2DModel

    m = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=16,
        patch_size=2,
        cross_attention_dim=32,
        caption_channels=24,
        use_additional_conditions=False,
    )
    return m, "diffusers", {"tokens": 64, "prefix_tokens": 0, "text_tokens": _TEXT_TOKENS, "grid": (8, 8)}


def _latte():
    from diffusers import LatteTransformer3DModel

    m = LatteTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=16,
        patch_size=2,
        cross_attention_dim=32,
        caption_channels=24,
        video_length=4,
    )
    info = {"tokens": 64, "prefix_tokens": 0, "frames": 4, "text_tokens": _TEXT_TOKENS, "grid": (8, 8)}
    return m, "diffusers", info


def _cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    m = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        sample_width=16,
        sample_height=16,
        sample_frames=9,  # pixel frames; latent frames = (9 - 1) // 4 + 1 = 3
        patch_size=2,
        text_embed_dim=24,
        time_embed_dim=16,
        max_text_seq_length=_TEXT_TOKENS,
    )
    # joint attention over [text tokens, video tokens]
    info = {"tokens": _TEXT_TOKENS + 3 * 64, "prefix_tokens": _TEXT_TOKENS, "frames": 3, "text_tokens": _TEXT_TOKENS}
    info["grid"] = (8, 8)
    return m, "diffusers", info


def _cogvideox_rotary(patch_size_t):
    # CogVideoX 5B (rotary embeddings, no learned positions) and 1.5 (tubelets of 2 latent frames,
    # no patch bias), at the same size as `cogvideox`
    from diffusers import CogVideoXTransformer3DModel

    m = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        sample_width=16,
        sample_height=16,
        sample_frames=9 if patch_size_t is None else 13,
        patch_size=2,
        patch_size_t=patch_size_t,
        patch_bias=patch_size_t is None,
        text_embed_dim=24,
        time_embed_dim=16,
        max_text_seq_length=_TEXT_TOKENS,
        use_rotary_positional_embeddings=True,
    )
    if patch_size_t is None:
        info = {"tokens": _TEXT_TOKENS + 3 * 64, "prefix_tokens": _TEXT_TOKENS, "frames": 3}
    else:
        info = {"tokens": _TEXT_TOKENS + 2 * 64, "prefix_tokens": _TEXT_TOKENS, "frames": 4, "tubelets": 2}
    info.update(text_tokens=_TEXT_TOKENS, grid=(8, 8))
    return m, "diffusers", info


def _wan():
    from diffusers import WanTransformer3DModel

    m = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=24,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        rope_max_seq_len=32,
    )
    return m, "diffusers", {"tokens": 192, "prefix_tokens": 0, "frames": 3, "text_tokens": _TEXT_TOKENS, "grid": (8, 8)}


def _hunyuanvideo():
    # dual-stream blocks, then single-stream blocks over [video, text]; a token refiner on the text
    from diffusers import HunyuanVideoTransformer3DModel

    m = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=24,
        pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6),
    )
    return m, "diffusers", {"tokens": 192 + _TEXT_TOKENS, "prefix_tokens": 0, "frames": 3,
                            "text_tokens": _TEXT_TOKENS, "grid": (8, 8)}


def _mochi():
    # joint attention over [video, text], each sample keeping only its valid text tokens (sizes that
    # depend on the mask's values)
    from diffusers import MochiTransformer3DModel

    m = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=4,
        text_embed_dim=24,
        time_embed_dim=16,
        max_sequence_length=_TEXT_TOKENS,
    )
    return m, "diffusers", {"tokens": 192 + _TEXT_TOKENS, "prefix_tokens": 0, "frames": 3,
                            "text_tokens": _TEXT_TOKENS, "grid": (8, 8)}


def _ltx_video():
    # tokens from a Linear over latents the pipeline packed (the VAE patchifies: patch size 1)
    from diffusers import LTXVideoTransformer3DModel

    m = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=24,
    )
    return m, "diffusers", {"tokens": 192, "prefix_tokens": 0, "frames": 3, "text_tokens": _TEXT_TOKENS, "grid": (8, 8)}


def _allegro():
    from diffusers import AllegroTransformer3DModel

    m = AllegroTransformer3DModel(
        patch_size=2,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=24,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        cross_attention_dim=48,
        sample_height=16,
        sample_width=16,
        sample_frames=3,
        caption_channels=24,
    )
    return m, "diffusers", {"tokens": 192, "prefix_tokens": 0, "frames": 3, "text_tokens": _TEXT_TOKENS, "grid": (8, 8)}


def _flux():
    # FLUX.1-schnell style (no guidance embedding): dual-stream then single-stream blocks over
    # [text, image], rotary tables from position ids, 2x2-packed latents
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=8,
        axes_dims_rope=(4, 6, 6),
    )
    return m, "diffusers", {"tokens": _TEXT_TOKENS + 64, "prefix_tokens": _TEXT_TOKENS, "text_tokens": _TEXT_TOKENS,
                            "grid": (8, 8)}


def _sd3():
    from diffusers import SD3Transformer2DModel

    m = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        caption_projection_dim=32,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=16,
    )
    info = {"tokens": 64 + _TEXT_TOKENS, "prefix_tokens": 0, "text_tokens": _TEXT_TOKENS, "grid": (8, 8)}
    return m, "diffusers", info


def _easyanimate():
    from diffusers import EasyAnimateTransformer3DModel

    m = EasyAnimateTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        patch_size=2,
        sample_width=16,
        sample_height=16,
        num_layers=2,
        mmdit_layers=2,
        time_embed_dim=16,
        text_embed_dim=24,
    )
    return m, "diffusers", {"tokens": _TEXT_TOKENS + 3 * 64, "prefix_tokens": _TEXT_TOKENS, "frames": 3,
                            "text_tokens": _TEXT_TOKENS, "grid": (8, 8)}


_TEXT_TOKENS = 6

_BUILDERS: dict[str, Callable[[], tuple[nn.Module, str, dict]]] = {
    "vit": _vit,
    "deit_distilled": _deit_distilled,
    "vit_reg": _vit_reg,
    "hf_vit": _hf_vit,
    "videomae": _videomae,
    "dit": _dit,
    "pixart": _pixart,
    "latte": _latte,
    "cogvideox": _cogvideox,
    "cogvideox5b": lambda: _cogvideox_rotary(None),
    "cogvideox15": lambda: _cogvideox_rotary(2),
    "wan": _wan,
    "hunyuanvideo": _hunyuanvideo,
    "mochi": _mochi,
    "ltx_video": _ltx_video,
    "allegro": _allegro,
    "flux": _flux,
    "sd3": _sd3,
    "easyanimate": _easyanimate,
}
assert tuple(_BUILDERS) == NAMES


# ---------------------------------------------------------------------------------------------
# example inputs


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen)


def _timesteps(gen: torch.Generator, batch: int) -> torch.Tensor:
    # distinct timesteps per sample, inside diffusers' default PAB window (100, 800)
    return torch.randint(100, 800, (batch,), generator=gen, dtype=torch.long)


def _image(size: int):
    return lambda b, g, cfg: ((_randn(g, b, 3, size, size),), {})


def _video_mae(b, g, cfg):
    return (_randn(g, b, 8, 3, 32, 32),), {}


def _dit_inputs(b, g, cfg):
    x = _randn(g, b, 4, 16, 16)
    return (x,), {"timestep": _timesteps(g, b), "class_labels": torch.randint(0, 1000, (b,), generator=g)}


def _text_conditioned(shape):
    def make(b, g, cfg):
        x = _randn(g, b, *shape)
        return (x,), {"encoder_hidden_states": _randn(g, b, _TEXT_TOKENS, 24), "timestep": _timesteps(g, b)}

    return make


def _text_mask(batch: int, dtype=torch.bool) -> torch.Tensor:
    """A tokenizer's attention mask: odd samples padded by 2 tokens (a shorter prompt)."""
    lengths = torch.tensor([_TEXT_TOKENS - 2 * (i % 2) for i in range(batch)])
    return (torch.arange(_TEXT_TOKENS)[None, :] < lengths[:, None]).to(dtype)


def _flow_timesteps(gen: torch.Generator, batch: int) -> torch.Tensor:
    # flow-matching schedulers give float timesteps (sigma x 1000)
    return _timesteps(gen, batch).float()


def _cogvideox_rotary_inputs(frames: int):
    def make(b, g, cfg):
        x = _randn(g, b, frames, 4, 16, 16)
        return (x,), {"encoder_hidden_states": _randn(g, b, _TEXT_TOKENS, 24), "timestep": _timesteps(g, b),
                      "image_rotary_emb": cogvideox_rotary_emb(cfg, frames, 16, 16)}

    return make


def _wan_inputs(b, g, cfg):
    x = _randn(g, b, 4, 3, 16, 16)
    return (x,), {"timestep": _flow_timesteps(g, b), "encoder_hidden_states": _randn(g, b, _TEXT_TOKENS, 24)}


def _hunyuanvideo_inputs(b, g, cfg):
    x = _randn(g, b, 4, 3, 16, 16)
    return (x,), {
        "timestep": _flow_timesteps(g, b),
        "encoder_hidden_states": _randn(g, b, _TEXT_TOKENS, 24),
        "encoder_attention_mask": _text_mask(b, torch.float32),  # the pipeline casts it to the model's dtype
        "pooled_projections": _randn(g, b, 8),
        "guidance": torch.full((b,), 6.0) * 1000.0,  # guidance_scale x 1000, as HunyuanVideoPipeline
    }


def _mochi_inputs(b, g, cfg):
    x = _randn(g, b, 4, 3, 16, 16)
    return (x,), {"encoder_hidden_states": _randn(g, b, _TEXT_TOKENS, 24), "timestep": _flow_timesteps(g, b),
                  "encoder_attention_mask": _text_mask(b)}


def _ltx_video_inputs(b, g, cfg):
    # LTXPipeline._pack_latents with patch size 1: (B, C, F, H, W) -> (B, F*H*W, C)
    latents = _randn(g, b, 8, 3, 8, 8)
    x = latents.flatten(2).transpose(1, 2)
    return (x,), {
        "encoder_hidden_states": _randn(g, b, _TEXT_TOKENS, 24),
        "timestep": _flow_timesteps(g, b),
        "encoder_attention_mask": _text_mask(b),
        "num_frames": 3,
        "height": 8,
        "width": 8,
        "rope_interpolation_scale": (8 / 25, 32, 32),  # (VAE temporal ratio / frame rate, spatial, spatial)
    }


def _allegro_inputs(b, g, cfg):
    x = _randn(g, b, 4, 3, 16, 16)
    return (x,), {
        "encoder_hidden_states": _randn(g, b, _TEXT_TOKENS, 24),
        "timestep": _flow_timesteps(g, b),
        "encoder_attention_mask": _text_mask(b),
        "image_rotary_emb": allegro_rotary_emb(cfg, 3, 16, 16),
    }


def _flux_inputs(b, g, cfg):
    # FluxPipeline._pack_latents: (B, 4, 16, 16) -> 8x8 tokens of 2x2x4; _prepare_latent_image_ids
    latents = _randn(g, b, 4, 16, 16)
    x = latents.view(b, 4, 8, 2, 8, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, 64, 16)
    img_ids = torch.zeros(8, 8, 3)
    img_ids[..., 1] = torch.arange(8)[:, None]
    img_ids[..., 2] = torch.arange(8)[None, :]
    return (x,), {
        "encoder_hidden_states": _randn(g, b, _TEXT_TOKENS, 24),
        "pooled_projections": _randn(g, b, 8),
        "timestep": _flow_timesteps(g, b) / 1000,
        "img_ids": img_ids.reshape(64, 3),
        "txt_ids": torch.zeros(_TEXT_TOKENS, 3),
    }


def _sd3_inputs(b, g, cfg):
    x = _randn(g, b, 4, 16, 16)
    return (x,), {"encoder_hidden_states": _randn(g, b, _TEXT_TOKENS, 24), "pooled_projections": _randn(g, b, 8),
                  "timestep": _flow_timesteps(g, b)}


def _easyanimate_inputs(b, g, cfg):
    x = _randn(g, b, 4, 3, 16, 16)
    return (x,), {"timestep": _flow_timesteps(g, b), "encoder_hidden_states": _randn(g, b, _TEXT_TOKENS, 24)}


_INPUTS = {
    "vit": _image(64),
    "deit_distilled": _image(64),
    "vit_reg": _image(64),
    "hf_vit": _image(64),
    "videomae": _video_mae,
    "dit": _dit_inputs,
    "pixart": _text_conditioned((4, 16, 16)),
    "latte": _text_conditioned((4, 4, 16, 16)),  # (C, F, H, W)
    "cogvideox": _text_conditioned((3, 4, 16, 16)),  # (F, C, H, W)
    "cogvideox5b": _cogvideox_rotary_inputs(3),
    "cogvideox15": _cogvideox_rotary_inputs(4),
    "wan": _wan_inputs,  # (C, F, H, W), as the models below
    "hunyuanvideo": _hunyuanvideo_inputs,
    "mochi": _mochi_inputs,
    "ltx_video": _ltx_video_inputs,
    "allegro": _allegro_inputs,
    "flux": _flux_inputs,
    "sd3": _sd3_inputs,
    "easyanimate": _easyanimate_inputs,
}
assert tuple(_INPUTS) == NAMES
