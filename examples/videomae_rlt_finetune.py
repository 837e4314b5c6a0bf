"""Fine-tune a VideoMAE through Run-Length Tokenization (with its learned length embedding) on real clips.

    python examples/videomae_rlt_finetune.py --model-dir ./videomae-small-finetuned-kinetics --save rlt.pt
    python examples/videomae_rlt_finetune.py            # a random VideoMAE-S-sized model (minutes)
    python examples/videomae_rlt_finetune.py --fast     # a tiny random VideoMAE, 32x32 clips (what CI runs)

The task: how fast is the clip playing? Clips are cut from one real video (by default the shipped
benchmarks/data/cityCC0_224.mp4, a slow night pan over a city; or `--video FILE`, decoded with PyAV,
`pip install av`) at several start frames, each start taken at every frame stride of `--strides`
(default 1,2,4): the label is the stride. Every stride uses the same start frames, so the content
gives nothing away; only the motion between frames does, and the run lengths RLT measures (a slow
clip repeats more) are exactly what its length embedding sees. Frames are resized to the model's
size (short side, centre crop) and normalised with the ImageNet mean and std (VideoMAE's processors).

Full mode with `--model-dir`: a local folder written by `save_pretrained` (e.g.
MCG-NJU/videomae-small-finetuned-kinetics), loaded with a new classifier head of one class per
stride (`ignore_mismatched_sizes=True`). Without it, a randomly initialised VideoMAE-S-sized model
(384 wide, 12 layers, 16 frames of 224x224): the speed means something, the loss still goes down.

Each step trains on the same clips (`--batch` smaller than their number cycles through them), with AdamW
(`--warmup` steps of linear warm-up, gradients clipped to norm 1) over `opt.parameters()`: the
original's weights (shared, not copied) and RLT's zero-initialised length embedding. Printed per step:
the loss, the share of tokens RLT kept (per stride), and the step's time; the same steps on an untouched
copy of the model run interleaved with them (`--no-baseline` skips it), and the speed-up is the median
of the per-step time ratios, step 1 left out (it captures the training graph); its bound is all tokens /
kept tokens.
`--save PATH` writes `opt.state_dict()`: the model's keys plus `dittofx.rlt.length_embedding`.
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
from dittofx.passes import RLT

VIDEO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "data", "cityCC0_224.mp4")


def read(path: str, size: int) -> torch.Tensor:
    """Every frame of `path` at size x size (dittofx.measure.inputs.read_video); what goes wrong, one line."""
    try:
        return read_video(path, size)
    except DittoError as e:
        raise SystemExit(f"--video: {e}") from None
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]  # ImageNet: what VideoMAE's processors use
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def cut_clips(video: torch.Tensor, frames: int, strides: list[int], starts: int):
    """(clips (N, frames, C, H, W) normalised, labels (N,), start frames): each start at each stride."""
    span = frames * max(strides)
    if len(video) < span:
        raise SystemExit(f"the video has {len(video)} frames; {frames} frames at stride {max(strides)} need {span}")
    first = [round(i * (len(video) - span) / max(1, starts - 1)) for i in range(starts)]
    clips, labels = [], []
    for s in first:
        for label, stride in enumerate(strides):
            clips.append((video[s:s + frames * stride:stride] - MEAN) / STD)
            labels.append(label)
    return torch.stack(clips), torch.tensor(labels), first


def build(args, classes: int):
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    labels = {"id2label": {i: f"stride {s}" for i, s in enumerate(args.strides)},
              "label2id": {f"stride {s}": i for i, s in enumerate(args.strides)}}
    torch.manual_seed(args.seed)
    if args.model_dir:
        return VideoMAEForVideoClassification.from_pretrained(
            args.model_dir, num_labels=classes, ignore_mismatched_sizes=True, **labels)
    if args.fast:
        cfg = VideoMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8, num_frames=8, tubelet_size=2, num_labels=classes, **labels)
    else:  # VideoMAE-S's shape, random weights
        cfg = VideoMAEConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                             image_size=224, patch_size=16, num_frames=16, tubelet_size=2, num_labels=classes,
                             **labels)
    return VideoMAEForVideoClassification(cfg)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def save(state: dict, path: str) -> None:
    """torch.save to a temporary file beside `path`, then renamed: never a half-written checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", help="local VideoMAE folder (save_pretrained); default: random VideoMAE-S shape")
    p.add_argument("--video", default=VIDEO, help="video to cut the clips from (default: the shipped city pan)")
    p.add_argument("--strides", default="1,2,4", help="frame strides, one class each (default 1,2,4)")
    p.add_argument("--starts", type=int, help="start frames per stride (default 2; --fast 4)")
    p.add_argument("--batch", type=int, help="clips per step (default: all of them)")
    p.add_argument("--steps", type=int, help="training steps (default 5; --fast 8)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-5; --fast 3e-3)")
    p.add_argument("--tau", type=float, default=0.1, help="RLT threshold (default 0.1)")
    p.add_argument("--warmup", type=int, default=2, help="steps of linear learning-rate warm-up (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true", help="skip the same steps on the untouched model")
    p.add_argument("--save", metavar="PATH", help="write the fine-tuned opt.state_dict() here")
    p.add_argument("--fast", action="store_true", help="tiny random VideoMAE, 32x32 clips (CI)")
    args = p.parse_args(argv)
    if args.fast and args.model_dir:
        p.error("--fast builds its own tiny model: leave out --model-dir")
    try:
        strides = [int(s) for s in args.strides.split(",")]
    except ValueError:
        strides = []
    if len(strides) < 2 or min(strides) < 1 or len(set(strides)) < len(strides):
        p.error(f"--strides takes two or more different positive integers, e.g. 1,2,4; got {args.strides!r}")
    args.strides = strides
    starts = args.starts or (4 if args.fast else 2)
    steps = args.steps or (8 if args.fast else 5)
    lr = args.lr or (3e-3 if args.fast else 1e-5)
    if args.save and not os.path.isdir(os.path.dirname(os.path.abspath(args.save))):
        p.error(f"--save {args.save}: no such folder")

    model = build(args, len(args.strides))
    cfg = model.config
    video = read(args.video, cfg.image_size)
    clips, labels, first = cut_clips(video, cfg.num_frames, args.strides, starts)
    batch = min(args.batch or len(clips), len(clips))
    print(f"{os.path.basename(args.video)}: {len(video)} frames; {len(clips)} clips of {cfg.num_frames} frames at "
          f"{cfg.image_size}x{cfg.image_size}, start frames {first}, strides {args.strides} (the labels)")
    print(f"VideoMAE {cfg.hidden_size} wide, {cfg.num_hidden_layers} layers, "
          f"{'weights from ' + args.model_dir if args.model_dir else 'random weights'}; "
          f"{steps} steps of {batch} clips, AdamW lr {lr:g}, "
          f"{args.warmup} warm-up steps")

    baseline = None if args.no_baseline else copy.deepcopy(model).train()  # same weights, trained alike
    start = time.perf_counter()
    opt = dittofx.optimize(model.eval(), [RLT(tau=args.tau, length_embedding=True)], (clips[:batch],))
    print(f"optimize: {time.perf_counter() - start:.1f}s")
    opt.train()  # the next call captures the training graph (once), then every step runs it
    adam = torch.optim.AdamW(opt.parameters(), lr=lr)
    base_adam = None if baseline is None else torch.optim.AdamW(baseline.parameters(), lr=lr)

    def step(module, optimizer, x, y, i) -> tuple[float, float]:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(module(pixel_values=x).logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for g in optimizer.param_groups for q in g["params"]], 1.0)
        for group in optimizer.param_groups:  # linear warm-up: step i < warmup at lr (i + 1) / (warmup + 1)
            group["lr"] = lr * min(1.0, (i + 1) / (args.warmup + 1))
        optimizer.step()
        return loss.item(), time.perf_counter() - start

    order = torch.randperm(len(clips), generator=torch.Generator().manual_seed(args.seed))
    losses, base_losses, ratios, shares = [], [], [], []
    for i in range(steps):
        idx = order[(torch.arange(batch) + i * batch) % len(clips)]
        x, y = clips[idx], labels[idx]
        torch.manual_seed(args.seed + i)
        loss, seconds = step(opt, adam, x, y, i)
        stats = opt.report.stats["rlt"]  # tokens kept per clip in this forward
        kept = torch.tensor(stats.kept, dtype=torch.float) / stats.total
        by_stride = ", ".join(f"stride {s} {kept[y == c].mean():.0%}"
                              for c, s in enumerate(args.strides) if (y == c).any())
        losses.append(loss)
        shares.append(float(kept.mean()))
        line = f"step {i + 1}/{steps}  RLT: loss {loss:.4f}, kept {kept.mean():.0%} ({by_stride}), {ms(seconds)}"
        if baseline is not None:
            torch.manual_seed(args.seed + i)
            base_loss, base_seconds = step(baseline, base_adam, x, y, i)
            base_losses.append(base_loss)
            if i > 0:
                ratios.append(base_seconds / seconds)
            line += f"  |  untouched: loss {base_loss:.4f}, {ms(base_seconds)}"
        print(line + ("  (captures the training graph)" if i == 0 else ""), flush=True)

    print(f"RLT loss: first {losses[0]:.4f} -> last {losses[-1]:.4f} "
          f"({'down' if losses[-1] < losses[0] else 'NOT down'})")
    if baseline is not None:
        print(f"untouched loss: first {base_losses[0]:.4f} -> last {base_losses[-1]:.4f}")
        if ratios:
            print(f"time per training step: RLT speed-up {statistics.median(ratios):.2f}x over untouched "
                  f"(median of the per-step ratios, steps 2..{steps}; spread {(max(ratios) - min(ratios)) / 2:.2f}; "
                  f"bound all/kept tokens {len(shares) / sum(shares):.2f}x)"
                  + ("; a tiny model: per-call costs dominate, full mode shows the speed-up" if args.fast else ""))
    table = opt.learned["rlt.length_embedding"]
    print(f"length embedding {tuple(table.shape)} (zero at first): norm per run length "
          f"{[round(v, 4) for v in table.detach().norm(dim=1).tolist()]}")

    if args.save:
        save(opt.state_dict(), args.save)
        print(f"saved opt.state_dict() to {args.save} (the model's keys and dittofx.rlt.length_embedding); "
              f"load with dittofx.optimize(model, [RLT(length_embedding=True)], ...).load_state_dict(...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
