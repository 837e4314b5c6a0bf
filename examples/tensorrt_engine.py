"""Build and run a TensorRT engine of a ViT with ToMe.

    python examples/tensorrt_engine.py --weights vit_base_patch16_224.safetensors --fp16 --out vit_tome.plan
    python examples/tensorrt_engine.py --fast          # a tiny random ViT (what CI runs)

Needs: an NVIDIA GPU with its driver, and TensorRT 10 or 11 for Python (`pip install 'dittofx[tensorrt]'`,
i.e. the `tensorrt` package with its libraries). Where either is missing, this example says what is
missing and exits with status 0; in full mode it first still exports the ONNX and runs dittofx's
TensorRT-readiness check (what TensorRT's parser would refuse), which needs neither.

Steps: ToMe (r tokens merged per block) -> ONNX (checked in onnxruntime) -> TensorRT engine with a
dynamic-batch optimization profile (fp16 on request) -> TensorRTRunner on the GPU, compared with
PyTorch and timed against an engine of the untouched model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

import dittofx
from dittofx.cli import progress
from dittofx.measure.agreement import agreement
from dittofx.models import resolve


def tensorrt_missing() -> str | None:
    """What this machine lacks for TensorRT, or None."""
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError or a broken install (libnvinfer missing)
        why = str(e).splitlines()[0] if str(e) else ""
        return f"the tensorrt package does not import ({type(e).__name__}: {why}); install it with " \
               f"pip install 'dittofx[tensorrt]'"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False)"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name")
    p.add_argument("--weights", help="safetensors file or torch state dict for the model")
    p.add_argument("--r", type=int, default=16, help="ToMe tokens merged per block (default 16)")
    p.add_argument("--batch", type=int, default=8, help="example batch; the engine takes 1 to 4x this")
    p.add_argument("--fp16", action="store_true", help="a float16 engine")
    p.add_argument("--out", help="where to write the ToMe engine (default: a temporary folder)")
    p.add_argument("--fast", action="store_true", help="tiny random ViT (CI)")
    args = p.parse_args(argv)
    progress.set_quiet(True)  # the example prints its own summary

    with tempfile.TemporaryDirectory(prefix="dittofx-trt-") as work:
        return run(args, work)


def run(args, work: str) -> int:
    missing = tensorrt_missing()
    if missing and args.fast:
        print(f"TensorRT engine skipped: {missing}. Building an engine needs an NVIDIA GPU and TensorRT 10 or 11.")
        return 0
    spec, r, batch = ("zoo:vit", 8, 2) if args.fast else (f"timm:{args.model}", args.r, args.batch)
    loaded = resolve(spec, weights=args.weights, batch=batch)
    model, (x,) = loaded.model, loaded.example_inputs
    opt = dittofx.optimize(model, [f"tome:r={r}"], example_inputs=(x,))

    onnx = dittofx.export_onnx(opt, os.path.join(work, "tome.onnx"), example_inputs=(x,))
    print(f"ONNX of {spec} with ToMe r={r}: onnxruntime vs PyTorch {onnx.max_rel_diff:.1e}")
    report = onnx.trt_report
    print(f"TensorRT readiness: {'ready' if report.ok else 'NOT ready'} ({len(report.errors)} errors, "
          f"{len(report.warnings)} warnings; `dittofx check-trt FILE` lists them)")
    for finding in report.errors:
        print(f"  {finding}")

    if missing:
        print(f"TensorRT engine skipped: {missing}. Building an engine needs an NVIDIA GPU and TensorRT 10 or 11; "
              f"the ONNX above is what it would be built from.")
        return 0

    from dittofx.exporters.tensorrt import build_engine, export_tensorrt
    from dittofx.measure.timing import interleaved
    from dittofx.runtime import TensorRTRunner

    engine_path = args.out or os.path.join(work, "tome.plan")
    profile = (1, batch, 4 * batch)
    built = build_engine(onnx.path, engine_path, fp16=args.fp16, batch=profile)
    print(f"engine: {built}")
    base = export_tensorrt(model, os.path.join(work, "untouched.plan"), (x,), fp16=args.fp16, batch=profile)
    tome_engine, untouched_engine = TensorRTRunner(engine_path), TensorRTRunner(base.path)

    with torch.inference_mode():
        reference = model(x)
    (logits,) = tome_engine(x)
    print(f"TensorRT ToMe vs PyTorch untouched: {agreement(logits.float().cpu(), reference, 'classifier').describe()}")
    xc = x.cuda()
    timings = interleaved({"TensorRT untouched": lambda: untouched_engine(xc),
                           f"TensorRT ToMe r={r}": lambda: tome_engine(xc)}, rounds=5, warmup=2, repeat=10)
    for name, t in timings.items():
        print(f"  {name:<22} {t.median * 1e3:8.2f} ms  {batch / t.median:9.1f} images/s  {t.speedup:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
