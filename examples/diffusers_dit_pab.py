"""Pyramid Attention Broadcast in a diffusers DiT pipeline: the transformer swapped for the optimized one.

    python examples/diffusers_dit_pab.py --model-dir ./DiT-XL-2-256 --steps 50 --out dit.png
    python examples/diffusers_dit_pab.py --fast          # a tiny random DiT pipeline (what CI runs)

Full mode loads a local copy of facebook/DiT-XL-2-256 (a pipeline folder with transformer/, vae/ and
scheduler/; download it where you have the hub with `DiTPipeline.from_pretrained(ID).save_pretrained(DIR)`).

PAB reuses each attention's output for a few steps inside a timestep window (spatial every 2nd call,
cross every 6th; DiT has self-attention only). The pipeline's own loop drives it: the optimized
transformer reads the timestep of every call, and `reset()` (or a timestep higher than the last one)
starts a new generation. Both pipelines run from the same seed; the images are compared by PSNR,
and the loops are timed interleaved. Full mode takes minutes on a CPU: each phase is announced with
the time, and each generation shows the pipeline's progress bar (which phase, step k of n) on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import dittofx
from dittofx.measure.agreement import psnr


def tiny_pipeline():
    """A random DiT pipeline small enough for CI: 2 layers over 8x8 latent patches, a one-level VAE."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=1000)
    vae = AutoencoderKL(block_out_channels=(16,), norm_num_groups=8, latent_channels=4, sample_size=16)
    return DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=DDIMScheduler())


def phase(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def generate(pipe, labels, steps, seed, what: str | None = None):
    """One generation; `what` names it on the pipeline's progress bar (None: no bar)."""
    pipe.set_progress_bar_config(disable=what is None, desc=what, leave=False)
    generator = torch.Generator().manual_seed(seed)
    return pipe(class_labels=labels, num_inference_steps=steps, generator=generator, output_type="pt").images


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", help="local DiT pipeline folder (e.g. a saved facebook/DiT-XL-2-256)")
    p.add_argument("--pab", default="pab:spatial=2,temporal=4,cross=6,timestep_window=(100,800)",
                   help="the PAB spec (default: the paper's pyramid in diffusers' window)")
    p.add_argument("--labels", default="207,360,387,974", help="ImageNet class ids, comma separated")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="save the PAB images side by side with the untouched ones (PNG)")
    p.add_argument("--fast", action="store_true", help="tiny random pipeline, 10 steps (CI)")
    args = p.parse_args(argv)
    if not args.fast and not args.model_dir:
        p.error("give --model-dir (a local DiT pipeline folder) or --fast")

    from diffusers import DiTPipeline

    if not args.fast:
        phase(f"loading the pipeline from {args.model_dir}")
    pipe = tiny_pipeline() if args.fast else DiTPipeline.from_pretrained(args.model_dir)
    labels = [int(v) for v in args.labels.split(",")][: 2 if args.fast else None]
    steps = 10 if args.fast else args.steps

    # the transformer's call, as the pipeline makes it: latents for guidance (2x the labels), timestep, labels
    transformer = pipe.transformer
    cfg = transformer.config
    n = 2 * len(labels)
    example = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    kwargs = {"timestep": torch.full((n,), 500, dtype=torch.long),
              "class_labels": torch.tensor(labels + [1000] * len(labels))}
    if not args.fast:
        phase(f"capturing the transformer and rewriting it with {args.pab}")
    opt = dittofx.optimize(transformer, [args.pab], example_inputs=(example,), example_kwargs=kwargs)
    sites = sum(len(b.kinds) for b in opt.report.blocks)
    print(f"{args.pab}: {len(opt.report.blocks)} blocks, {sites} attention sites, timestep input "
          f"{opt.report.timestep_input!r}")

    rounds = 1 if args.fast else 3
    phases = 2 + 2 * rounds

    def bar(k: int, text: str) -> str | None:
        """The progress bar's name for generation k (full mode only: CI's output stays short)."""
        return None if args.fast else f"{k}/{phases} {text}"

    if not args.fast:
        phase(f"{phases} generations of {len(labels)} images, {steps} steps each: the untouched and the PAB "
              f"pipeline, then {rounds} timed rounds of both")
    reference = generate(pipe, labels, steps, args.seed, bar(1, "untouched (reference)"))
    pipe.transformer = opt  # a drop-in: the pipeline reads opt.config, opt.dtype as before
    opt.reset()
    images = generate(pipe, labels, steps, args.seed, bar(2, "PAB"))
    print(f"PAB vs untouched over {steps} steps: PSNR {psnr(images, reference):.1f} dB (images in [0, 1])")

    # time whole generations, interleaved (A B A B ...), median ratio
    ratios, times = [], {"untouched": [], "PAB": []}
    for i in range(rounds):
        for j, (name, module) in enumerate((("untouched", transformer), ("PAB", opt))):
            pipe.transformer = module
            start = time.perf_counter()
            generate(pipe, labels, steps, args.seed, bar(3 + 2 * i + j, f"timing round {i + 1}/{rounds}: {name}"))
            times[name].append(time.perf_counter() - start)
        ratios.append(times["untouched"][-1] / times["PAB"][-1])
    ratios.sort()
    print(f"  untouched {min(times['untouched']):.2f} s, PAB {min(times['PAB']):.2f} s per generation; "
          f"speed-up {ratios[len(ratios) // 2]:.2f}x (median of {len(ratios)} interleaved rounds)")

    if args.out:
        from PIL import Image

        grid = torch.cat([torch.cat(list(reference), 2), torch.cat(list(images), 2)], 1)  # (C, 2H, N*W)
        Image.fromarray((grid.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()).save(args.out)
        print(f"wrote {args.out}: top row untouched, bottom row PAB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
