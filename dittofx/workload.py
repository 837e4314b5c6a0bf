"""What one measured run of a model is, for `dittofx bench` and `dittofx tune`, and the inputs it runs on.

A `Workload` is one forward for an image or video model, and a short denoising loop for a diffusion
model (one whose graph has a timestep input: `opt.report.timestep_input`): PAB only means something
over a loop of steps with a falling timestep. The loop is DDIM (eta = 0) over `steps` timesteps
spaced evenly from 999 down to 0, with the linear beta schedule of DiT, PixArt and Latte (1e-4 to
0.02 over 1000 steps); the model's output is taken as the noise prediction (its first half of
channels where it also predicts the variance, as DiT does). The predicted clean latent is clamped to
+-10 (X0_CLAMP): trained models' latents are about unit variance and never reach it, while a
random-weight model's would otherwise grow without bound. What the run returns, and what agreement
compares, is the model's main output, or the final latent of the loop.

    wl = Workload.of(model, example_inputs, example_kwargs, timestep_input=opt.report.timestep_input, steps=10)
    ref = wl.run(call_module(model))
    out = wl.run(call_module(opt), reset=opt.reset)

Calibration inputs (`load_inputs`): a .pt / .pth file (a tensor: the main input; a tuple or list: the
positional inputs; a dict: inputs by name), a .safetensors file (inputs by name, or one tensor: the
main input), or a folder of images or videos, decoded, resized and normalised to the model's example
input (timm: the model's own data config; transformers: the folder's preprocessor_config.json where
there is one; otherwise ImageNet mean and std).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from dittofx.agreement import main_tensor
from dittofx.errors import DittoError, first_line

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mpg", ".mpeg", ".avi", ".mov", ".mkv", ".webm", ".m4v")
TENSOR_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_STEPS = 1000
X0_CLAMP = 10.0

# (where, key): ("arg", index) or ("kwarg", name)
Slot = tuple


@dataclass
class Workload:
    """One run: `model(*args, **kwargs)` once, or a denoising loop of `steps` calls when `timestep` is set."""

    args: tuple
    kwargs: dict
    main: Slot
    timestep: Slot | None = None
    steps: int = 0

    @staticmethod
    def of(model, args, kwargs, *, timestep_input: str | None = None, steps: int = 10) -> Workload:
        args, kwargs = tuple(args), dict(kwargs or {})
        timestep = _find_input(model, args, kwargs, timestep_input) if timestep_input else None
        if timestep_input and timestep is None:
            raise DittoError(f"cannot find the model's timestep input {timestep_input!r} among its inputs "
                             f"(positional: {len(args)}, keywords: {', '.join(kwargs) or 'none'})")
        if timestep is not None and steps < 1:
            raise DittoError(f"--steps must be at least 1 for a diffusion model, got {steps}")
        main = _main_slot(args, kwargs, exclude=timestep)
        return Workload(args, kwargs, main, timestep, steps if timestep is not None else 0)

    @property
    def diffusion(self) -> bool:
        return self.timestep is not None

    @property
    def main_input(self) -> torch.Tensor:
        return get(self.args, self.kwargs, self.main)

    @property
    def batch(self) -> int:
        return int(self.main_input.shape[0])

    def timesteps(self) -> list[int]:
        """`steps` timesteps evenly spaced from 999 down to 0."""
        if self.steps == 1:
            return [TRAIN_STEPS - 1]
        return [round((TRAIN_STEPS - 1) * (1 - i / (self.steps - 1))) for i in range(self.steps)]

    def run(self, call: Callable[[tuple, dict], object], reset: Callable[[], None] | None = None) -> torch.Tensor:
        """The main output of one forward, or the final latent of one denoising loop."""
        if reset is not None:
            reset()
        if not self.diffusion:
            return main_tensor(call(self.args, self.kwargs))
        latent = self.main_input
        example_t = get(self.args, self.kwargs, self.timestep)
        schedule = self.timesteps()
        for i, t in enumerate(schedule):
            args, kwargs = put(self.args, self.kwargs, self.main, latent)
            args, kwargs = put(args, kwargs, self.timestep, _timestep_like(example_t, t))
            out = main_tensor(call(args, kwargs))
            eps = noise_prediction(out, latent)
            latent = ddim_step(latent, eps, t, schedule[i + 1] if i + 1 < len(schedule) else -1)
        return latent

    def with_main_input(self, value: torch.Tensor) -> Workload:
        """The same workload on another main input (any batch): other batched inputs are cycled to it."""
        return self.with_inputs({self.main: value})

    def with_inputs(self, values: dict) -> Workload:
        """Replace inputs by slot; inputs not given whose dim 0 is the batch are cycled to the new batch."""
        old_b = self.batch
        new_b = int(values[self.main].shape[0]) if self.main in values else old_b
        args, kwargs = self.args, self.kwargs
        for slot, value in _slots(self.args, self.kwargs):
            if slot in values:
                continue
            if new_b != old_b and isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == old_b:
                args, kwargs = put(args, kwargs, slot, value[torch.arange(new_b) % old_b])
        for slot, value in values.items():
            args, kwargs = put(args, kwargs, slot, value)
        return replace(self, args=args, kwargs=kwargs)

    def chunks(self, batch: int) -> list[Workload]:
        """This workload cut into batches of at most `batch` samples."""
        n = self.batch
        if n <= batch:
            return [self]
        out = []
        for start in range(0, n, batch):
            idx = torch.arange(start, min(start + batch, n))
            args, kwargs = self.args, self.kwargs
            for slot, value in _slots(self.args, self.kwargs):
                if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n:
                    args, kwargs = put(args, kwargs, slot, value[idx])
            out.append(replace(self, args=args, kwargs=kwargs))
        return out

    def slot_named(self, model, name: str) -> Slot | None:
        return _find_input(model, self.args, self.kwargs, name)


def call_module(module) -> Callable[[tuple, dict], object]:
    return lambda args, kwargs: module(*args, **kwargs)


def call_runner(runner) -> Callable[[tuple, dict], object]:
    """An exported-model runner (onnxruntime, TensorRT) called with the flat tensor inputs, in the
    order export_onnx flattens them."""
    return lambda args, kwargs: runner(*flat_tensors((args, kwargs)))


def call_named(runner, model) -> Callable[[tuple, dict], object]:
    """A runner whose `input_names` are the model's input names (export_onnx, export_pab_onnx), called by
    name; where a name is not one of the model's inputs, with the flat tensor inputs in order."""
    names = positional_names(model)

    def call(args, kwargs):
        named = dict(zip(names, args))
        named.update(kwargs)
        if all(n in named for n in runner.input_names):
            return runner(**{n: named[n] for n in runner.input_names})
        return runner(*flat_tensors((args, kwargs)))

    return call


