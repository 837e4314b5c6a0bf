"""`dittofx demo`: the main job on a built-in default, timm ViT-B/16.

ToMe r=16 -> export to ONNX -> check in onnxruntime -> a before/after table of latency and output
agreement, untouched against ToMe, in eager PyTorch and in onnxruntime.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from dittofx.errors import DittoError


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="ToMe on timm ViT-B/16, exported to ONNX, before/after table",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224",
                   help="timm model name (default vit_base_patch16_224), or any MODEL spec such as zoo:vit")
    p.add_argument("--weights", metavar="FILE", help="weights (safetensors or torch state dict); random otherwise")
    p.add_argument("--r", type=int, default=16, help="tokens merged per block (default 16)")
    p.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch and onnxruntime")
    p.add_argument("--out", metavar="DIR", help="keep the ONNX files in DIR (default: a temporary folder)")
    p.add_argument("--no-onnx", action="store_true", help="eager PyTorch only")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from dittofx.api import optimize
    from dittofx.cli import progress
    from dittofx.measure.timing import interleaved
    from dittofx.models import resolve

    if args.batch < 1 or args.rounds < 1 or args.r < 0:
        raise DittoError("--batch and --rounds must be at least 1 and --r at least 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = args.model if ":" in args.model else f"timm:{args.model}"
    with progress.stage(f"build {spec} ({'weights ' + args.weights if args.weights else 'random weights'})"):
        loaded = resolve(spec, weights=args.weights, batch=args.batch)
    model, inputs = loaded.model, loaded.example_inputs
    with progress.stage(f"capture, analyse and merge tokens (tome:r={args.r})"):
        opt = optimize(model, [f"tome:r={args.r}"], inputs)
    if not progress.is_quiet():
        merged = [b for b in opt.report.blocks if b.actions]
        progress.info(f"  {len(opt.report.blocks)} blocks found, ToMe in {len(merged)}: "
                      f"{opt.report.blocks[0].tokens} tokens in, "
                      f"{opt.report.blocks[-1].tokens} tokens into the last block")
    runners = {"eager untouched": lambda: model(*inputs), f"eager ToMe r={args.r}": lambda: opt(*inputs)}
    out_dir = args.out or tempfile.mkdtemp(prefix="dittofx-demo-")
    try:
        if not args.no_onnx:
            runners.update(_onnx_runners(args, model, opt, inputs, out_dir))
        with torch.inference_mode():
            reference = model(*inputs)
            outputs = {name: _first(fn()) for name, fn in runners.items()}
        with progress.bar(args.rounds, f"timing {len(runners)} runtimes, interleaved") as advance:
            timings = interleaved(runners, rounds=args.rounds, warmup=1, on_round=advance)
    finally:
        if not args.out:
            shutil.rmtree(out_dir, ignore_errors=True)
    _print_table(timings, outputs, _first(reference), args.batch)
    if args.out:
        print(f"ONNX files in {os.path.abspath(args.out)}")
    return 0


def _onnx_runners(args, model, opt, inputs, out_dir):
    from dittofx.cli import progress
    from dittofx.exporters.onnx import export_onnx
    from dittofx.runtime.onnxruntime import OnnxRuntimeRunner

    os.makedirs(out_dir, exist_ok=True)
    runners = {}
    for label, module, file in (("untouched", model, "untouched.onnx"), (f"ToMe r={args.r}", opt, "tome.onnx")):
        path = os.path.join(out_dir, file)
        with progress.stage(f"export {label} to ONNX and check it in onnxruntime"):
            result = export_onnx(module, path, example_inputs=inputs)
        progress.info(f"  {file}: max relative difference to PyTorch {result.max_rel_diff:.1e}")
        runner = OnnxRuntimeRunner(path, threads=args.threads)
        runners[f"onnxruntime {label}"] = (lambda r=runner: r(*inputs))
    return runners


def _first(output):
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (list, tuple)):
        return _first(output[0])
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def _print_table(timings, outputs, reference, batch: int) -> None:
    import torch.nn.functional as F
    from rich.console import Console
    from rich.table import Table

    table = Table(title="dittofx demo: before / after", title_justify="left")
    for col in ("runtime", "latency (ms)", "images/s", "speed-up", "cosine", "top-1 agree"):
        table.add_column(col, justify="left" if col == "runtime" else "right")
    ref = reference.float().flatten(1)
    for name, t in timings.items():
        out = outputs[name].float().flatten(1)
        cos = F.cosine_similarity(out, ref, dim=1).mean().item()
        top1 = (out.argmax(1) == ref.argmax(1)).float().mean().item()
        table.add_row(name, f"{t.median * 1e3:.1f}", f"{batch / t.median:.1f}", f"{t.speedup:.2f}x",
                      f"{cos:.4f}", f"{top1:.0%}")
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # piped or logged: no wrapping of runtime names
    console.print(table)
    print("speed-up: median of per-round ratios to 'eager untouched', rounds interleaved")
