"""`dittofx bench`: the untouched and the optimized model, timed interleaved, with output agreement.

    dittofx bench timm:vit_base_patch16_224 --weights vit_b16.safetensors --pass tome:r=16 --batch 16
    dittofx bench zoo:vit --pass tome --sweep r=0:24:4 --plot tome.png --json tome.json
    dittofx bench zoo:latte --pass pab --steps 20 --sweep spatial=1:4:1
    dittofx bench zoo:vit --pass tome:r=8 --runtime onnxruntime

Timing: the untouched model and every optimized setting run in turn (A B C A B C ...), `--rounds`
times after a warm-up; the table quotes medians, and the speed-up is the median of the per-round
ratios, with the spread (half the range of those ratios: differences below it are noise). Next to
it, the FLOP-ratio bound (matmuls, convolutions and attention counted eagerly; `dittofx.flops`).

Agreement with the untouched model (`dittofx.agreement`): cosine and top-1 for classifiers,
cosine for other encoders, PSNR of the final latent for diffusion models. A diffusion model (its
graph has a timestep input) is benched over a denoising loop of `--steps` steps, timesteps evenly
from 999 down (`dittofx.workload`), so that PAB's timestep window and broadcast ranges take effect;
a latency is one whole loop. Agreement is measured on `--inputs` where given (a .pt/.safetensors
file or a folder of images/videos), else on the random example inputs.

`--sweep KEY=START:STOP:STEP` (STOP included) or `KEY=V1,V2,...` varies one option of the pass
(`r`, `tau`, `spatial`, ...) and draws speed-up against agreement, one labelled point per value
(`--plot`, PNG). `--json` writes every number.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field

from dittofx.cli.common import add_model_args, add_pass_args, load_model
from dittofx.errors import DittoError

RUNTIMES = ("eager", "compile", "onnxruntime", "tensorrt")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="time the untouched and the optimized model interleaved; speed-up, FLOP bound, agreement",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    add_pass_args(p)
    p.add_argument("--runtime", choices=RUNTIMES, default="eager",
                   help="eager PyTorch (default), torch.compile, onnxruntime (both exported to ONNX), tensorrt "
                        "(needs tensorrt and an NVIDIA GPU)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds before timing (default 1)")
    add_workload_args(p)
    p.add_argument("--metric", choices=("cosine", "top1", "psnr"), default=None,
                   help="agreement on the plot's x axis (default: psnr for diffusion models, else cosine)")
    p.add_argument("--sweep", metavar="KEY=START:STOP:STEP",
                   help="vary one pass option, e.g. r=0:24:4 (STOP included), tau=0,0.05,0.1, spatial=1:4:1")
    p.add_argument("--plot", metavar="OUT.png", help="speed-up against agreement, PNG (default with --sweep: "
                   "bench-MODEL-KEY.png)")
    p.add_argument("--json", dest="json_out", metavar="OUT.json", help="write every number as JSON")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch and onnxruntime")
    p.set_defaults(run=run)


def add_workload_args(p) -> None:
    """Options shared by bench and tune: the denoising loop and the inputs agreement is measured on."""
    p.add_argument("--steps", type=int, default=10,
                   help="denoising steps for diffusion models, timesteps evenly from 999 down (default 10)")
    p.add_argument("--inputs", metavar="PATH", help="inputs for agreement: a .pt/.pth/.safetensors file of input "
                   "tensors, or a folder of images or videos (resized and normalised for the model)")
    p.add_argument("--max-inputs", type=int, default=64, help="use at most this many inputs from --inputs (default 64)")
    p.add_argument("--frame-stride", type=int, default=4,
                   help="frames between the sampled frames of a video clip from --inputs (default 4)")


# ---------------------------------------------------------------------------------------------
# shared with tune


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


def check_common(args) -> None:
    if args.steps < 1:
        raise DittoError(f"--steps must be at least 1, got {args.steps}")
    if args.max_inputs < 1:
        raise DittoError(f"--max-inputs must be at least 1, got {args.max_inputs}")
    if args.frame_stride < 1:
        raise DittoError(f"--frame-stride must be at least 1, got {args.frame_stride}")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise DittoError(f"--threads must be at least 1, got {args.threads}")
    if args.inputs is not None and not os.path.exists(args.inputs):
        raise DittoError(f"--inputs {args.inputs}: no such file or folder (accepted: a .pt/.pth/.safetensors file "
                         f"of input tensors, or a folder of images or videos)")


def _model_dir(spec: str) -> str | None:
    prefix, _, rest = spec.partition(":")
    if prefix in ("hf", "diffusers"):
        path = os.path.expanduser(rest.partition("#")[0].strip())
        if os.path.isdir(path):
            return path
    return None


def check_writable(path: str, flag: str) -> str:
    """The absolute path, if a file can be written there; checked before any work is done."""
    path = os.path.abspath(os.path.expanduser(path))
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise DittoError(f"{flag} {path} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise DittoError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise DittoError(f"{flag} {path}: the folder {folder} is not writable")
    return path


def write_atomic(path: str, write) -> None:
    """`write(tmp_path)`, then rename into place: nothing half-written is left at `path`."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".dittofx-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def measure_agreement(model, calibration, kind: str, call, reset=None, references: dict | None = None):
    """Agreement of `call` (a workload call of the optimized model) with the untouched `model` over every
    calibration workload; `references` caches the untouched outputs by position."""
    import torch

    from dittofx.agreement import combine
    from dittofx.workload import call_module

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
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------------------------------
# sweeps


