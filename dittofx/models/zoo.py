"""A zoo of small random-config models, built in code (no hub): for tests, examples, benchmarks and
the CLI spec `zoo:NAME`.

    from dittofx.models import zoo
    z = zoo.build("vit", batch=2)
    z.model(*z.example_inputs, **z.example_kwargs)

Each model keeps the architecture of a real one (class / distillation / register tokens, cross
attention, spatial + temporal blocks, joint text-video attention) at a size whose forward takes a
few milliseconds on a CPU. Weights are random but deterministic (`seed`), and every parameter that
the libraries initialise to zero or to almost zero (biases, diffusers' output projections, timm's
class and register tokens) is given small random values, so the output depends on every layer: a
test comparing outputs then sees a bug anywhere in the model.

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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dittofx.errors import ModelSpecError

NAMES = ("vit", "deit_distilled", "vit_reg", "hf_vit", "videomae", "dit", "pixart", "latte", "cogvideox")

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
    args, kwargs = _INPUTS[name](batch, gen)
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
    return lambda b, g: ((_randn(g, b, 3, size, size),), {})


def _video_mae(b, g):
    return (_randn(g, b, 8, 3, 32, 32),), {}


def _dit_inputs(b, g):
    x = _randn(g, b, 4, 16, 16)
    return (x,), {"timestep": _timesteps(g, b), "class_labels": torch.randint(0, 1000, (b,), generator=g)}


def _text_conditioned(shape):
    def make(b, g):
        x = _randn(g, b, *shape)
        return (x,), {"encoder_hidden_states": _randn(g, b, _TEXT_TOKENS, 24), "timestep": _timesteps(g, b)}

    return make


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
}
assert tuple(_INPUTS) == NAMES
