"""ToMe on joint attention: speed-up of an SD3-shaped transformer where attention dominates.

    python benchmarks/tome_dit.py                 # 128x128 latents, patch 2: 4096 image tokens, 2 blocks
    python benchmarks/tome_dit.py --quick         # 32x32 latents, 1 round: a smoke test of the whole table

The model is diffusers' SD3Transformer2DModel (joint text-image attention: projections per stream,
concatenated after) at random weights, with a long image sequence and few, narrow layers, so that the
attention (quadratic in the tokens) is most of the work. `ToMe(ratio=...)` merges that share of the
image tokens before each joint attention and unmerges them after (passes/tome/joint.py), the text
tokens untouched.

Timing: untouched and each ratio interleaved (A B C ... per round) after a warm-up; the speed-up is the
median of per-round ratios (dittofx.measure.timing). The FLOP bound is untouched FLOPs / ToMe FLOPs
(matmuls, convolutions and attention, counted by dittofx.measure.flops); "of bound" is speed-up /
bound (target: at least 0.9). PSNR: final latents of a `--steps`-step flow-matching Euler loop against
the untouched model's (the figure `dittofx bench --steps 30` reports too).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import count_flops, interleaved, machine, print_table, write_json

import dittofx
from dittofx.measure.agreement import psnr
from dittofx.passes.tome import ToMe


def build(args):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=args.latent, patch_size=2, in_channels=16, out_channels=16, num_layers=args.layers,
        attention_head_dim=args.head_dim, num_attention_heads=args.heads, joint_attention_dim=64,
        caption_projection_dim=args.heads * args.head_dim, pooled_projection_dim=32,
        pos_embed_max_size=args.latent // 2)
    return model.eval().to(args.device, args.dtype)


def inputs(args):
    g = torch.Generator().manual_seed(0)
    b, dev, dt = args.batch, args.device, args.dtype
    x = torch.randn(b, 16, args.latent, args.latent, generator=g).to(dev, dt)
    kwargs = {"encoder_hidden_states": torch.randn(b, args.text, 64, generator=g).to(dev, dt),
              "pooled_projections": torch.randn(b, 32, generator=g).to(dev, dt),
              "timestep": torch.full((b,), 500.0, device=dev, dtype=dt)}
    return (x,), kwargs


def denoise(fn, x, kwargs, steps: int) -> torch.Tensor:
    """Flow matching, Euler: x <- x + (t_next - t) v(x, t) from t = 1 to 0."""
    ts = torch.linspace(1.0, 0.0, steps + 1)
    with torch.inference_mode():
        for t, t_next in zip(ts[:-1], ts[1:]):
            kw = dict(kwargs, timestep=torch.full_like(kwargs["timestep"], float(t) * 1000))
            out = fn(x, **kw)
            v = out if isinstance(out, torch.Tensor) else out[0]
            x = x + (float(t_next) - float(t)) * v
    return x.float()


def sync(args):
    if args.device == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small model, 1 round, 2-step loop")
    p.add_argument("--latent", type=int, default=128, help="latent size (tokens: (latent / 2)^2)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--text", type=int, default=77, help="text tokens")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ratios", type=float, nargs="*", default=[0.25, 0.5, 0.75])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeat", type=int, default=3, help="calls per timed run")
    p.add_argument("--steps", type=int, default=30, help="denoising steps for the PSNR")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU time (steadier on a shared CPU, with --threads 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: float16 on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--json", help="write the rows and the machine to this JSON file")
    args = p.parse_args()
    if args.quick:
        args.latent, args.rounds, args.repeat, args.steps, args.text = 32, 1, 1, 2, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = getattr(torch, args.dtype or ("float16" if args.device == "cuda" else "float32"))

    model = build(args)
    x, kwargs = inputs(args)
    tokens = (args.latent // 2) ** 2
    print(f"SD3-shaped: {tokens} image + {args.text} text tokens, {args.layers} blocks, "
          f"{args.heads}x{args.head_dim} wide, batch {args.batch}, {args.device} {args.dtype}", flush=True)
    models = {"untouched": model}
    for ratio in args.ratios:
        models[f"tome ratio={ratio}"] = dittofx.optimize(model, [ToMe(ratio=ratio)], x, kwargs,
                                                         compile=args.compile)
    if args.compile:
        models["untouched"] = torch.compile(model, fullgraph=True)

    def call(m):
        def run():
            m(*x, **kwargs)
            sync(args)
        return run

    flops = {name: count_flops(lambda m=m: m(*x, **kwargs)) for name, m in models.items()}
    finals = {name: denoise(m, x[0], kwargs, args.steps) for name, m in models.items()}
    timings = interleaved({name: call(m) for name, m in models.items()}, rounds=args.rounds, repeat=args.repeat,
                          clock=args.clock)
    rows = []
    for name, t in timings.items():
        bound = flops["untouched"] / flops[name]
        rows.append({"setting": name, "ms": 1000 * t.median, "speedup": t.speedup, "spread": t.spread,
                     "bound": bound, "of_bound": t.speedup / bound, "gflops": flops[name] / 1e9,
                     "psnr": None if name == "untouched" else psnr(finals[name], finals["untouched"])})
    print_table(rows, [("setting", "setting", ""), ("ms", "ms/call", ".1f"), ("speedup", "speed-up", ".3f"),
                       ("spread", "+-", ".3f"), ("bound", "FLOP bound", ".3f"), ("of_bound", "of bound", ".0%"),
                       ("gflops", "GFLOP", ".2f"), ("psnr", f"PSNR {args.steps}-step (dB)", ".1f")])
    print("speed-up: median of per-round ratios to untouched; FLOP bound: untouched / ToMe FLOPs; "
          "of bound: speed-up / bound", flush=True)
    if args.json:
        write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