def flat_tensors(obj) -> list[torch.Tensor]:
    """Every tensor leaf of nested tuples / lists / dicts, in order (as export_onnx names its inputs)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in flat_tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in flat_tensors(v)]
    return []


# ---------------------------------------------------------------------------------------------
# the denoising loop


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, TRAIN_STEPS, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0)


_ALPHAS = alphas_cumprod()


def ddim_step(latent: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
    """Deterministic DDIM from timestep t to t_prev (-1: the end, alpha 1); x0 clamped to +-X0_CLAMP."""
    a_t = _ALPHAS[t].item()
    a_prev = _ALPHAS[t_prev].item() if t_prev >= 0 else 1.0
    eps = eps.to(latent.dtype)
    x0 = ((latent - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-X0_CLAMP, X0_CLAMP)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps


def noise_prediction(output: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """The model output as a noise prediction of the latent's shape: the output itself, or its first half
    along the one axis where it is twice the latent (a learned variance, as in DiT and PixArt)."""
    output = output.to(latent.device)
    if output.shape == latent.shape:
        return output
    if output.dim() == latent.dim():
        diff = [i for i, (a, b) in enumerate(zip(output.shape, latent.shape)) if a != b]
        if len(diff) == 1 and output.shape[diff[0]] == 2 * latent.shape[diff[0]]:
            return output.narrow(diff[0], 0, latent.shape[diff[0]])
    raise DittoError(f"the diffusion model's output {tuple(output.shape)} is not a noise prediction for its latent "
                     f"input {tuple(latent.shape)} (nor twice its channels); bench/tune cannot run a denoising loop")


def _timestep_like(example, t: int):
    if isinstance(example, torch.Tensor):
        return torch.full_like(example, t)
    return type(example)(t)


# ---------------------------------------------------------------------------------------------
# input slots


def get(args: tuple, kwargs: dict, slot: Slot):
    where, key = slot
    return args[key] if where == "arg" else kwargs[key]


def put(args: tuple, kwargs: dict, slot: Slot, value) -> tuple[tuple, dict]:
    where, key = slot
    if where == "arg":
        args = args[:key] + (value,) + args[key + 1:]
    else:
        kwargs = {**kwargs, key: value}
    return args, kwargs


def _slots(args: tuple, kwargs: dict):
    for i, a in enumerate(args):
        yield ("arg", i), a
    for k, v in kwargs.items():
        yield ("kwarg", k), v


def _main_slot(args: tuple, kwargs: dict, exclude: Slot | None) -> Slot:
    for slot, value in _slots(args, kwargs):
        if slot != exclude and isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2:
            return slot
    raise DittoError("the model's example inputs have no floating-point tensor input (batch, ...) to vary")


def positional_names(model) -> list[str]:
    """Names of forward()'s positional parameters, looking through wrappers (OptimizedModule)."""
    for m in (getattr(model, "original", None), model):
        if m is None:
            continue
        try:
            params = inspect.signature(m.forward).parameters.values()
        except (TypeError, ValueError):
            continue
        names = [p.name for p in params
                 if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        if names:
            return names
    return []


def _find_input(model, args: tuple, kwargs: dict, name: str) -> Slot | None:
    if name in kwargs:
        return ("kwarg", name)
    names = positional_names(model)
    if name in names and names.index(name) < len(args):
        return ("arg", names.index(name))
    return None


# ---------------------------------------------------------------------------------------------
# calibration inputs


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

