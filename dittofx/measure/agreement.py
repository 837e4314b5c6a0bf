"""How closely an optimized model's outputs agree with the untouched model's: one place for the
metrics that `dittofx bench`, `dittofx tune`, the examples and the benchmarks quote.

    from dittofx.measure.agreement import agreement, main_tensor
    a = agreement(main_tensor(opt(x)), main_tensor(model(x)), kind="classifier")
    a.cosine, a.top1, a.value("cosine")

Metrics (reference = the untouched model's output, both flattened per sample, in float32):

- cosine: cosine similarity of each sample's output with the reference, averaged over the batch.
  1.0 is identical direction. Every kind of model has it.
- top1: the share of samples whose arg-max class is the same (classifiers: a (B, classes) output).
- psnr: 10 log10(range^2 / MSE) in dB over the whole batch, range = max - min of the reference
  (diffusion models, on the final latent of a denoising loop, as PAB's paper quotes it on videos).
  Identical outputs give +inf.

The kind of a model decides which metrics apply: "diffusion" (the model has a timestep input),
"classifier" (the main output is (B, classes)), else "features".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dittofx.errors import DittoError

METRICS = ("cosine", "top1", "psnr")
KINDS = ("classifier", "diffusion", "features")
# what each metric needs of a model's kind
_METRIC_KINDS = {"cosine": KINDS, "top1": ("classifier",), "psnr": ("diffusion",)}


def main_tensor(output) -> torch.Tensor:
    """The main tensor of a model output: a tensor itself, a tuple/list's first element, a transformers
    ModelOutput's `logits` (else its first field), a diffusers output's `sample`; runners' lists too."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "sample"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, dict) and output:
        return main_tensor(next(iter(output.values())))
    if hasattr(output, "to_tuple"):
        return main_tensor(output.to_tuple())
    if isinstance(output, (tuple, list)) and output:
        return main_tensor(output[0])
    raise DittoError(f"cannot find the main tensor in a model output of type {type(output).__name__}")


def kind_of(output: torch.Tensor, diffusion: bool) -> str:
    """"diffusion" when the model takes a timestep, "classifier" for a (B, classes) output, else "features"."""
    if diffusion:
        return "diffusion"
    if output.dim() == 2 and output.shape[1] > 1:
        return "classifier"
    return "features"


def default_metric(kind: str) -> str:
    return "psnr" if kind == "diffusion" else "cosine"


def check_metric(metric: str, kind: str) -> None:
    if metric not in METRICS:
        raise DittoError(f"unknown agreement metric {metric!r}; accepted: {', '.join(METRICS)}")
    if kind not in _METRIC_KINDS[metric]:
        usable = [m for m in METRICS if kind in _METRIC_KINDS[m]]
        raise DittoError(f"metric {metric} does not apply to a {kind} model; use {' or '.join(usable)}")


def cosine(output: torch.Tensor, reference: torch.Tensor) -> float:
    out, ref = _pair(output, reference)
    return torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=1, eps=1e-12).mean().item()


def top1(output: torch.Tensor, reference: torch.Tensor) -> float:
    out, ref = _pair(output, reference)
    if out.dim() != 2:
        raise DittoError(f"top-1 agreement needs (batch, classes) outputs, got shape {tuple(out.shape)}")
    return (out.argmax(1) == ref.argmax(1)).float().mean().item()


def psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    out, ref = _pair(output, reference)
    mse = (out - ref).pow(2).mean().item()
    if mse == 0.0:
        return math.inf
    span = (ref.max() - ref.min()).item() or 1.0
    return 10.0 * math.log10(span * span / mse)


def _pair(output: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    output, reference = main_tensor(output), main_tensor(reference)
    if output.shape != reference.shape:
        raise DittoError(f"outputs of shape {tuple(output.shape)} cannot be compared with the reference's "
                         f"{tuple(reference.shape)}")
    out = output.detach().float().cpu()
    ref = reference.detach().float().cpu()
    if out.dim() == 1:
        out, ref = out[:, None], ref[:, None]
    return out, ref


@dataclass
class Agreement:
    """The agreement of one output with its reference; metrics that do not apply are None."""

    kind: str
    cosine: float
    top1: float | None = None
    psnr: float | None = None
    samples: int = 0

    def value(self, metric: str) -> float:
        check_metric(metric, self.kind)
        return getattr(self, metric)

    def meets(self, metric: str, budget: float) -> bool:
        return self.value(metric) >= budget

    def as_dict(self) -> dict:
        """JSON-ready: an infinite PSNR (identical outputs) is written as null with `identical: true`."""
        out = {"kind": self.kind, "cosine": self.cosine, "top1": self.top1, "samples": self.samples}
        if self.kind == "diffusion":
            out["psnr"] = None if self.psnr is None or math.isinf(self.psnr) else self.psnr
            out["identical"] = self.psnr is not None and math.isinf(self.psnr)
        return out

    def describe(self) -> str:
        parts = [f"cosine {self.cosine:.4f}"]
        if self.top1 is not None:
            parts.append(f"top-1 {self.top1:.1%}")
        if self.psnr is not None:
            parts.append(f"PSNR {format_psnr(self.psnr)}")
        return ", ".join(parts)


def format_psnr(value: float | None) -> str:
    if value is None:
        return "-"
    return "identical" if math.isinf(value) else f"{value:.1f} dB"


def agreement(output, reference, kind: str) -> Agreement:
    """Every metric that applies to `kind` ("classifier", "diffusion", "features")."""
    if kind not in KINDS:
        raise DittoError(f"unknown model kind {kind!r}; accepted: {', '.join(KINDS)}")
    out, ref = main_tensor(output), main_tensor(reference)
    return Agreement(
        kind=kind,
        cosine=cosine(out, ref),
        top1=top1(out, ref) if kind == "classifier" else None,
        psnr=psnr(out, ref) if kind == "diffusion" else None,
        samples=int(out.shape[0]) if out.dim() else 1,
    )


def combine(parts: list[tuple[torch.Tensor, torch.Tensor]], kind: str) -> Agreement:
    """Agreement over several (output, reference) batches, as if they were one batch."""
    if not parts:
        raise DittoError("no outputs to compare")
    out = torch.cat([main_tensor(o).detach().float().cpu() for o, _ in parts])
    ref = torch.cat([main_tensor(r).detach().float().cpu() for _, r in parts])
    return agreement(out, ref, kind)
