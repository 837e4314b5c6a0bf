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

Calibration inputs (a tensor file, a folder of images or videos) are read by `measure/inputs.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from dittofx import signature
from dittofx.errors import DittoError
from dittofx.measure.agreement import main_tensor

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
        if new_b != old_b:
            for slot, value in self._batched():
                if slot not in values:
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
            for slot, value in self._batched():
                args, kwargs = put(args, kwargs, slot, value[idx])
            out.append(replace(self, args=args, kwargs=kwargs))
        return out

    def _batched(self) -> list[tuple[Slot, torch.Tensor]]:
        """The inputs that carry the batch of the main input (signature's batch rule)."""
        slots = list(_slots(self.args, self.kwargs))
        return [slots[i] for i in signature.batched([v for _, v in slots], self.batch)]

    def slot_named(self, model, name: str) -> Slot | None:
        return _find_input(model, self.args, self.kwargs, name)


def call_module(module) -> Callable[[tuple, dict], object]:
    return lambda args, kwargs: module(*args, **kwargs)


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
    """Every tensor leaf of a call's (args, kwargs), in the order export_onnx flattens them."""
    return [t for _, t in signature.tensor_leaves(obj)]


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
    return signature.forward_parameters(model)[0]


def _find_input(model, args: tuple, kwargs: dict, name: str) -> Slot | None:
    if name in kwargs:
        return ("kwarg", name)
    names = positional_names(model)
    if name in names and names.index(name) < len(args):
        return ("arg", names.index(name))
    return None
