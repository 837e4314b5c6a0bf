"""Calibration inputs for `dittofx bench` and `dittofx tune`: what agreement is measured on.

`load_inputs` reads a .pt / .pth file (a tensor: the main input; a tuple or list: the positional
inputs; a dict: inputs by name), a .safetensors file (inputs by name, or one tensor: the main
input), or a folder of images or videos, decoded, resized and normalised to the model's example
input (timm: the model's own data config; transformers: the folder's preprocessor_config.json where
there is one; otherwise ImageNet mean and std). `random_inputs` draws them instead.
"""

from __future__ import annotations

import os

import torch

from dittofx.errors import DittoError, first_line
from dittofx.measure.workload import Workload, positional_names

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mpg", ".mpeg", ".avi", ".mov", ".mkv", ".webm", ".m4v")
TENSOR_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_inputs(path, workload: Workload, model, *, family: str = "torch", model_dir: str | None = None,
                max_inputs: int = 64, frame_stride: int = 4) -> Workload:
    """`workload` with its inputs replaced by those in `path` (a tensor file or a folder of images / videos)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DittoError(f"--inputs {path}: no such file or folder (accepted: a .pt/.pth/.safetensors file of "
                         f"input tensors, or a folder of images or videos)")
    if os.path.isdir(path):
        main = _load_folder(path, workload, model, family, model_dir, max_inputs, frame_stride)
        return workload.with_main_input(main[:max_inputs])
    if not path.lower().endswith(TENSOR_SUFFIXES):
        raise DittoError(f"--inputs {path}: unknown file type; accepted: {', '.join(TENSOR_SUFFIXES)} or a folder "
                         f"of images ({', '.join(IMAGE_SUFFIXES)}) or videos ({', '.join(VIDEO_SUFFIXES)})")
    values = _read_tensor_file(path)
    by_slot = _match_slots(values, workload, model, path)
    n = {int(v.shape[0]) for v in by_slot.values() if isinstance(v, torch.Tensor) and v.dim()}
    if workload.main not in by_slot:
        raise DittoError(f"--inputs {path} does not hold the model's main input")
    main = by_slot[workload.main]
    if not isinstance(main, torch.Tensor) or main.dim() != workload.main_input.dim() or \
            tuple(main.shape[1:]) != tuple(workload.main_input.shape[1:]):
        got = tuple(main.shape) if isinstance(main, torch.Tensor) else type(main).__name__
        raise DittoError(f"--inputs {path}: the main input has shape {got}; the model takes "
                         f"(N, {', '.join(map(str, workload.main_input.shape[1:]))})")
    if len(n) > 1:
        raise DittoError(f"--inputs {path}: the tensors have different batch sizes {sorted(n)}")
    by_slot = {s: v.to(workload.main_input.dtype) if s == workload.main else v for s, v in by_slot.items()}
    if main.shape[0] > max_inputs:
        by_slot = {s: v[:max_inputs] if isinstance(v, torch.Tensor) and v.dim() else v for s, v in by_slot.items()}
    return workload.with_inputs(by_slot)


def _read_tensor_file(path: str):
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file is the user's input
        raise DittoError(f"--inputs {path} cannot be read: {type(e).__name__}: {first_line(e)}") from None


def _match_slots(values, workload: Workload, model, path: str) -> dict:
    if isinstance(values, torch.Tensor):
        return {workload.main: values}
    if isinstance(values, (tuple, list)):
        if not values or len(values) > len(workload.args):
            raise DittoError(f"--inputs {path} holds {len(values)} positional inputs; the model takes "
                             f"{len(workload.args)}")
        return {("arg", i): v for i, v in enumerate(values)}
    if isinstance(values, dict):
        if len(values) == 1:
            (name, value), = values.items()
            slot = workload.slot_named(model, str(name))
            return {slot or workload.main: value}
        out = {}
        for name, value in values.items():
            slot = workload.slot_named(model, str(name))
            if slot is None:
                known = [k for k in positional_names(model)[:len(workload.args)]] + list(workload.kwargs)
                raise DittoError(f"--inputs {path}: {name!r} is not an input of the model; its inputs: "
                                 f"{', '.join(known)}")
            out[slot] = value
        return out
    raise DittoError(f"--inputs {path} holds a {type(values).__name__}; accepted: a tensor, a tuple/list of tensors, "
                     f"or a dict of tensors by input name")


def _load_folder(path, workload, model, family, model_dir, max_inputs, frame_stride) -> torch.Tensor:
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if not f.startswith("."))
    images = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    videos = [f for f in files if f.lower().endswith(VIDEO_SUFFIXES)]
    example = workload.main_input
    if example.dim() == 4:
        if not images:
            raise DittoError(f"--inputs {path}: no images ({', '.join(IMAGE_SUFFIXES)}) for this image model "
                             f"(input {tuple(example.shape[1:])})")
        return _load_images(images[:max_inputs], example, model, family, model_dir)
    if example.dim() == 5:
        if not videos:
            raise DittoError(f"--inputs {path}: no videos ({', '.join(VIDEO_SUFFIXES)}) for this video model "
                             f"(input {tuple(example.shape[1:])})")
        return _load_videos(videos, example, model_dir if family == "transformers" else None, max_inputs, frame_stride)
    raise DittoError(f"--inputs {path}: a folder of images or videos needs a model whose main input is an image "
                     f"(N, C, H, W) or a video (N, T, C, H, W); this one takes {tuple(example.shape)}: pass a .pt file")


def _open_image(file):
    from PIL import Image

    try:
        with Image.open(file) as im:
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise DittoError(f"cannot read image {file}: {first_line(e)}") from None


def _load_images(files, example, model, family, model_dir) -> torch.Tensor:
    size = tuple(example.shape[1:])
    images = [_open_image(f) for f in files]
    if family == "timm":
        from timm.data import create_transform, resolve_data_config

        config = resolve_data_config({"input_size": size}, model=model)
        transform = create_transform(**config)
        return torch.stack([transform(im) for im in images]).to(example.dtype)
    processor = _hf_processor(model_dir) if family == "transformers" else None
    if processor is not None:
        try:
            out = processor(images=images, return_tensors="pt")["pixel_values"]
            if tuple(out.shape[1:]) == size:
                return out.to(example.dtype)
        except Exception:  # noqa: BLE001 - fall back to the plain transform below
            pass
    return torch.stack([_to_tensor(im, size[1:]) for im in images]).to(example.dtype)


def _to_tensor(image, hw, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Resize the shorter side to fit, centre-crop to (H, W), scale to [0, 1], normalise."""
    from PIL import Image

    h, w = hw
    scale = max(h / image.height, w / image.width)
    image = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))),
                         Image.BICUBIC)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    image = image.crop((left, top, left + w, top + h))
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(h, w, 3)
    x = data.permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def _hf_processor(model_dir):
    if not model_dir or not os.path.isfile(os.path.join(model_dir, "preprocessor_config.json")):
        return None
    try:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(model_dir)
    except Exception:  # noqa: BLE001
        return None


