"""`dittofx bench`: the untouched and the optimized model, timed interleaved, with output agreement.

    dittofx bench timm:vit_base_patch16_224 --weights vit_b16.safetensors --pass tome:r=16 --batch 16
    dittofx bench zoo:vit --pass tome --sweep r=0:24:4 --plot tome.png --json tome.json
    dittofx bench zoo:latte --pass pab --steps 20 --sweep spatial=1:4:1
    dittofx bench zoo:vit --pass tome:r=8 --runtime onnxruntime
    dittofx bench zoo:latte --pass sp --pass pab --nproc 2

Timing: the untouched model and every optimized setting run in turn (A B C A B C ...), `--rounds`
times after a warm-up; the table quotes medians, and the speed-up is the median of the per-round
ratios, with the spread (half the range of those ratios: differences below it are noise). Next to
it, the FLOP-ratio bound (matmuls, convolutions and attention counted eagerly; `dittofx.measure.flops`).
A forward is timed at batch 8 unless `--batch` says otherwise (at batch 1 a small model runs in a few
milliseconds, where fixed per-call costs and noise hide what a pass saves), a diffusion loop at
batch 1; a timed run under 10 ms is warned about.

Agreement with the untouched model (`dittofx.measure.agreement`): cosine and top-1 for classifiers,
cosine for other encoders, PSNR of the final latent for diffusion models. A diffusion model (its
graph has a timestep input) is benched over a denoising loop of `--steps` steps, timesteps evenly
from 999 down (`dittofx.measure.workload`), so that PAB's timestep window and broadcast ranges take effect;
a latency is one whole loop. Agreement is measured on `--inputs` where given (a .pt/.safetensors
file or a folder of images/videos), else on the random example inputs.

`--nproc N` with `--pass sp` (sequence parallelism) starts N processes here (gloo, one thread each)
that run this command together: each times the untouched model alone and its share of the split one
at the same moments, so the speed-up is one process against N, and the FLOP bound is the untouched
model's FLOPs over one process's share; rank 0 prints the table, with the collectives and the bytes
each process sent per call (a broadcast step of PAB sends less) and writes the files.

`--sweep KEY=START:STOP:STEP` (STOP included) or `KEY=V1,V2,...` varies one option of the pass
(`r`, `tau`, `spatial`, ...) and draws speed-up against agreement, one labelled point per value
(`--plot`, PNG). `--json` writes every number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile

from dittofx.cli.common import add_model_args, add_pass_args, load_model, writable
from dittofx.errors import DittoError

RUNTIMES = ("eager", "compile", "onnxruntime", "tensorrt")
DEFAULT_BATCH = 8  # a forward timed at batch 1 is mostly fixed costs and noise for small models


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="time the untouched and the optimized model interleaved; speed-up, FLOP bound, agreement",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    _timed_batch_default(p)
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
    p.add_argument("--nproc", type=int, default=1, help="processes for sequence parallelism (needs --pass sp): "
                   "started here over gloo, one thread each (default 1)")
    p.set_defaults(run=run)


def _timed_batch_default(p) -> None:
    """bench's --batch: what is timed; by default 8 for a forward, 1 for a diffusion loop (decided after capture)."""
    batch = next(a for a in p._actions if a.dest == "batch")
    batch.default = None
    batch.help = (f"batch size timed (default {DEFAULT_BATCH} for a forward, 1 for a diffusion loop; the model is "
                  f"captured at the batch given, or 1)")


def add_workload_args(p) -> None:
    """Options shared by bench and tune: the denoising loop and the inputs agreement is measured on."""
    p.add_argument("--steps", type=int, default=10,
                   help="denoising steps for diffusion models, timesteps evenly from 999 down (default 10)")
    p.add_argument("--inputs", metavar="PATH", help="inputs for agreement: a .pt/.pth/.safetensors file of input "
                   "tensors, or a folder of images or videos (resized and normalised for the model)")
    p.add_argument("--max-inputs", type=int, default=64, help="use at most this many inputs from --inputs (default 64)")
    p.add_argument("--frame-stride", type=int, default=4,
                   help="frames between the sampled frames of a video clip from --inputs (default 4)")


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


# ---------------------------------------------------------------------------------------------
# runtimes


def _check_runtime(runtime: str) -> None:
    if runtime == "tensorrt":
        from dittofx.runtime.tensorrt import import_tensorrt, require_cuda

        import_tensorrt()
        require_cuda("--runtime tensorrt")
    elif runtime == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise DittoError("--runtime onnxruntime needs onnxruntime: pip install 'dittofx[onnx]'") from None


