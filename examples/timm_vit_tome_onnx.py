"""ToMe on a timm ViT, exported to ONNX and run in onnxruntime.

    python examples/timm_vit_tome_onnx.py --weights vit_base_patch16_224.safetensors --r 16
    python examples/timm_vit_tome_onnx.py --fast          # a tiny random ViT (what CI runs)

Full mode builds timm's `vit_base_patch16_224` (or `--model NAME`) and loads `--weights` (a
safetensors file or a torch state dict; without it the weights are random and only the speed means
anything). Where you have the Hugging Face hub, write the file once with
`safetensors.torch.save_file(timm.create_model(NAME, pretrained=True).state_dict(), FILE)`.

Steps: merge r tokens per block (ToMe), export the merged model to ONNX (checked against PyTorch in
onnxruntime as it is written), run it in onnxruntime, and compare logits and speed with the untouched
model: PyTorch and onnxruntime, timed interleaved, median of the per-round ratios.
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
from dittofx.measure.timing import interleaved
from dittofx.models import resolve
from dittofx.runtime import OnnxRuntimeRunner


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name")
    p.add_argument("--weights", help="safetensors file or torch state dict for the model")
    p.add_argument("--r", type=int, default=16, help="tokens merged per block (default 16)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--out", help="folder to keep the ONNX files in (default: a temporary folder)")
    p.add_argument("--fast", action="store_true", help="tiny random ViT, 2 rounds (CI)")
    args = p.parse_args(argv)
    progress.set_quiet(True)  # the example prints its own summary

    if args.fast:
        spec, r, batch, rounds = "zoo:vit", 8, 2, 2
    else:
        spec, r, batch, rounds = f"timm:{args.model}", args.r, args.batch, args.rounds
    loaded = resolve(spec, weights=args.weights, batch=batch)
    model, (x,) = loaded.model, loaded.example_inputs
    print(f"{spec}: input {tuple(x.shape)}, {'weights ' + args.weights if args.weights else 'random weights'}")

    # 1. ToMe: capture, find the attention blocks, merge r tokens in each
    opt = dittofx.optimize(model, [f"tome:r={r}"], example_inputs=(x,))
    tokens = [b.tokens for b in opt.report.blocks]
    print(f"ToMe r={r}: tokens entering each block {tokens}")

    # 2. export both to ONNX (each file is checked in onnxruntime before it is written)
    out_dir = args.out or tempfile.mkdtemp(prefix="dittofx-example-")
    os.makedirs(out_dir, exist_ok=True)
    untouched_onnx = dittofx.export_onnx(model, os.path.join(out_dir, "untouched.onnx"), example_inputs=(x,))
    tome_onnx = dittofx.export_onnx(opt, os.path.join(out_dir, "tome.onnx"), example_inputs=(x,))
    print(f"ONNX: {tome_onnx.path} (onnxruntime vs PyTorch: {tome_onnx.max_rel_diff:.1e}); "
          f"TensorRT-ready: {tome_onnx.trt_report.ok}")

    # 3. run in onnxruntime and compare with the untouched PyTorch model
    ort_untouched = OnnxRuntimeRunner(untouched_onnx.path)
    ort_tome = OnnxRuntimeRunner(tome_onnx.path)
    with torch.inference_mode():
        reference = model(x)
    (logits,) = ort_tome(x)
    print(f"onnxruntime ToMe vs PyTorch untouched: {agreement(logits, reference, 'classifier').describe()}")

    timings = interleaved({
        "PyTorch untouched": lambda: model(x),
        f"PyTorch ToMe r={r}": lambda: opt(x),
        "onnxruntime untouched": lambda: ort_untouched(x),
        f"onnxruntime ToMe r={r}": lambda: ort_tome(x),
    }, rounds=rounds, warmup=1)
    for name, t in timings.items():
        print(f"  {name:<26} {t.median * 1e3:8.1f} ms  {batch / t.median:8.1f} images/s  {t.speedup:.2f}x")
    print("speed-ups: median of per-round ratios to 'PyTorch untouched', rounds interleaved")
    if not args.out:
        import shutil

        shutil.rmtree(out_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
