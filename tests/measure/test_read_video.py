"""`dittofx.measure.inputs.read_video`: every frame of a file, resized on the short side and centre-cropped."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dittofx.errors import DittoError
from dittofx.measure.inputs import read_video

av = pytest.importorskip("av")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """12 frames of 48 x 80 (H x W), a gradient that moves."""
    path = str(tmp_path_factory.mktemp("video") / "clip.mp4")
    with av.open(path, "w") as out:
        stream = out.add_stream("mpeg4", rate=12)
        stream.width, stream.height, stream.pix_fmt = 80, 48, "yuv420p"
        for t in range(12):
            x = np.linspace(0, 255, 80)[None, :, None] + 10 * t
            frame = np.broadcast_to(x % 256, (48, 80, 3)).astype(np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        out.mux(stream.encode())
    return path


def test_every_frame_in_unit_range(video):
    frames = read_video(video)
    assert frames.shape == (12, 3, 48, 80) and frames.dtype == torch.float32
    assert 0 <= frames.min() and frames.max() <= 1 and frames.std() > 0.1


def test_short_side_resized_then_centre_crop(video):
    frames = read_video(video)
    want = F.interpolate(frames, size=(32, 53), mode="bilinear", antialias=True, align_corners=False)
    want = want[..., :, 10:42]  # (53 - 32) // 2 = 10
    got = read_video(video, 32)
    assert got.shape == (12, 3, 32, 32)
    torch.testing.assert_close(got, want)


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(DittoError) as e:
        read_video(str(tmp_path / "none.mp4"))
    assert "no such video file" in str(e.value) and "\n" not in str(e.value)


def test_not_a_video_is_one_line(tmp_path):
    path = tmp_path / "text.mp4"
    path.write_text("not a video")
    with pytest.raises(DittoError) as e:
        read_video(str(path))
    assert str(e.value).startswith(f"cannot decode video {path}") and "\n" not in str(e.value)
