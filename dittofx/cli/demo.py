"""`dittofx demo`: the main job on a built-in default, timm ViT-B/16.

ToMe r=16 -> export to ONNX -> check in onnxruntime -> a before/after table of latency and output
agreement, untouched against ToMe, in eager PyTorch and in onnxruntime.

The runs are reproducible: the weights (random unless --weights) are drawn with --seed and the
image inputs are those of benchmarks/tome.py (uniform pixels in [0, 1), seed + 1), so the default
run is that benchmark's model at batch 4. The runtimes are timed in turn (A B C D A B C D ...) for
--rounds rounds; the table quotes median latencies, and speed-ups as the median of the per-round
ratios with ± half their range: a difference below that is noise. A diffusion transformer
(diffusers:, zoo:dit, ...) gets ToMe's diffusion mode, merge and unmerge around each attention
(--ratio, default 0.5), with its example keyword inputs (timestep, conditioning).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from dittofx.errors import DittoError

DIFFUSION_RATIO = 0.5  # tomesd's default


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="ToMe on timm ViT-B/16, exported to ONNX, before/after table",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224",
                   help="timm model name (default vit_base_patch16_224), or any MODEL spec such as zoo:vit")
    p.add_argument("--weights", metavar="FILE", help="weights (safetensors or torch state dict); random otherwise")
    p.add_argument("--r", type=int, default=16, help="tokens merged per block (default 16)")
    p.add_argument("--ratio", type=float, default=None,
                   help=f"diffusion transformers: the share of tokens merged and unmerged around each attention "
                        f"(default {DIFFUSION_RATIO} for diffusers models)")
    p.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch and onnxruntime")
    p.add_argument("--out", metavar="DIR", help="keep the ONNX files in DIR (default: a temporary folder)")
    p.add_argument("--no-onnx", action="store_true", help="eager PyTorch only")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from dittofx.api import optimize
    from dittofx.cli import progress
    from dittofx.measure.agreement import main_tensor
    from dittofx.measure.timing import interleaved
    from dittofx.models import resolve

    if args.batch < 1 or args.rounds < 1 or args.r < 0:
        raise DittoError(f"--batch and --rounds must be at least 1 and --r at least 0, got {args.batch}, "
                         f"{args.rounds} and {args.r}")
    if args.ratio is not None and not 0 <= args.ratio < 1:
        raise DittoError(f"--ratio must be in [0, 1) (the share of tokens merged), got {args.ratio}")
    if args.threads is not None and args.threads < 1:
        raise DittoError(f"--threads must be at least 1, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = args.model if ":" in args.model else f"timm:{args.model}"
    torch.manual_seed(args.seed)  # timm and FILE.py models draw their random weights from the global generator
    with progress.stage(f"build {spec} ({'weights ' + args.weights if args.weights else 'random weights'})"):
        loaded = resolve(spec, weights=args.weights, batch=args.batch)
    model, inputs, kwargs = loaded.model, _benchmark_inputs(loaded.example_inputs, args.seed), loaded.example_kwargs
    ratio = args.ratio if args.ratio is not None else (DIFFUSION_RATIO if loaded.family == "diffusers" else None)
    tome, label = (f"tome:ratio={ratio}", f"ToMe ratio={ratio}") if ratio is not None else \
        (f"tome:r={args.r}", f"ToMe r={args.r}")
    with progress.stage(f"capture, analyse and merge tokens ({tome})"):
        opt = optimize(model, [tome], inputs, kwargs)
    if not progress.is_quiet():
        merged = [b for b in opt.report.blocks if b.actions]
        progress.info(f"  {len(opt.report.blocks)} blocks found, ToMe in {len(merged)}: "
                      f"{opt.report.blocks[0].tokens} tokens in, "
                      f"{opt.report.blocks[-1].tokens} tokens into the last block")
    runners = {"eager untouched": lambda: model(*inputs, **kwargs), f"eager {label}": lambda: opt(*inputs, **kwargs)}
    out_dir = args.out or tempfile.mkdtemp(prefix="dittofx-demo-")
    try:
        if not args.no_onnx:
            runners.update(_onnx_runners(args, model, opt, label, inputs, kwargs, out_dir))
        with torch.inference_mode():
            reference = main_tensor(model(*inputs, **kwargs))
            outputs = {name: main_tensor(fn()) for name, fn in runners.items()}
        with progress.bar(args.rounds, f"timing {len(runners)} runtimes, interleaved") as advance:
            timings = interleaved(runners, rounds=args.rounds, warmup=1, on_round=advance)
    finally:
        if not args.out:
            shutil.rmtree(out_dir, ignore_errors=True)
    _print_table(timings, outputs, reference, args.batch, args.rounds)
    if not args.weights:
        print("random weights: agreement shows the rewrite works, not the accuracy a trained model keeps "
              "(top-1 of near-uniform logits flips easily); pass --weights FILE for that")
    if args.out:
        print(f"ONNX files in {os.path.abspath(args.out)}")
    return 0


def _benchmark_inputs(example_inputs: tuple, seed: int) -> tuple:
    """benchmarks/tome.py's inputs where the main input is an image batch: uniform pixels in [0, 1)."""
    import torch

    x = example_inputs[0] if example_inputs else None
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        return tuple(example_inputs)
    pixels = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed + 1)).to(x.dtype)
    return (pixels, *example_inputs[1:])


def _onnx_runners(args, model, opt, label, inputs, kwargs, out_dir):
    from dittofx.cli import progress
    from dittofx.exporters.onnx import export_onnx
    from dittofx.measure.workload import call_named
    from dittofx.runtime.onnxruntime import OnnxRuntimeRunner

    os.makedirs(out_dir, exist_ok=True)
    runners = {}
    for name, module, file in (("untouched", model, "untouched.onnx"), (label, opt, "tome.onnx")):
        path = os.path.join(out_dir, file)
        with progress.stage(f"export {name} to ONNX and check it in onnxruntime"):
            result = export_onnx(module, path, example_inputs=inputs, example_kwargs=kwargs)
        progress.info(f"  {file}: max relative difference to PyTorch {result.max_rel_diff:.1e}")
        call = call_named(OnnxRuntimeRunner(path, threads=args.threads), model)
        runners[f"onnxruntime {name}"] = (lambda c=call: c(inputs, kwargs))
    return runners


def _print_table(timings, outputs, reference, batch: int, rounds: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from dittofx.measure.agreement import cosine, kind_of, top1

    classifier = kind_of(reference, diffusion=False) == "classifier"
    table = Table(title=f"dittofx demo: before / after (batch {batch}, median of {rounds} interleaved rounds)",
                  title_justify="left")
    for col in ("runtime", "latency (ms)", "images/s" if classifier else "samples/s", "speed-up", "cosine",
                "top-1 agree"):
        table.add_column(col, justify="left" if col == "runtime" else "right")
    for name, t in timings.items():
        out = outputs[name]
        table.add_row(name, f"{t.median * 1e3:.1f}", f"{batch / t.median:.1f}", f"{t.speedup:.2f}x ±{t.spread:.2f}",
                      f"{cosine(out, reference):.4f}", f"{top1(out, reference):.0%}" if classifier else "-")
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # piped or logged: no wrapping of runtime names
    console.print(table)
    print(f"speed-up: median of the per-round ratios to 'eager untouched' over {rounds} interleaved rounds, ± half "
          f"their range: a difference below it is noise")