def parse_sweep(text: str, base_specs: list[str]):
    """KEY=START:STOP:STEP or KEY=V1,V2,... over the first pass that has option KEY.

    Returns (key, index of the swept pass, [(label, [pass spec strings])])."""
    from dittofx.passes.spec import _split_options, _value, parse_pass, pass_class

    key, eq, values_text = text.partition("=")
    key = key.strip()
    if not eq or not key or not values_text.strip():
        raise DittoError(f"--sweep {text!r} is not KEY=START:STOP:STEP or KEY=V1,V2,... (e.g. r=0:24:4, tau=0,0.1,0.2)")
    passes = [parse_pass(s) for s in base_specs]
    index = None
    for i, p in enumerate(passes):
        if key in inspect.signature(type(p).__init__).parameters:
            index = i
            break
    if index is None:
        accepted = sorted({k for p in passes for k in inspect.signature(type(p).__init__).parameters if k != "self"})
        raise DittoError(f"--sweep {key}: no pass in {' '.join(base_specs)} has option {key!r}; accepted: "
                         f"{', '.join(accepted)}")
    values_text = values_text.strip()
    parts = _split_options(values_text)
    if len(parts) == 1 and values_text.count(":") == 2 and not values_text.startswith(("(", "[")):
        labels = _range(values_text, text)
    else:
        labels = parts
    base = passes[index]
    cls = pass_class(base.name)
    points = []
    for label in labels:
        value = _value(label)
        try:
            swept = cls(**{**base.options(), key: value})
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


# ---------------------------------------------------------------------------------------------
# runtimes


def _check_runtime(runtime: str) -> None:
    if runtime == "tensorrt":
        from dittofx.runtime import import_tensorrt, require_cuda

        import_tensorrt()
        require_cuda("--runtime tensorrt")
    elif runtime == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise DittoError("--runtime onnxruntime needs onnxruntime: pip install 'dittofx[onnx]'") from None


def _is_stateful(opt) -> bool:
    return opt.graph_module.meta.get("dittofx_runner") is not None


