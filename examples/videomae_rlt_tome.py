"""Run-Length Tokenization and Token Merging on VideoMAE (transformers), alone and together.

    python examples/videomae_rlt_tome.py --model-dir ./videomae-base-finetuned-kinetics --video clip.mp4
    python examples/videomae_rlt_tome.py --fast          # a tiny random VideoMAE (what CI runs)

Full mode loads a local folder written by `save_pretrained` (e.g. MCG-NJU/videomae-base-finetuned-kinetics
with its image processor; save both where you have the hub). `--video` is decoded with PyAV
(`pip install av`): `--frames` frames (the model's num_frames), `--stride` frames apart, preprocessed
by the folder's processor. Without `--video`, a synthetic clip: a still textured background with one
moving square, the case RLT is made for (a static camera).

RLT drops the tubelets that repeat the previous one (mean absolute difference <= tau) before the first
block, so every layer runs on fewer tokens; ToMe then merges r tokens per block. Where this version
cannot stack the two on one model, the example says why and shows each alone.
"""

from __future__ import annotations

import argparse
import sys

import torch

import dittofx
from dittofx.errors import UnsupportedModelError
from dittofx.measure.agreement import agreement
from dittofx.measure.timing import interleaved


def synthetic_clip(frames: int, size: int, batch: int, seed: int = 0) -> torch.Tensor:
    """(batch, frames, 3, size, size), normalised: a still random texture and a square moving right."""
    gen = torch.Generator().manual_seed(seed)
    background = torch.randn(batch, 1, 3, size, size, generator=gen).expand(batch, frames, 3, size, size).clone()
    side = max(2, size // 4)
    for f in range(frames):
        x0 = (f * max(1, size // frames)) % (size - side)
        background[:, f, :, size // 3: size // 3 + side, x0: x0 + side] = 2.0
    return background


def read_clip(path: str, model_dir: str, frames: int, stride: int) -> torch.Tensor:
    import av
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(model_dir)
    images = []
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i % stride == 0:
                images.append(frame.to_image())
            if len(images) == frames:
                break
    if len(images) < frames:
        raise SystemExit(f"{path} has fewer than {frames} frames {stride} apart")
    return processor(images, return_tensors="pt")["pixel_values"]  # (1, T, C, H, W)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", help="local VideoMAE folder (save_pretrained)")
    p.add_argument("--video", help="a video file to classify (needs PyAV)")
    p.add_argument("--stride", type=int, default=4, help="frames between sampled frames (default 4)")
    p.add_argument("--tau", type=float, default=0.1, help="RLT threshold (default 0.1)")
    p.add_argument("--r", type=int, default=16, help="ToMe tokens merged per block (default 16)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--fast", action="store_true", help="tiny random VideoMAE, 2 rounds (CI)")
    args = p.parse_args(argv)
    if not args.fast and not args.model_dir:
        p.error("give --model-dir (a local VideoMAE folder) or --fast")

    if args.fast:
        from dittofx.models import zoo

        model = zoo.build("videomae").model
        r, rounds = 4, 2
    else:
        from transformers import VideoMAEForVideoClassification

        model = VideoMAEForVideoClassification.from_pretrained(args.model_dir).eval()
        r, rounds = args.r, args.rounds
    cfg = model.config
    if args.video and not args.fast:
        clip = read_clip(args.video, args.model_dir, cfg.num_frames, args.stride).repeat(args.batch, 1, 1, 1, 1)
    else:
        clip = synthetic_clip(cfg.num_frames, cfg.image_size, args.batch)
    print(f"clip {tuple(clip.shape)} (batch, frames, channels, height, width)")

    with torch.inference_mode():
        reference = model(pixel_values=clip).logits
    runs = {"untouched": lambda: model(pixel_values=clip)}
    for specs in ([f"rlt:tau={args.tau}"], [f"tome:r={r}"], [f"rlt:tau={args.tau}", f"tome:r={r}"]):
        name = " + ".join(specs)
        try:
            opt = dittofx.optimize(model, specs, example_kwargs={"pixel_values": clip})
        except UnsupportedModelError as e:
            print(f"{name}: not possible in this version ({e})")
            continue
        with torch.inference_mode():
            logits = opt(pixel_values=clip).logits
        kept = opt.report.stats.get("rlt")
        kept_text = f"; RLT kept {kept.kept} of {kept.total} tokens per clip" if kept is not None and kept.kept else ""
        print(f"{name}: {agreement(logits, reference, 'classifier').describe()}{kept_text}")
        runs[name] = (lambda o=opt: o(pixel_values=clip))

    timings = interleaved(runs, rounds=rounds, warmup=1)
    for name, t in timings.items():
        print(f"  {name:<28} {t.median * 1e3:8.1f} ms  {clip.shape[0] / t.median:7.1f} clips/s  {t.speedup:.2f}x")
    print("speed-ups: median of per-round ratios to 'untouched', rounds interleaved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
