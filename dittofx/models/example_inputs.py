"""Example inputs inferred from a model's config: what `optimize()` and the CLI call a model with when
the user gives none."""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any

import torch
from torch import nn

from dittofx.errors import ModelSpecError, first_line


def parse_input_shape(value: tuple[int, ...] | list[int] | str) -> tuple[int, ...]:
    """Parse "3,224,224" (or "3x224x224") or a sequence of ints into a tuple of positive ints."""
    what = "input shape must be positive integers without the batch dimension, e.g. 3,224,224"
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").replace(" ", ",").split(",") if p]
        try:
            value = tuple(int(p) for p in parts)
        except ValueError:
            raise ModelSpecError(f"{what}; got {value!r}") from None
    try:
        shape = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ModelSpecError(f"{what}; got {value!r}") from None
    if not shape or any(v < 1 for v in shape) or any(isinstance(v, float) and v != int(v) for v in value):
        raise ModelSpecError(f"{what}; got {value!r}")
    return shape


# The most elements an example input may have (2^31: 8 GiB of float32, and where int32 indexing ends):
# past it, an input shape is a typo, and allocating it would fail (or swap) instead of saying so.
MAX_INPUT_ELEMENTS = 2**31


def check_input_size(shape: tuple[int, ...]) -> None:
    """ModelSpecError when an example input of `shape` (with the batch) would be too large to make."""
    n = math.prod(shape)
    if n > MAX_INPUT_ELEMENTS:
        raise ModelSpecError(f"an example input of shape {tuple(shape)} (with the batch) has {n:.3g} elements; "
                             f"dittofx makes example inputs of at most 2^31 elements: give a smaller input shape "
                             f"or batch")


@contextlib.contextmanager
def allocating(what: str):
    """Turn a failure to allocate `what` (MemoryError, torch's 'can't allocate memory') into one line."""
    try:
        yield
    except MemoryError as e:
        raise ModelSpecError(f"not enough memory for {what}: give a smaller input shape or batch") from e
    except RuntimeError as e:
        if "alloc" not in str(e).lower() and "out of memory" not in str(e).lower():
            raise
        raise ModelSpecError(f"not enough memory for {what} ({first_line(e, 160)}): give a smaller input shape "
                             f"or batch") from e


def _family_of(model: nn.Module) -> str:
    for cls in type(model).__mro__:
        root = cls.__module__.split(".")[0]
        if root in ("timm", "transformers", "diffusers"):
            return root
    return "torch"



def example_inputs_for(
    model: nn.Module, input_shape: tuple[int, ...] | None = None, batch: int = 1
) -> tuple[tuple, dict] | None:
    """Infer (args, kwargs) that run `model`, or None when nothing tells the input's shape.

    - timm: (C, H, W) from the patch embedding's image size, else `pretrained_cfg["input_size"]`.
    - transformers: pixel_values (C, H, W) from `image_size`/`num_channels`, (T, C, H, W) when the
      config has `num_frames` (VideoMAE, TimeSformer, ViViT); input_ids (16,) for text models.
    - diffusers: hidden_states from `sample_size`/`in_channels` (+ `video_length` for Latte as
      (C, F, H, W), `sample_frames` for CogVideoX as (F, C, H, W) and Allegro as (C, F, H, W));
      timestep; class_labels (DiT); encoder_hidden_states from `caption_channels`/`text_embed_dim`/
      `cross_attention_dim`; pooled_projections; PixArt's resolution/aspect_ratio and SDXL's
      text_embeds/time_ids when the model needs them; the rotary tables the CogVideoX (rotary) and
      Allegro pipelines pass. Models whose config states no input size (Wan, HunyuanVideo, Mochi,
      LTX-Video, Flux, EasyAnimate) need example inputs.
    - anything else: only with `input_shape`.

    `input_shape` is the main input's shape WITHOUT the batch dimension; it replaces the inferred
    one. Inputs are random but deterministic, of the model's floating dtype and on its device.
    """
    shape = parse_input_shape(input_shape) if input_shape is not None else None
    if shape is not None:
        check_input_size((batch, *shape))
    with allocating(f"the example inputs of {type(model).__name__} at batch {batch}"
                    + (f" and input shape {shape}" if shape else "")):
        out = _inputs_for(model, shape, batch)
    if out is None:
        return None
    dtype, device = _dtype_device(model)

    def cast(t):
        if isinstance(t, dict):
            return {k: cast(v) for k, v in t.items()}
        if isinstance(t, (tuple, list)):
            return type(t)(cast(v) for v in t)
        if torch.is_tensor(t):
            return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        return t

    args, kwargs = out
    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _inputs_for(model: nn.Module, shape: tuple[int, ...] | None, batch: int) -> tuple[tuple, dict] | None:
    gen = torch.Generator().manual_seed(0)
    family = _family_of(model)
    if family == "timm":
        out = _timm_inputs(model, shape, batch, gen)
    elif family == "transformers":
        out = _hf_inputs(model, shape, batch, gen)
    elif family == "diffusers":
        out = _diffusers_inputs(model, shape, batch, gen)
    else:
        out = None
    if out is None and shape is not None and family != "diffusers":
        out = ((torch.randn((batch, *shape), generator=gen),), {})
    return out