def _exported_runner(runtime, module, label, workload, out_dir, threads, model):
    """Export `module` for `runtime` into `out_dir`; returns (workload call, reset or None)."""
    from dittofx import progress
    from dittofx.workload import call_named

    file = "".join(c if c.isalnum() else "_" for c in label)[:60] or "model"
    if runtime == "onnxruntime" and getattr(module, "passes", None) is not None and _is_stateful(module):
        from dittofx.exporters.onnx_pab import export_pab_onnx
        from dittofx.runtime_pab import OnnxPABRunner

        folder = os.path.join(out_dir, file)
        with progress.stage(f"export {label} to ONNX (one file per broadcast pattern)"):
            export_pab_onnx(module, folder, workload.args, workload.kwargs,
                            timesteps=workload.timesteps() if workload.diffusion else None)
        runner = OnnxPABRunner(folder, threads=threads)
        return call_named(runner, model), runner.reset
    if runtime == "onnxruntime":
        from dittofx.exporters.onnx import export_onnx
        from dittofx.runtime import OnnxRuntimeRunner

        path = os.path.join(out_dir, f"{file}.onnx")
        with progress.stage(f"export {label} to ONNX"):
            export_onnx(module, path, example_inputs=workload.args, example_kwargs=workload.kwargs)
        return call_named(OnnxRuntimeRunner(path, threads=threads), model), None
    from dittofx.exporters.tensorrt import export_tensorrt
    from dittofx.runtime import TensorRTRunner

    path = os.path.join(out_dir, f"{file}.plan")
    with progress.stage(f"build a TensorRT engine of {label}"):
        export_tensorrt(module, path, workload.args, workload.kwargs)
    return call_named(TensorRTRunner(path), model), None


# ---------------------------------------------------------------------------------------------
# the command