def _exported_runner(runtime, module, label, workload, out_dir, threads, model):
    """Export `module` for `runtime` into `out_dir`; returns (workload call, reset or None)."""
    from dittofx.cli import progress
    from dittofx.measure.workload import call_named

    file = "".join(c if c.isalnum() else "_" for c in label)[:60] or "model"
    if runtime == "onnxruntime" and getattr(module, "stateful", False):
        from dittofx.exporters.onnx_pab import export_pab_onnx
        from dittofx.runtime.onnxruntime import OnnxPABRunner

        folder = os.path.join(out_dir, file)
        with progress.stage(f"export {label} to ONNX (one file per broadcast pattern)"):
            export_pab_onnx(module, folder, workload.args, workload.kwargs,
                            timesteps=workload.timesteps() if workload.diffusion else None)
        runner = OnnxPABRunner(folder, threads=threads)
        return call_named(runner, model), runner.reset
    if runtime == "onnxruntime":
        from dittofx.exporters.onnx import export_onnx
        from dittofx.runtime.onnxruntime import OnnxRuntimeRunner

        path = os.path.join(out_dir, f"{file}.onnx")
        with progress.stage(f"export {label} to ONNX"):
            export_onnx(module, path, example_inputs=workload.args, example_kwargs=workload.kwargs)
        return call_named(OnnxRuntimeRunner(path, threads=threads), model), None
    from dittofx.exporters.tensorrt import export_tensorrt
    from dittofx.runtime.tensorrt import TensorRTRunner

    path = os.path.join(out_dir, f"{file}.plan")
    with progress.stage(f"build a TensorRT engine of {label}"):
        export_tensorrt(module, path, workload.args, workload.kwargs)
    return call_named(TensorRTRunner(path), model), None


# ---------------------------------------------------------------------------------------------
# the command


