"""Train a timm ViT through Token Merging (ToMe) for a few steps, against the untouched model.

    python examples/timm_vit_tome_train.py --weights vit_base_patch16_224.safetensors --r 16
    python examples/timm_vit_tome_train.py            # timm's vit_base_patch16_224, random weights (minutes)
    python examples/timm_vit_tome_train.py --fast     # a tiny random ViT, 32x32 images (what CI runs)

The task: which part of a video does a picture come from? The frames of one real video (by default
the shipped benchmarks/data/cityCC0_224.mp4, a slow night pan over a city; or `--video FILE`,
decoded with PyAV, `pip install av`) are split into `--classes` consecutive segments (default 4, the
labels); from each, `--per-class` frames spread over the segment, each cut by a random square crop
(60 to 100 % of the short side, seeded), resized to the model's input size and normalised with the
model's mean and std.

Full mode builds timm's `vit_base_patch16_224` (or `--model NAME`), loads `--weights` (a
safetensors file or a torch state dict of that model; without it the weights are random and only
the speed means much) and gives it a new head of one class per segment. Where you have the Hugging
Face hub, write the file once with
`safetensors.torch.save_file(timm.create_model(NAME, pretrained=True).state_dict(), FILE)`.

Each step trains on the same images (`--batch` smaller than their number cycles through them) with AdamW
(`--warmup` steps of linear warm-up, gradients clipped to norm 1) over `opt.parameters()`, the
original's weights: ToMe adds none, so training through it trains the model itself, which then runs with
or without ToMe. The same steps on an untouched copy run interleaved with them; the speed-up is the
median of the per-step time ratios, step 1 left out (it captures the training graph).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import dittofx
from dittofx.errors import DittoError
from dittofx.measure.inputs import read_video
from dittofx.passes import ToMe

VIDEO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "data", "cityCC0_224.mp4")


def read(path: str) -> torch.Tensor:
    """Every frame of `path` (dittofx.measure.inputs.read_video); what goes wrong, one line."""
    try:
        return read_video(path)
    except DittoError as e:
        raise SystemExit(f"--video: {e}") from None


def images(video: torch.Tensor, classes: int, per_class: int, size: int, mean, std, seed: int):
    """(images (N, C, size, size) normalised, labels (N,)): random square crops of frames from each of
    `classes` consecutive segments of the video, labelled by segment."""
    if len(video) < classes * per_class:
        raise SystemExit(f"the video has {len(video)} frames; {classes} x {per_class} images need as many")
    g = torch.Generator().manual_seed(seed)
    h, w = video.shape[-2:]
    out, labels = [], []
    for c in range(classes):
        lo, hi = c * len(video) // classes, (c + 1) * len(video) // classes
        for i in range(per_class):
            frame = video[lo + (2 * i + 1) * (hi - lo) // (2 * per_class)]
            side = int(min(h, w) * (0.6 + 0.4 * torch.rand((), generator=g)))
            top = int(torch.randint(0, h - side + 1, (), generator=g))
            left = int(torch.randint(0, w - side + 1, (), generator=g))
            crop = frame[None, :, top:top + side, left:left + side]
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
            out.append((crop - mean[:, None, None]) / std[:, None, None])
            labels.append(c)
    return torch.stack(out), torch.tensor(labels)


def build(args, classes: int):
    import timm

    torch.manual_seed(args.seed)
    if args.fast:
        model = timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=classes)
        return model, "tiny ViT (32 wide, 4 blocks, 32x32 images, 64 patches)"
    model = timm.create_model(args.model, pretrained=False)
    if args.weights:
        from dittofx.models.weights import load_weights

        load_weights(model, args.weights)
    model.reset_classifier(classes)  # a new head: one class per segment
    return model, f"{args.model}, {'weights ' + args.weights if args.weights else 'random weights'}, new head"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name (default vit_base_patch16_224)")
    p.add_argument("--weights", help="safetensors file or torch state dict for the model")
    p.add_argument("--video", default=VIDEO, help="video to cut the images from (default: the shipped city pan)")
    p.add_argument("--r", type=int, help="tokens merged per block (default 16; --fast 8)")
    p.add_argument("--classes", type=int, default=4, help="video segments, one class each (default 4)")
    p.add_argument("--per-class", type=int, default=4, help="images per segment (default 4)")
    p.add_argument("--batch", type=int, help="images per step (default: all of them)")
    p.add_argument("--steps", type=int, help="training steps (default 5; --fast 8)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-5; --fast 3e-3)")
    p.add_argument("--warmup", type=int, default=2, help="steps of linear learning-rate warm-up (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="tiny random ViT, 32x32 images (CI)")
    args = p.parse_args(argv)
    if args.fast and args.weights:
        p.error("--fast builds its own tiny model: leave out --weights")
    if args.classes < 2 or args.per_class < 1:
        p.error("--classes takes 2 or more, --per-class 1 or more")
    r = args.r if args.r is not None else 8 if args.fast else 16
    steps = args.steps or (8 if args.fast else 5)
    lr = args.lr or (3e-3 if args.fast else 1e-5)

    model, described = build(args, args.classes)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)))
    size = model.patch_embed.img_size[0]
    video = read(args.video)
    x_all, y_all = images(video, args.classes, args.per_class, size, mean, std, args.seed)
    batch = min(args.batch or len(x_all), len(x_all))
    print(f"{os.path.basename(args.video)}: {len(video)} frames in {args.classes} segments (the labels); "
          f"{len(x_all)} crops at {size}x{size}")
    print(f"{described}; {steps} steps of {batch} images, AdamW lr {lr:g}, "
          f"{args.warmup} warm-up steps")

    baseline = copy.deepcopy(model).train()  # same weights, trained alike
    start = time.perf_counter()
    opt = dittofx.optimize(model.eval(), [ToMe(r=r)], (x_all[:batch],))
    print(f"optimize: {time.perf_counter() - start:.1f}s; ToMe r={r}: tokens entering each block "
          f"{[b.tokens for b in opt.report.blocks]}")
    opt.train()  # the next call captures the training graph (once), then every step runs it
    adam = torch.optim.AdamW(opt.parameters(), lr=lr)
    base_adam = torch.optim.AdamW(baseline.parameters(), lr=lr)

    def step(module, optimizer, x, y, i) -> tuple[float, float]:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(module(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for g in optimizer.param_groups for q in g["params"]], 1.0)
        for group in optimizer.param_groups:  # linear warm-up: step i < warmup at lr (i + 1) / (warmup + 1)
            group["lr"] = lr * min(1.0, (i + 1) / (args.warmup + 1))
        optimizer.step()
        return loss.item(), time.perf_counter() - start

    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(args.seed))
    losses, base_losses, ratios = [], [], []
    for i in range(steps):
        idx = order[(torch.arange(batch) + i * batch) % len(x_all)]
        x, y = x_all[idx], y_all[idx]
        torch.manual_seed(args.seed + i)  # the same dropout / drop-path draws for both (where there are any)
        loss, seconds = step(opt, adam, x, y, i)
        torch.manual_seed(args.seed + i)
        base_loss, base_seconds = step(baseline, base_adam, x, y, i)
        losses.append(loss)
        base_losses.append(base_loss)
        if i > 0:
            ratios.append(base_seconds / seconds)
        print(f"step {i + 1}/{steps}  ToMe r={r}: loss {loss:.4f}, {ms(seconds)}  |  untouched: loss {base_loss:.4f}, "
              f"{ms(base_seconds)}{'  (captures the training graph)' if i == 0 else ''}", flush=True)

    print(f"ToMe loss: first {losses[0]:.4f} -> last {losses[-1]:.4f} "
          f"({'down' if losses[-1] < losses[0] else 'NOT down'})")
    print(f"untouched loss: first {base_losses[0]:.4f} -> last {base_losses[-1]:.4f}")
    if ratios:
        print(f"time per training step: ToMe speed-up {statistics.median(ratios):.2f}x over untouched (median of the "
              f"per-step ratios, steps 2..{steps}; spread {(max(ratios) - min(ratios)) / 2:.2f})"
              + ("; a tiny model: per-call costs dominate, full mode shows the speed-up" if args.fast else ""))

    # the trained weights are the model's own: the untouched model and ToMe agree on what they learned
    opt.eval()
    with torch.no_grad():
        plain, merged = model.eval()(x_all).argmax(1), opt(x_all).argmax(1)
    print(f"after training, on the training images: accuracy plain model {(plain == y_all).float().mean():.0%}, "
          f"ToMe {(merged == y_all).float().mean():.0%}, same prediction {(plain == merged).float().mean():.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