def run(args) -> int:
    import torch

    from dittofx import progress
    from dittofx.agreement import check_metric, default_metric
    from dittofx.api import optimize
    from dittofx.flops import count_flops
    from dittofx.passes.spec import parse_pass
    from dittofx.timing import interleaved
    from dittofx.workload import call_module

    if not args.passes:
        raise DittoError("bench needs at least one --pass SPEC, e.g. --pass tome:r=16")
    if args.rounds < 1 or args.warmup < 0:
        raise DittoError(f"--rounds must be at least 1 and --warmup at least 0, got {args.rounds} and {args.warmup}")
    check_common(args)
    for spec in args.passes:
        parse_pass(spec)  # a bad spec fails before any work
    if args.sweep:
        key, _, points = parse_sweep(args.sweep, args.passes)
    else:
        key, points = None, [(None, list(args.passes))]
    json_out = check_writable(args.json_out, "--json") if args.json_out else None
    plot_out = args.plot
    if plot_out is None and args.sweep:
        plot_out = f"bench-{_slug(args.model)}-{key}.png"
    if plot_out is not None:
        if not plot_out.lower().endswith(".png"):
            raise DittoError(f"--plot {plot_out}: the plot is a PNG; give a file name ending in .png")
        plot_out = check_writable(plot_out, "--plot")
        _require_matplotlib()
    _check_runtime(args.runtime)
    if args.threads:
        torch.set_num_threads(args.threads)

    with progress.stage(f"load {args.model}" + (f" with {args.weights}" if args.weights else "")):
        loaded = load_model(args)
    optimized = []  # (sweep value, spec text, OptimizedModule)
    for label, specs in points:
        name = " ".join(specs)
        with progress.stage(f"capture and rewrite: {name}"):
            opt = optimize(loaded.model, specs, loaded.example_inputs, loaded.example_kwargs,
                           compile=args.runtime == "compile")
        if args.runtime == "tensorrt" and _is_stateful(opt):
            raise DittoError(f"--runtime tensorrt cannot run {name}: its state lives outside the graph "
                             f"(PAB's caches); bench PAB with --runtime eager, compile or onnxruntime")
        optimized.append((label, name, opt))
    su = make_setup(args, loaded, optimized[0][2].report)
    kind = su.kind
    metric = args.metric or default_metric(kind)
    check_metric(metric, kind)
    if args.inputs is None and (args.weights or args.pretrained or args.model.startswith(("hf:", "diffusers:"))):
        progress.warn("no --inputs: agreement is measured on random inputs, which says little about real weights; "
                      "pass --inputs with real images, videos or latents")

    model = loaded.model
    wl = su.workload
    out_dir = tempfile.mkdtemp(prefix="dittofx-bench-")
    try:
        # calls per runtime
        if args.runtime == "eager":
            base_call = call_module(model)
            calls = [(call_module(opt), opt.reset) for _, _, opt in optimized]
        elif args.runtime == "compile":
            compiled = torch.compile(model)
            base_call = call_module(compiled)
            calls = [(call_module(opt), opt.reset) for _, _, opt in optimized]
        else:
            base_call, _ = _exported_runner(args.runtime, model, "untouched", wl, out_dir, args.threads, model)
            calls = [_exported_runner(args.runtime, opt, name, wl, out_dir, args.threads, model)
                     for _, name, opt in optimized]

        # agreement: the runtime's optimized outputs against the eager untouched model
        references: dict = {}
        agreements = []
        with progress.bar(len(optimized), f"agreement ({su.notes[0]})") as advance:
            for (_, _, opt), (call, reset) in zip(optimized, calls):
                agreements.append(measure_agreement(model, su.calibration, kind, call, reset, references))
                advance()

        # the FLOP bound, counted eagerly on the timed inputs
        with progress.stage("count FLOPs"):
            base_flops = count_flops(lambda: wl.run(call_module(model)))
            flops = [count_flops(lambda o=opt: wl.run(eager_call(o), reset=o.reset)) for _, _, opt in optimized]

        # timing, interleaved
        fns = {"untouched": lambda: wl.run(base_call)}
        for (label, name, _), (call, reset) in zip(optimized, calls):
            fns[name] = (lambda c=call, r=reset: wl.run(c, reset=r))
        what = f"{wl.steps}-step loops" if wl.diffusion else f"batches of {wl.batch}"
        with progress.bar(args.rounds, f"timing {len(fns)} models, {what}, interleaved") as advance:
            timings = interleaved(fns, rounds=args.rounds, warmup=args.warmup, on_round=advance)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)

    rows = []
    base_t = timings["untouched"]
    for (label, name, _), agr, fl in zip(optimized, agreements, flops):
        t = timings[name]
        rows.append({
            "spec": name, "sweep_value": label, "latency_ms": t.median * 1e3, "throughput": wl.batch / t.median,
            "speedup": t.speedup, "spread": t.spread, "ratios": t.ratios, "flops": fl,
            "flop_ratio": base_flops / fl if fl else None,
            "agreement": agr.as_dict(), "seconds": t.seconds,
        })
    result = {
        "model": args.model, "name": loaded.name, "family": loaded.family, "kind": kind,
        "runtime": args.runtime, "batch": wl.batch, "rounds": args.rounds, "warmup": args.warmup,
        "steps": wl.steps if wl.diffusion else None, "timesteps": wl.timesteps() if wl.diffusion else None,
        "metric": metric, "inputs": args.inputs or "random", "agreement_inputs": su.notes[0],
        "agreement_samples": agreements[0].samples,
        "sweep": key, "machine": machine(),
        "baseline": {"latency_ms": base_t.median * 1e3, "throughput": wl.batch / base_t.median, "flops": base_flops,
                     "seconds": base_t.seconds},
        "results": rows,
    }
    _print_table(result, agreements)
    if json_out:
        write_atomic(json_out, lambda tmp: _write_json(tmp, result))
        print(f"wrote {json_out}")
    if plot_out:
        write_atomic(plot_out, lambda tmp: plot(result, agreements, tmp))
        print(f"wrote {plot_out}")
    return 0