def run(args) -> int:
    import torch

    from dittofx.api import optimize
    from dittofx.cli import progress
    from dittofx.exporters.files import write_atomic
    from dittofx.measure.agreement import check_metric, default_metric
    from dittofx.measure.bench import eager_call, machine, measure_agreement, parse_sweep, plot
    from dittofx.measure.flops import count_flops
    from dittofx.measure.timing import MIN_TIMED_SECONDS, interleaved
    from dittofx.measure.workload import call_module
    from dittofx.passes.spec import parse_pass

    if not args.passes:
        raise DittoError("bench needs at least one --pass SPEC, e.g. --pass tome:r=16")
    if args.rounds < 1 or args.warmup < 0:
        raise DittoError(f"--rounds must be at least 1 and --warmup at least 0, got {args.rounds} and {args.warmup}")
    check_common(args)
    for spec in args.passes:
        parse_pass(spec)  # a bad spec fails before any work
    if args.nproc != 1:
        return _launch(args)
    if args.sweep:
        key, _, points = parse_sweep(args.sweep, args.passes)
    else:
        key, points = None, [(None, list(args.passes))]
    silent = getattr(args, "silent", False)  # a process of --nproc other than rank 0: rank 0 writes the files
    json_out = writable(args.json_out, "--json") if args.json_out and not silent else None
    plot_out = args.plot
    if silent:
        plot_out = None
    elif plot_out is None and args.sweep:
        plot_out = f"bench-{_slug(args.model)}-{key}.png"
    if plot_out is not None:
        if not plot_out.lower().endswith(".png"):
            raise DittoError(f"--plot {plot_out}: the plot is a PNG; give a file name ending in .png")
        plot_out = writable(plot_out, "--plot")
        _require_matplotlib()
    _check_runtime(args.runtime)
    if args.threads:
        torch.set_num_threads(args.threads)

    with progress.stage(f"load {args.model}" + (f" with {args.weights}" if args.weights else "")):
        loaded = load_model(argparse.Namespace(**{**vars(args), "batch": 1 if args.batch is None else args.batch}))
    if _world() > 1:
        _same_weights(loaded.model)
    optimized = []  # (sweep value, spec text, OptimizedModule)
    for label, specs in points:
        name = " ".join(specs)
        with progress.stage(f"capture and rewrite: {name}"):
            opt = optimize(loaded.model, specs, loaded.example_inputs, loaded.example_kwargs,
                           compile=args.runtime == "compile", check=args.check)
        if args.runtime == "tensorrt" and opt.stateful:
            raise DittoError(f"--runtime tensorrt cannot run {name}: its state lives outside the graph "
                             f"(PAB's caches); bench PAB with --runtime eager, compile or onnxruntime")
        optimized.append((label, name, opt))
    report = optimized[0][2].report
    su = setup_for(args, loaded, report, batch=args.batch or (1 if report.timestep_input else DEFAULT_BATCH))
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
            for call, reset in calls:
                agreements.append(measure_agreement(model, su.calibration, kind, call, reset, references))
                advance()

        # the FLOP bound, counted eagerly on the timed inputs
        with progress.stage("count FLOPs"):
            base_flops = count_flops(lambda: wl.run(call_module(model)))
            flops = [count_flops(lambda o=opt: wl.run(eager_call(o), reset=o.reset)) for _, _, opt in optimized]
        _warn_nothing_dropped(optimized, args.inputs)  # RLT's counts of that eager run

        # timing, interleaved
        comm_from = [_comm_calls(opt) for _, _, opt in optimized]
        fns = {"untouched": lambda: wl.run(base_call)}
        for (_, name, _), (call, reset) in zip(optimized, calls):
            fns[name] = (lambda c=call, r=reset: wl.run(c, reset=r))
        what = f"{wl.steps}-step loops" if wl.diffusion else f"batches of {wl.batch}"
        with progress.bar(args.rounds, f"timing {len(fns)} models, {what}, interleaved") as advance:
            timings = interleaved(fns, rounds=args.rounds, warmup=args.warmup, on_round=advance)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)

    rows = []
    base_t = timings["untouched"]
    if base_t.median < MIN_TIMED_SECONDS:
        per = f"a {wl.steps}-step loop" if wl.diffusion else f"a forward at batch {wl.batch}"
        progress.warn(f"the untouched model takes {base_t.median * 1e3:.1f} ms for {per}: under "
                      f"{MIN_TIMED_SECONDS * 1e3:.0f} ms, fixed per-call costs and noise dominate the speed-up; "
                      f"time a larger batch, e.g. --batch {_larger_batch(wl.batch, base_t.median)}")
    for (label, name, opt), agr, fl, start in zip(optimized, agreements, flops, comm_from):
        t = timings[name]
        rows.append({
            "spec": name, "sweep_value": label, "latency_ms": t.median * 1e3, "throughput": wl.batch / t.median,
            "speedup": t.speedup, "spread": t.spread, "ratios": t.ratios, "flops": fl,
            "flop_ratio": base_flops / fl if fl else None,
            "agreement": agr.as_dict(), "seconds": t.seconds, "comm": _comm_per_call(opt, start),
        })
    result = {
        "model": args.model, "name": loaded.name, "family": loaded.family, "kind": kind,
        "runtime": args.runtime, "batch": wl.batch, "rounds": args.rounds, "warmup": args.warmup,
        "steps": wl.steps if wl.diffusion else None, "timesteps": wl.timesteps() if wl.diffusion else None,
        "metric": metric, "inputs": args.inputs or "random", "agreement_inputs": su.notes[0],
        "agreement_samples": agreements[0].samples,
        "sweep": key, "machine": machine(), "nproc": _world(),
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


# ---------------------------------------------------------------------------------------------
# sequence parallelism: --nproc


def _launch(args) -> int:
    """Run this command in `args.nproc` processes (dittofx.runtime.sp.launch); rank 0 prints."""
    from dittofx.passes.spec import parse_passes

    if args.nproc < 1:
        raise DittoError(f"--nproc must be at least 1, got {args.nproc}")
    if not any(p.name == "sp" for p in parse_passes(args.passes)):
        raise DittoError(f"--nproc {args.nproc} splits the model between processes, which the sequence-parallel pass "
                         f"does: add --pass sp (e.g. --pass sp --pass pab)")
    if args.runtime != "eager":
        raise DittoError(f"--nproc runs the split model eagerly; --runtime {args.runtime} is not accepted with it")
    if args.threads not in (None, 1):
        raise DittoError(f"--nproc runs one thread per process; --threads {args.threads} is not accepted with it")
    from dittofx import errors
    from dittofx.runtime.sp import LaunchError, launch

    try:
        codes = launch(_rank_run, args.nproc, vars(args), timeout=1800.0)
    except LaunchError as e:
        kind, _, message = (e.details.splitlines() or [str(e)])[0].partition(": ")
        if isinstance(getattr(errors, kind, None), type) and issubclass(getattr(errors, kind), DittoError):
            raise DittoError(message) from None
        raise DittoError(f"a bench process failed: {e}") from None
    return codes[0]


def _rank_run(rank: int, world: int, options: dict) -> int:
    """One process of `bench --nproc`: the same command, the model's weights taken from rank 0 (a random
    init is then the same everywhere); ranks other than 0 print nothing and write no file."""
    import contextlib

    from dittofx.cli import progress

    args = argparse.Namespace(**{**options, "nproc": 1, "threads": 1, "silent": rank != 0})
    progress.set_quiet(bool(rank) or options.get("quiet", False))
    with open(os.devnull, "w") as null, contextlib.ExitStack() as stack:
        if rank:
            stack.enter_context(contextlib.redirect_stdout(null))
            stack.enter_context(contextlib.redirect_stderr(null))
        with progress.library_log():
            return run(args)


def _same_weights(model) -> None:
    """Every process computes with rank 0's weights and buffers (a random init drawn in each would differ)."""
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in model.state_dict(keep_vars=True).values():
            dist.broadcast(tensor.data, 0)


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _comm_calls(opt) -> int:
    """How many forward calls `opt`'s sequence-parallel counters hold now (-1 without the sp pass)."""
    stats = opt.comm_stats
    return -1 if stats is None else len(stats.calls)


def _comm_per_call(opt, start: int) -> dict | None:
    """Collectives and bytes this rank sent, per forward call, over the calls since `start` (the timing)."""
    return None if opt.comm_stats is None else opt.comm_stats.mean(start)


def _larger_batch(batch: int, seconds: float) -> int:
    """A batch whose run takes about 5x the shortest time worth timing, a power of two."""
    from dittofx.measure.timing import MIN_TIMED_SECONDS

    want = batch * 5 * MIN_TIMED_SECONDS / max(seconds, 1e-6)
    return 1 << max(1, math.ceil(math.log2(max(want, 2))))


def _warn_nothing_dropped(optimized, inputs) -> None:
    """RLT that kept every token at every setting measured nothing: say so (random noise has no static tubelets)."""
    from dittofx.cli import progress

    counts = [getattr(opt.report.stats.get("rlt"), "kept", None) for _, _, opt in optimized]
    states = [opt.report.stats.get("rlt") for _, _, opt in optimized]
    if not any(c is not None for c in counts):
        return
    if all(c is None or all(k == s.total for k in c) for c, s in zip(counts, states)):
        where = ("random noise has no static tubelets; pass --inputs with real videos (a folder of clips or a "
                 ".pt file)") if inputs is None else f"the clips of {inputs} have no static tubelets at these settings"
        progress.warn(f"rlt dropped no tubelet at any setting (every token kept): {where}")


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

    from dittofx.measure.agreement import format_psnr

    kind = result["kind"]
    unit = "samples/s" if kind == "diffusion" else "items/s"
    what = f"{result['steps']}-step loop" if kind == "diffusion" else "forward"
    title = (f"dittofx bench {result['model']}: {result['runtime']}, batch {result['batch']}, "
             f"median of {result['rounds']} interleaved rounds")
    if result["nproc"] > 1:
        title += f"; {result['nproc']} processes (sp), the untouched model in each alone"
    table = Table(title=title, title_justify="left")
    cols = ["setting", f"latency/{what} (ms)", unit, "speed-up", "FLOP bound", "cosine"]
    if kind == "classifier":
        cols.append("top-1 agree")
    if kind == "diffusion":
        cols.append("PSNR")
    comm = any(r["comm"] for r in result["results"])
    if comm:
        cols += ["comm/call", "KiB/call"]
    for c in cols:
        if c == "setting":
            table.add_column(c, justify="left", overflow="fold", min_width=14)
        else:
            table.add_column(c, justify="right", no_wrap=True)
    base = result["baseline"]
    row = ["untouched", f"{base['latency_ms']:.1f}", f"{base['throughput']:.1f}", "1.00x", "1.00x", "1.0000"]
    row += ["100.0%"] if kind == "classifier" else []
    row += ["identical"] if kind == "diffusion" else []
    row += ["-", "-"] if comm else []
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
        if comm:
            c = r["comm"]
            row += [f"{c['calls_per_call']:.1f}", f"{c['bytes_per_call'] / 1024:.1f}"] if c else ["-", "-"]
        table.add_row(*row)
    Console(width=max(120, Console().width)).print(table)
    print(f"speed-up: median of per-round ratios to 'untouched' (± half their range: below that is noise); "
          f"FLOP bound: untouched / optimized FLOPs; agreement on {result['agreement_inputs']}")
    if comm:
        print("comm/call, KiB/call: collectives one process made and bytes it sent to the others per forward call "
              "(per denoising step), averaged over the timed runs")


def setup_for(args, loaded, report, random_samples: int | None = None, batch: int | None = None):
    """measure.bench.make_setup with the workload options of the command line (`batch`: instead of --batch)."""
    from dittofx.measure.bench import make_setup

    return make_setup(loaded, report, spec=args.model, steps=args.steps, batch=batch or args.batch, inputs=args.inputs,
                      max_inputs=args.max_inputs, frame_stride=args.frame_stride, random_samples=random_samples)
