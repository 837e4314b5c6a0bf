"""The library half of `dittofx bench` and `dittofx tune`: what is measured, and how agreement and
sweeps are computed. The CLI (cli/bench.py, cli/tune.py) parses arguments and prints.

    setup = make_setup(loaded, opt.report, spec="zoo:latte", steps=10, batch=2)
    agreement = measure_agreement(model, setup.calibration, setup.kind, call_module(opt), opt.reset)
    key, index, points = parse_sweep("r=0:24:4", ["tome"])   # [(label, [pass specs])]
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
from dataclasses import dataclass, field

import torch

from dittofx._log import stage
from dittofx.errors import DittoError
from dittofx.measure.agreement import combine, kind_of
from dittofx.measure.inputs import load_inputs, random_inputs
from dittofx.measure.workload import Workload, call_module
from dittofx.passes.spec import parse_pass, split_options, value_of


@dataclass
class Setup:
    """A loaded model with the workload it is measured on."""

    loaded: object  # models.ResolvedModel
    workload: object  # workload.Workload: what one timed run is (example inputs, or the first --inputs batch)
    calibration: list  # workloads whose outputs agreement is measured on, at most --batch samples each
    kind: str  # agreement.KINDS
    timestep_input: str | None
    report: object = None  # the report of the capture that found the timestep input
    notes: list = field(default_factory=list)


def _model_dir(spec: str) -> str | None:
    prefix, _, rest = spec.partition(":")
    if prefix in ("hf", "diffusers"):
        path = os.path.expanduser(rest.partition("#")[0].strip())
        if os.path.isdir(path):
            return path
    return None


def measure_agreement(model, calibration, kind: str, call, reset=None, references: dict | None = None):
    """Agreement of `call` (a workload call of the optimized model) with the untouched `model` over every
    calibration workload; `references` caches the untouched outputs by position."""
    references = {} if references is None else references
    parts = []
    with torch.inference_mode():
        for i, wl in enumerate(calibration):
            if i not in references:
                references[i] = wl.run(call_module(model))
            parts.append((wl.run(call, reset=reset), references[i]))
    return combine(parts, kind)


def eager_call(opt):
    """Call the optimized module's rewritten graph eagerly, even when `opt` was built with compile=True
    (FLOPs are counted eagerly)."""
    if not opt.compiled:
        return lambda a, k: opt(*a, **k)
    gm = opt.graph_module
    return lambda a, k: gm(*a, **k)


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# -- sweeps ----------------------------------------------------------------------------------------


def parse_sweep(text: str, base_specs: list[str]):
    """KEY=START:STOP:STEP or KEY=V1,V2,... over the first pass that has option KEY.

    Returns (key, index of the swept pass, [(label, [pass spec strings])])."""
    key, eq, values_text = text.partition("=")
    key = key.strip()
    if not eq or not key or not values_text.strip():
        raise DittoError(f"--sweep {text!r} is not KEY=START:STOP:STEP or KEY=V1,V2,... (e.g. r=0:24:4, tau=0,0.1,0.2)")
    passes = [parse_pass(s) for s in base_specs]
    index = next((i for i, p in enumerate(passes) if key in p.option_names()), None)
    if index is None:
        accepted = sorted({k for p in passes for k in p.option_names()})
        raise DittoError(f"--sweep {key}: no pass in {' '.join(base_specs)} has option {key!r}; accepted: "
                         f"{', '.join(accepted)}")
    values_text = values_text.strip()
    parts = split_options(values_text)
    if len(parts) == 1 and values_text.count(":") == 2 and not values_text.startswith(("(", "[")):
        labels = _range(values_text, text)
    else:
        labels = parts
    base = passes[index]
    points = []
    for label in labels:
        try:
            swept = dataclasses.replace(base, **{key: value_of(label)})
        except DittoError as e:
            raise DittoError(f"--sweep {key}={label}: {e}") from None
        specs = list(base_specs)
        specs[index] = swept.spec()
        if any(specs == other for _, other in points):
            raise DittoError(f"--sweep {text!r} gives the setting {' '.join(specs)} twice")
        points.append((label, specs))
    if len(points) > 32:
        raise DittoError(f"--sweep {text!r} gives {len(points)} settings; at most 32")
    return key, index, points


def _range(values: str, text: str) -> list[str]:
    try:
        start, stop, step = (_number(v) for v in values.split(":"))
    except ValueError:
        raise DittoError(f"--sweep {text!r}: START:STOP:STEP must be numbers, e.g. r=0:24:4 or "
                         f"tau=0:0.3:0.05") from None
    if step <= 0 or stop < start:
        raise DittoError(f"--sweep {text!r}: needs START <= STOP and STEP > 0")
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    is_int = all(isinstance(v, int) for v in (start, stop, step))
    out = []
    for i in range(count):
        v = start + i * step
        out.append(str(v) if is_int else f"{round(v, 10):g}")
    return out


def _number(text: str):
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return float(text)


def make_setup(loaded, report, *, spec: str, steps: int, batch: int, inputs: str | None = None,
               max_inputs: int = 64, frame_stride: int = 4, random_samples: int | None = None) -> Setup:
    """The workloads for a model loaded from MODEL spec `spec`: `report` (of an optimize() call)
    names its timestep input; a diffusion model runs loops of `steps` steps.

    Timed: the first `batch` of `inputs`, else the example inputs (at least `batch` of them). Agreement:
    every `inputs` sample; without them, `random_samples` random inputs, or the timed inputs when None."""
    base = Workload.of(loaded.model, loaded.example_inputs, loaded.example_kwargs,
                       timestep_input=report.timestep_input, steps=steps)
    if inputs:
        with stage(f"read inputs from {inputs}"):
            cal = load_inputs(inputs, base, loaded.model, family=loaded.family, model_dir=_model_dir(spec),
                              max_inputs=max_inputs, frame_stride=frame_stride)
        notes = [f"{cal.batch} inputs from {os.path.basename(os.path.normpath(inputs))}"]
        timed = cal.chunks(batch)[0]
    elif random_samples:
        cal, timed = random_inputs(base, random_samples), base
        notes = [f"{random_samples} random inputs"]
    else:  # the example inputs, drawn anew at `batch` samples where they hold fewer (a FILE.py's own, or loaded
        # at batch 1 for a cheap capture)
        cal = timed = base if base.batch >= batch else random_inputs(base, batch)
        notes = [f"{cal.batch} random example inputs"]
    kind = "diffusion"
    if not base.diffusion:
        with torch.inference_mode():
            kind = kind_of(base.run(call_module(loaded.model)), False)
    return Setup(loaded, timed, cal.chunks(batch), kind, report.timestep_input, report, notes)


def plot(result: dict, agreements, path: str) -> None:
    """Speed-up (with its spread) and the FLOP bound against agreement, each point labelled by its setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = result["metric"]
    key = result["sweep"]
    xs = [agr.value(metric) for agr in agreements]
    finite = [x for x in xs if math.isfinite(x)]
    top = (max(finite) + 3.0) if finite else 100.0  # where an identical output (PSNR +inf) is drawn
    xs_drawn = [x if math.isfinite(x) else top for x in xs]
    speed = [r["speedup"] for r in result["results"]]
    low = [r["speedup"] - min(r["ratios"]) for r in result["results"]]
    high = [max(r["ratios"]) - r["speedup"] for r in result["results"]]
    bound = [r["flop_ratio"] for r in result["results"]]
    labels = []
    for r, x in zip(result["results"], xs):
        label = f"{key}={r['sweep_value']}" if key else r["spec"]
        labels.append(label + (" (identical)" if not math.isfinite(x) else ""))

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    ax.errorbar(xs_drawn, speed, yerr=[low, high], fmt="o-", color="tab:blue", capsize=3,
                label="speed-up (median; bars: range over rounds)")
    if any(b for b in bound):
        ax.plot([x for x, b in zip(xs_drawn, bound) if b], [b for b in bound if b], "s:", color="tab:gray",
                markerfacecolor="none", label="FLOP bound")
    for x, y, text in zip(xs_drawn, speed, labels):
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 6), fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    names = {"cosine": "cosine similarity to the untouched output", "top1": "top-1 agreement with the untouched model",
             "psnr": "PSNR of the final latent vs untouched (dB)"}
    ax.set_xlabel(f"agreement: {names[metric]}")
    ax.set_ylabel(f"speed-up over untouched (median of {result['rounds']} rounds)")
    what = f", {result['steps']} steps" if result.get("steps") else ""
    ax.set_title(f"{result['model']}: {result['runtime']}, batch {result['batch']}{what}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