def make_setup(args, loaded, report, random_samples: int | None = None) -> Setup:
    """The workloads for a loaded model: `report` (of an optimize() call) names its timestep input.

    Timed: the first --batch of --inputs, else the example inputs. Agreement: every --inputs sample;
    without --inputs, `random_samples` random inputs, or the example inputs when None."""
    import torch

    from dittofx import progress
    from dittofx.agreement import kind_of
    from dittofx.workload import Workload, call_module, load_inputs, random_inputs

    base = Workload.of(loaded.model, loaded.example_inputs, loaded.example_kwargs,
                       timestep_input=report.timestep_input, steps=args.steps)
    if args.inputs:
        with progress.stage(f"read inputs from {args.inputs}"):
            cal = load_inputs(args.inputs, base, loaded.model, family=loaded.family, model_dir=_model_dir(args.model),
                              max_inputs=args.max_inputs, frame_stride=args.frame_stride)
        notes = [f"{cal.batch} inputs from {os.path.basename(os.path.normpath(args.inputs))}"]
        timed = cal.chunks(args.batch)[0]
    elif random_samples:
        cal, timed = random_inputs(base, random_samples), base
        notes = [f"{random_samples} random inputs"]
    else:
        cal = timed = base
        notes = [f"{base.batch} random example inputs"]
    kind = "diffusion"
    if not base.diffusion:
        with torch.inference_mode():
            kind = kind_of(base.run(call_module(loaded.model)), False)
    return Setup(loaded, timed, cal.chunks(args.batch), kind, report.timestep_input, report, notes)


def _slug(text: str) -> str:
    text = text.rstrip("/").split("/")[-1].split(":")[-1]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "model"


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DittoError("--plot and --sweep need matplotlib: pip install matplotlib") from None


def _write_json(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2, allow_nan=False, default=_json_default)
        f.write("\n")


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _print_table(result: dict, agreements) -> None:
    from rich.console import Console
    from rich.table import Table

    from dittofx.agreement import format_psnr

    kind = result["kind"]
    unit = "samples/s" if kind == "diffusion" else "items/s"
    what = f"{result['steps']}-step loop" if kind == "diffusion" else "forward"
    title = (f"dittofx bench {result['model']}: {result['runtime']}, batch {result['batch']}, "
             f"median of {result['rounds']} interleaved rounds")
    table = Table(title=title, title_justify="left")
    cols = ["setting", f"latency/{what} (ms)", unit, "speed-up", "FLOP bound", "cosine"]
    if kind == "classifier":
        cols.append("top-1 agree")
    if kind == "diffusion":
        cols.append("PSNR")
    for c in cols:
        if c == "setting":
            table.add_column(c, justify="left", overflow="fold")
        else:
            table.add_column(c, justify="right", no_wrap=True)
    base = result["baseline"]
    row = ["untouched", f"{base['latency_ms']:.1f}", f"{base['throughput']:.1f}", "1.00x", "1.00x", "1.0000"]
    row += ["100.0%"] if kind == "classifier" else []
    row += ["identical"] if kind == "diffusion" else []
    table.add_row(*row)
    for r, agr in zip(result["results"], agreements):
        bound = f"{r['flop_ratio']:.2f}x" if r["flop_ratio"] else "-"
        setting = r["spec"]
        if result["sweep"] and f"{result['sweep']}=" not in setting:
            setting += f" ({result['sweep']}={r['sweep_value']})"
        row = [setting, f"{r['latency_ms']:.1f}", f"{r['throughput']:.1f}", f"{r['speedup']:.2f}x ±{r['spread']:.2f}",
               bound, f"{agr.cosine:.4f}"]
        if kind == "classifier":
            row.append(f"{agr.top1:.1%}")
        if kind == "diffusion":
            row.append(format_psnr(agr.psnr))
        table.add_row(*row)
    Console(width=max(120, Console().width)).print(table)
    print(f"speed-up: median of per-round ratios to 'untouched' (± half their range: below that is noise); "
          f"FLOP bound: untouched / optimized FLOPs; agreement on {result['agreement_inputs']}")


# ---------------------------------------------------------------------------------------------
# the plot


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
