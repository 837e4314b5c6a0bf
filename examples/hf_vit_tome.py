"""ToMe on a transformers ViT (ViTForImageClassification), as a drop-in for the original model.

    python examples/hf_vit_tome.py --model-dir ./vit-base-patch16-224 --images ./photos --r 16
    python examples/hf_vit_tome.py --fast          # a tiny random ViT (what CI runs)

Full mode loads a local folder written by `save_pretrained` (e.g. google/vit-base-patch16-224, saved
where you have the hub: `ViTForImageClassification.from_pretrained(ID).save_pretrained(DIR)` and the
same for `AutoImageProcessor`). With `--images`, the images in that folder are preprocessed by the
folder's image processor and classified by both models; otherwise random pixels are used.

The optimized module is called exactly like the original (`opt(pixel_values=x).logits`), keeps its
attributes (`opt.config`), and its report says what each block became.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import dittofx
from dittofx.measure.agreement import agreement
from dittofx.measure.timing import interleaved


def load(args):
    if args.fast:
        from dittofx.models import zoo

        z = zoo.build("hf_vit", batch=2)
        return z.model, z.example_inputs[0], None
    from transformers import AutoImageProcessor, ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(args.model_dir).eval()
    size = model.config.image_size
    if args.images:
        from PIL import Image

        processor = AutoImageProcessor.from_pretrained(args.model_dir)
        files = sorted(f for f in os.listdir(args.images) if f.lower().endswith((".jpg", ".jpeg", ".png")))
        images = [Image.open(os.path.join(args.images, f)).convert("RGB") for f in files[: args.batch]]
        return model, processor(images=images, return_tensors="pt")["pixel_values"], files[: args.batch]
    return model, torch.randn(args.batch, 3, size, size), None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", help="local transformers ViT folder (save_pretrained)")
    p.add_argument("--images", help="folder of images to classify")
    p.add_argument("--r", type=int, default=16, help="tokens merged per block (default 16)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--fast", action="store_true", help="tiny random ViT, 2 rounds (CI)")
    args = p.parse_args(argv)
    if not args.fast and not args.model_dir:
        p.error("give --model-dir (a local ViT folder) or --fast")

    model, x, names = load(args)
    r, rounds = (8, 2) if args.fast else (args.r, args.rounds)

    opt = dittofx.optimize(model, [f"tome:r={r}"], example_kwargs={"pixel_values": x})
    print(opt.report)

    with torch.inference_mode():
        reference = model(pixel_values=x).logits
        logits = opt(pixel_values=x).logits
    print(f"ToMe r={r} vs untouched: {agreement(logits, reference, 'classifier').describe()}")
    if names:
        labels = opt.config.id2label
        for name, a, b in zip(names, reference.argmax(1).tolist(), logits.argmax(1).tolist()):
            print(f"  {name}: untouched {labels[a]!r}, ToMe {labels[b]!r}")

    timings = interleaved({"untouched": lambda: model(pixel_values=x), f"ToMe r={r}": lambda: opt(pixel_values=x)},
                          rounds=rounds, warmup=1)
    for name, t in timings.items():
        print(f"  {name:<12} {t.median * 1e3:8.1f} ms  {x.shape[0] / t.median:8.1f} images/s  {t.speedup:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