def read_video(path: str, size: int | None = None) -> torch.Tensor:
    """Every frame of the video at `path`, (T, C, H, W) in [0, 1]; with `size`, each frame's short side
    resized to `size` (bilinear, antialiased) and centre-cropped to size x size. Decoded with PyAV;
    a missing file, PyAV or a frame is one DittoError line."""
    import torch.nn.functional as F

    if not os.path.isfile(path):
        raise DittoError(f"{path}: no such video file")
    try:
        import av
        import numpy as np
    except ImportError:
        raise DittoError("reading videos needs PyAV: pip install av") from None
    try:
        with av.open(path) as container:
            video = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    except Exception as e:  # noqa: BLE001 - PyAV's errors, and a file with no frame (np.stack of nothing)
        raise DittoError(f"cannot decode video {path}: {first_line(e)}") from None
    video = torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255
    h, w = video.shape[-2:]
    if size is None or (h, w) == (size, size):
        return video
    scale = size / min(h, w)
    shape = (max(size, round(h * scale)), max(size, round(w * scale)))
    video = torch.cat([F.interpolate(part, size=shape, mode="bilinear", antialias=True, align_corners=False)
                       for part in video.split(32)])  # 32 frames at a time: the antialias buffers stay small
    top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
    return video[..., top:top + size, left:left + size]


def _load_videos(files, example, model_dir, max_inputs, frame_stride) -> torch.Tensor:
    """Clips of T frames `frame_stride` apart, one after another from the start of each video."""
    try:
        import av
    except ImportError:
        raise DittoError("reading videos needs PyAV: pip install av") from None
    channel_axis = 2 if example.shape[2] == 3 else 1  # (N, T, C, H, W) or (N, C, T, H, W)
    frames_needed = example.shape[1 if channel_axis == 2 else 2]
    hw = tuple(example.shape[3:])
    processor = _hf_processor(model_dir)
    span = (frames_needed - 1) * frame_stride + 1
    clips = []
    for file in files:
        try:
            with av.open(file) as container:
                frames = []
                for frame in container.decode(video=0):
                    frames.append(frame.to_image())
                    if len(frames) == span:
                        clips.append(_clip(frames[::frame_stride], hw, processor))
                        frames = []
                        if len(clips) >= max_inputs:
                            break
        except DittoError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DittoError(f"cannot decode video {file}: {first_line(e)}") from None
        if len(clips) >= max_inputs:
            break
    if not clips:
        raise DittoError(f"no video has {span} frames ({frames_needed} frames, {frame_stride} apart)")
    video = torch.stack(clips)  # (N, T, C, H, W)
    if channel_axis == 1:
        video = video.transpose(1, 2)
    return video.to(example.dtype)


def _clip(frames, hw, processor) -> torch.Tensor:
    if processor is not None:
        try:
            out = processor(list(frames), return_tensors="pt")["pixel_values"][0]
            if tuple(out.shape[-2:]) == hw:
                return out
        except Exception:  # noqa: BLE001
            pass
    return torch.stack([_to_tensor(f, hw) for f in frames])


def random_inputs(workload: Workload, samples: int, seed: int = 0) -> Workload:
    """The workload on `samples` random main inputs (normal noise; for images and videos that is
    normalised pixels, for diffusion models the starting latents)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (samples, *workload.main_input.shape[1:])
    return workload.with_main_input(torch.randn(shape, generator=gen).to(workload.main_input.dtype))
