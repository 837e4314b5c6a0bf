"""RLT benchmark: tokens kept, speed-up over the untouched model, and the token-count bound.

    python benchmarks/rlt.py            # VideoMAE-S shape (384 wide, 12 layers), 16 x 224 x 224, 1568 tokens
    python benchmarks/rlt.py --quick    # a small VideoMAE, 2 rounds: a smoke test of the whole table

Clips (a batch of `--batch` clips each, normalised as VideoMAE expects):
- synthetic, with a known static fraction f: a fixed textured background plus camera noise
  (sigma 0.01, far below tau), and in a (1 - f) share of the patch cells a textured object that moves
  every frame. Exactly f of the tokens of tubelets 1.. repeat, so the kept share is
  (1 + (T' - 1)(1 - f)) / T';
- nothing static (f = 0): RLT must keep every token and cost (almost) nothing;
- the real clip benchmarks/data/cityCC0_224.mp4, shipped here (a slow pan at night from Kivy's
  examples, Expat licence: benchmarks/data/README.md; decoded with PyAV, 16 frames at stride 2, short
  side resized to the model's size and center-cropped), or another video with `--real FILE`.

Timing: the untouched model and the RLT model run interleaved (A B A B ...) after a warm-up, and the
speed-up is the median of the per-round ratios (dittofx.measure.timing). Eager PyTorch and onnxruntime (both
models exported with dittofx.export_onnx; RLT's tokenizer is inside the ONNX, NonZero + Gather).
The bound is the token-count ratio, all tokens / kept tokens: what the token-wise layers save; the
target is a speed-up >= 0.9 x the bound.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import dittofx
from dittofx.errors import DittoError
from dittofx.measure.inputs import read_video
from dittofx.measure.timing import interleaved
from dittofx.passes.rlt import RLT, keep_mask

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
REAL_CLIP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "cityCC0_224.mp4")


def build_model(args):
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    torch.manual_seed(0)
    cfg = VideoMAEConfig(hidden_size=args.width, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         intermediate_size=4 * args.width, image_size=args.size, patch_size=16,
                         num_frames=args.frames, tubelet_size=2, num_labels=400)
    return VideoMAEForVideoClassification(cfg).eval()


def moving_cells(static: float, size: int) -> int:
    return round((1 - static) * (size // 16) ** 2)


def synthetic_clip(static: float, frames: int, size: int, seed: int) -> torch.Tensor:
    """(T, C, H, W) normalised: textured static background, camera noise, moving objects in
    `moving_cells(static, size)` of the 16x16 patch cells."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(1, 3, size // 8, size // 8, generator=g)
    background = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[0]
    background = background + 0.3 * torch.randn(3, size, size, generator=g)
    clip = background.expand(frames, -1, -1, -1).clone()
    cells = (size // 16) ** 2
    moving = torch.randperm(cells, generator=g)[: moving_cells(static, size)]
    texture = torch.randn(3, 16, 48, generator=g)  # an object wider than its cell: it slides through
    for c in moving.tolist():
        i, j = divmod(c, size // 16)
        for t in range(frames):
            shift = (5 * t + 3 * c) % 32
            clip[t, :, 16 * i:16 * i + 16, 16 * j:16 * j + 16] = texture[:, :, shift:shift + 16]
    return clip + 0.01 * torch.randn(clip.shape, generator=g)


def real_clips(path: str, frames: int, size: int, batch: int, stride: int = 2) -> torch.Tensor | None:
    if not os.path.exists(path):
        raise SystemExit(f"--real {path}: no such file (the shipped clip is benchmarks/data/cityCC0_224.mp4; "
                         f"--no-real skips the row)")
    try:
        video = read_video(path, size)  # (T, C, size, size) in [0, 1]: short side resized, centre crop
    except DittoError as e:
        print(f"({e}; the real clip is skipped)")
        return None
    span = frames * stride
    starts = [round(i * (len(video) - span) / max(1, batch - 1)) for i in range(batch)]
    out = [(video[s:s + span:stride] - MEAN) / STD for s in starts]
    return torch.stack(out)


def clip_sets(args):
    sets = []
    for static in args.static:
        x = torch.stack([synthetic_clip(static, args.frames, args.size, seed=10 * i + int(100 * static))
                         for i in range(args.batch)])
        nt, cells = args.frames // 2, (args.size // 16) ** 2
        moving = moving_cells(static, args.size) / cells
        expect = (1 + (nt - 1) * moving) / nt  # tubelet 0 whole, then the moving cells
        sets.append((f"synthetic, {1 - moving:.0%} static", x, expect))
    real = None if args.no_real else real_clips(args.real, args.frames, args.size, args.batch)
    if real is not None:
        sets.append((f"{os.path.basename(args.real)} (real clip)", real, None))
    return sets


def kept_share(x: torch.Tensor, tau: float) -> float:
    return float(keep_mask(x.transpose(1, 2), (2, 16, 16), tau).float().mean())


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out.logits if hasattr(out, "logits") else out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small model, 2 rounds")
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--static", type=float, nargs="*", default=[0.0, 0.5, 0.9])
    p.add_argument("--real", default=REAL_CLIP, help="a video file for the real-clip row")
    p.add_argument("--no-real", action="store_true")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (23+: the fused Attention op)")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.heads, args.size, args.rounds = 192, 4, 3, 112, 2
    torch.set_num_threads(args.threads)

    model = build_model(args)
    tokens = (args.frames // 2) * (args.size // 16) ** 2
    print(f"VideoMAE {args.width} wide, {args.layers} layers, {args.frames} x {args.size} x {args.size}, "
          f"{tokens} tokens per clip, batch {args.batch}, tau {args.tau}, {args.threads} threads, "
          f"{args.rounds} interleaved rounds{'' if args.no_onnx else f', ONNX opset {args.opset}'}")
    sets = clip_sets(args)
    example = sets[0][1]
    start = time.perf_counter()
    opt = dittofx.optimize(model, [RLT(tau=args.tau)], (example,))
    print(f"optimize: {time.perf_counter() - start:.1f}s")

    runners = {}
    tmp = tempfile.mkdtemp(prefix="rlt-bench-")
    if not args.no_onnx:
        from dittofx.cli import progress
        from dittofx.exporters.onnx import export_onnx
        from dittofx.runtime import OnnxRuntimeRunner

        for name, module in (("untouched", Logits(model)), ("rlt", Logits(opt))):
            start = time.perf_counter()
            progress.set_quiet(True)
            try:
                result = export_onnx(module, os.path.join(tmp, f"{name}.onnx"), example_inputs=(example,),
                                     opset=args.opset)
            finally:
                progress.set_quiet(False)
            runners[name] = OnnxRuntimeRunner(result.path, providers=["CPUExecutionProvider"], threads=args.threads)
            print(f"export {name}: {time.perf_counter() - start:.1f}s, max rel diff {result.max_rel_diff:.1e}, "
                  f"TensorRT: {'ready' if result.trt_report.ok else 'NOT ready'}"
                  f"{f' ({len(result.trt_report.warnings)} warning(s))' if result.trt_report.warnings else ''}")

    rows = []
    for label, x, expect in sets:
        with torch.inference_mode():
            ref = model(x).logits
            got = Logits(opt)(x)
        kept = opt.report.stats["rlt"].kept
        share = sum(kept) / (len(kept) * tokens)
        bound = 1 / share
        assert expect is None or abs(share - expect) < 1e-6, (label, share, expect)
        same = float((got - ref).abs().max()) if share == 1 else None
        eager = interleaved({"untouched": lambda: model(x), "rlt": lambda: opt(x)}, rounds=args.rounds)["rlt"]
        row = {"clips": label, "kept": share, "bound": bound, "eager": eager.speedup, "eager_spread": eager.spread,
               "same": same}
        if runners:
            ort = interleaved({"untouched": lambda: runners["untouched"](x), "rlt": lambda: runners["rlt"](x)},
                              rounds=args.rounds)["rlt"]
            row.update(ort=ort.speedup, ort_spread=ort.spread)
        rows.append(row)
        print(_line(row), flush=True)

    print()
    print("| clips | tokens kept | bound | eager speed-up (x bound) | onnxruntime speed-up (x bound) |")
    print("|---|---|---|---|---|")
    for r in rows:
        ort = f"{r['ort']:.2f}x +-{r['ort_spread']:.2f} ({r['ort'] / r['bound']:.2f})" if "ort" in r else "-"
        print(f"| {r['clips']} | {r['kept']:.0%} | {r['bound']:.2f}x | {r['eager']:.2f}x +-{r['eager_spread']:.2f} "
              f"({r['eager'] / r['bound']:.2f}) | {ort} |")
    for r in rows:
        if r["same"] is not None:
            print(f"nothing static ({r['clips']}): every token kept, logits differ from the untouched model by "
                  f"{r['same']:.1e} at most")
    worst = min(min(r["eager"], r.get("ort", r["eager"])) / r["bound"] for r in rows)
    print(f"worst speed-up / bound: {worst:.2f} (target >= 0.9; +- is half the range of the per-round ratios)")


def _line(r) -> str:
    text = f"{r['clips']:<32} kept {r['kept']:6.1%}  bound {r['bound']:.2f}x  eager {r['eager']:.2f}x"
    if "ort" in r:
        text += f"  onnxruntime {r['ort']:.2f}x"
    return text


if __name__ == "__main__":
    main()