def _dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def _like(old: Any, shape: tuple[int, ...]) -> torch.Tensor:
    new = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if torch.is_tensor(old):
        new = new.to(device=old.device, dtype=old.dtype if old.is_floating_point() else torch.float32)
    return new


def _pair(v: Any) -> tuple[int, int] | None:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) >= 2:
        return (int(v[-2]), int(v[-1]))
    return None


def _timm_inputs(model, shape, batch, gen):
    if shape is None:
        pe = getattr(model, "patch_embed", None)
        img = _pair(getattr(pe, "img_size", None)) if pe is not None else None
        proj = getattr(pe, "proj", None)
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        size = cfg.get("input_size")
        if img is not None:
            chans = getattr(proj, "in_channels", None) or (size[0] if size else 3)
            shape = (chans, *img)
        elif size:
            shape = tuple(size)
        else:
            return None
    return (torch.randn((batch, *shape), generator=gen),), {}


def _hf_inputs(model, shape, batch, gen):
    config = model.config
    main = getattr(model, "main_input_name", "pixel_values")
    if main == "pixel_values":
        cfg = config if getattr(config, "image_size", None) is not None else getattr(config, "vision_config", None)
        if shape is None:
            if cfg is None or _pair(getattr(cfg, "image_size", None)) is None:
                return None
            chans = getattr(cfg, "num_channels", 3) or 3
            shape = (chans, *_pair(cfg.image_size))
            frames = getattr(cfg, "num_frames", None)
            if frames:
                shape = (int(frames), *shape)
        return (torch.randn((batch, *shape), generator=gen),), {}
    if main == "input_ids":
        vocab = getattr(config, "vocab_size", None)
        if not vocab:
            return None
        if shape is None:
            shape = (min(16, getattr(config, "max_position_embeddings", 16) or 16),)
        return (torch.randint(0, vocab, (batch, *shape), generator=gen),), {}
    return None


# schedulers whose pipelines pass float timesteps (flow matching: sigma x 1000; Allegro's Euler); the
# DDPM / DDIM ones (DiT, PixArt, CogVideoX) pass integers
_FLOAT_TIMESTEPS = ("SD3Transformer2DModel", "FluxTransformer2DModel", "AllegroTransformer3DModel",
                    "WanTransformer3DModel", "HunyuanVideoTransformer3DModel", "MochiTransformer3DModel",
                    "LTXVideoTransformer3DModel", "EasyAnimateTransformer3DModel")


def _diffusers_inputs(model, shape, batch, gen):
    cfg = dict(model.config)
    cls = type(model).__name__  # a model built in code has no `_class_name` in its config
    params = inspect.signature(model.forward).parameters
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not names:
        return None
    if shape is None:
        shape = _diffusers_main_shape(cfg, cls)
        if shape is None:
            return None
    x = torch.randn((batch, *shape), generator=gen)
    kwargs: dict[str, Any] = {}
    if "timestep" in params:
        kwargs["timestep"] = torch.randint(100, 800, (batch,), generator=gen)
        if cls in _FLOAT_TIMESTEPS:
            kwargs["timestep"] = kwargs["timestep"].float()
    if cfg.get("norm_type") == "ada_norm_zero":  # DiT: class-conditional adaLN
        n_classes = cfg.get("num_embeds_ada_norm")
    else:
        n_classes = cfg.get("num_class_embeds")
    if "class_labels" in params and n_classes:
        kwargs["class_labels"] = torch.randint(0, int(n_classes), (batch,), generator=gen)
    if "encoder_hidden_states" in params:
        text_keys = ("caption_channels", "text_embed_dim", "joint_attention_dim", "cross_attention_dim")
        dim = next((cfg[k] for k in text_keys if cfg.get(k)), None)
        if isinstance(dim, (tuple, list)):
            dim = dim[0] if len(set(dim)) == 1 else None
        if dim:
            seq = int(cfg.get("max_text_seq_length") or 8)
            kwargs["encoder_hidden_states"] = torch.randn((batch, seq, int(dim)), generator=gen)
        elif params["encoder_hidden_states"].default is inspect.Parameter.empty:
            return None
    if "pooled_projections" in params and cfg.get("pooled_projection_dim"):
        kwargs["pooled_projections"] = torch.randn((batch, int(cfg["pooled_projection_dim"])), generator=gen)
    if "added_cond_kwargs" in params:
        if getattr(model, "use_additional_conditions", False):  # PixArt-alpha at 1024 px
            h, w = shape[-2:]
            kwargs["added_cond_kwargs"] = {
                "resolution": torch.tensor([[h * 8.0, w * 8.0]] * batch),
                "aspect_ratio": torch.tensor([[h / w]] * batch),
            }
        elif cfg.get("addition_embed_type") == "text_time":  # SDXL UNet
            time_dim = int(cfg.get("addition_time_embed_dim") or 0)
            text_dim = int(cfg.get("projection_class_embeddings_input_dim") or 0) - 6 * time_dim
            if text_dim <= 0:
                return None
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.randn((batch, text_dim), generator=gen),
                "time_ids": torch.randint(0, 1024, (batch, 6), generator=gen).float(),
            }
    if cls == "CogVideoXTransformer3DModel" and cfg.get("use_rotary_positional_embeddings"):
        kwargs["image_rotary_emb"] = cogvideox_rotary_emb(cfg, shape[0], *shape[-2:])
    elif cls == "AllegroTransformer3DModel":
        kwargs["image_rotary_emb"] = allegro_rotary_emb(cfg, *shape[1:])
    for n, p in params.items():  # a required input we know nothing about: cannot infer
        if n != names[0] and p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            if n not in kwargs:
                return None
    return (x,), kwargs


def _diffusers_main_shape(cfg: dict, cls: str) -> tuple[int, ...] | None:
    chans = cfg.get("in_channels")
    if not chans:
        return None
    if cls == "AllegroTransformer3DModel":  # (C, F, H, W), sample_frames in latent frames
        return (chans, int(cfg["sample_frames"]), int(cfg["sample_height"]), int(cfg["sample_width"]))
    if cfg.get("sample_frames") and cfg.get("sample_height") and cfg.get("sample_width"):  # CogVideoX: (F, C, H, W)
        ratio = int(cfg.get("temporal_compression_ratio") or 4)
        frames = (int(cfg["sample_frames"]) - 1) // ratio + 1
        return (frames, chans, int(cfg["sample_height"]), int(cfg["sample_width"]))
    hw = _pair(cfg.get("sample_size"))
    if hw is None:
        return None
    if cfg.get("video_length"):  # Latte: (C, F, H, W)
        return (chans, int(cfg["video_length"]), *hw)
    if any(k in cfg for k in ("num_frames", "sample_frames", "patch_size_t")) or "3D" in cls:
        return None  # a video model whose layout we do not know
    return (chans, *hw)


# -- rotary tables that diffusers pipelines build and pass to the transformer --------------------


def cogvideox_rotary_emb(config, frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) for a CogVideoX transformer with rotary embeddings (5B, 1.5) on `frames` latent frames
    of `height` x `width` latents, as CogVideoXPipeline._prepare_rotary_positional_embeddings builds them."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    p, p_t = int(config["patch_size"]), config.get("patch_size_t")
    grid = (height // p, width // p)
    base_h, base_w = int(config["sample_height"]) // p, int(config["sample_width"]) // p
    dim = int(config["attention_head_dim"])
    if p_t is None:  # CogVideoX 1.0 / 5B
        return get_3d_rotary_pos_embed(dim, _resize_crop_region(grid, base_w, base_h), grid, frames)
    return get_3d_rotary_pos_embed(dim, None, grid, (frames + p_t - 1) // p_t, grid_type="slice",
                                   max_size=(base_h, base_w))


def _resize_crop_region(src: tuple[int, int], tgt_width: int, tgt_height: int):
    """diffusers' cogvideo.pipeline_cogvideox.get_resize_crop_region_for_grid (importing the pipeline
    module loads the text encoders' code: seconds)."""
    h, w = src
    if h / w > tgt_height / tgt_width:
        resize_height, resize_width = tgt_height, int(round(tgt_height / h * w))
    else:
        resize_width, resize_height = tgt_width, int(round(tgt_width / w * h))
    top, left = int(round((tgt_height - resize_height) / 2.0)), int(round((tgt_width - resize_width) / 2.0))
    return (top, left), (top + resize_height, left + resize_width)


def allegro_rotary_emb(config, frames: int, height: int, width: int):
    """((freqs_t, freqs_h, freqs_w), (grid_t, grid_h, grid_w)) for an Allegro transformer on `frames`
    latent frames of `height` x `width` latents, as AllegroPipeline._prepare_rotary_positional_embeddings."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    p = int(config["patch_size"])
    grid = (height // p, width // p)
    scale = (config["interpolation_scale_t"], config["interpolation_scale_h"], config["interpolation_scale_w"])
    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=int(config["attention_head_dim"]), crops_coords=((0, 0), grid), grid_size=grid,
        temporal_size=frames, interpolation_scale=scale)
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long())
    pos = pos.reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()
    return (freqs_t, freqs_h, freqs_w), tuple(pos)
