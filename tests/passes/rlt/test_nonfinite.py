"""RLT and non-finite input: a clip with a NaN or inf gives what the original model gives for it, and the
other clips of its batch are what they are without it, in both layouts, eagerly and in ONNX.

The original model keeps a NaN in its clip (attention and pooling run per clip) and spreads it over the
whole clip; RLT must neither drop it (a NaN difference is not > tau; a pixel in a frame no comparison reads)
nor leak it into other clips (packed clips in one matmul: 0 x inf is NaN)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dittofx
from dittofx.models import zoo
from dittofx.passes.rlt import RLT, finite_clips
from tests.passes.rlt.test_rlt import (
    TS,
    Attention,
    P,
    TinyVideoViT,
    clips,
    logits,
    reference_keep,
    videomae_reference,
)

KINDS = ["static", "partial", "noise"]
# frame 3: the last frame of tubelet 1, compared with frame 0 (a NaN difference); frame 6: the first frame of
# the last tubelet, which no comparison reads ("previous")
FRAMES = [3, 6]
VALUES = [float("nan"), float("inf"), float("-inf")]


def poisoned(value: float, frame: int, clip: int = 0, kinds=KINDS, seed: int = 0) -> torch.Tensor:
    """The test clips (B, T, C, H, W), one pixel of `clip` replaced by `value` in its static corner."""
    x = clips(kinds, seed=seed)
    x[clip, frame, 1, 20, 20] = value
    return x


def assert_per_clip(out: torch.Tensor, x: torch.Tensor, bad: int, original, clean, rtol: float = 1e-5) -> None:
    """Clip `bad` equals the original model's output for it (NaN where it is NaN); every other clip equals
    `clean(i)`, and is finite."""
    want = original(x[bad:bad + 1])[0]
    assert not torch.isfinite(want).all()  # the test input is what it claims: the original is non-finite here
    torch.testing.assert_close(out[bad], want, rtol=rtol, atol=1e-5, equal_nan=True)
    for i in range(x.shape[0]):
        if i != bad:
            assert torch.isfinite(out[i]).all()
            torch.testing.assert_close(out[i], clean(i), rtol=rtol, atol=1e-5)


@pytest.fixture(scope="module")
def videomae():
    return zoo.build("videomae", batch=3)


@pytest.fixture(scope="module", params=["packed", "padded"])
def opt(videomae, request):
    return dittofx.optimize(videomae.model, [RLT(tau=0.1, layout=request.param)], videomae.example_inputs)


@pytest.mark.parametrize("value", VALUES, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("frame", FRAMES)
@pytest.mark.parametrize("bad", [0, 1])
def test_videomae_nonfinite_pixel_stays_in_its_clip(videomae, opt, value, frame, bad):
    model = videomae.model
    x = poisoned(value, frame, bad)
    with torch.no_grad():
        out = logits(opt(x))
        assert_per_clip(out, x, bad, lambda c: model(c).logits,
                        lambda i: videomae_reference(model, x[i], reference_keep(x[i], TS, P, 0.1)))
    kept = opt.report.stats["rlt"].kept
    assert kept[bad] == 64 and kept == [64 if i == bad else n for i, n in enumerate([16, 28, 64])]


def test_run_start_nonfinite_clip_keeps_every_token(videomae):
    opt = dittofx.optimize(videomae.model, [RLT(compare="run_start")], videomae.example_inputs)
    x = poisoned(float("nan"), 6)
    with torch.no_grad():
        out = logits(opt(x))
        assert_per_clip(out, x, 0, lambda c: videomae.model(c).logits,
                        lambda i: videomae_reference(videomae.model, x[i],
                                                     reference_keep(x[i], TS, P, 0.1, "run_start")))


def test_backbone_token_output(videomae):
    """VideoMAEModel returns every token, run-length decoded: the poisoned clip's are the original's."""
    backbone = videomae.model.videomae
    opt = dittofx.optimize(backbone, [RLT()], videomae.example_inputs)
    x = poisoned(float("inf"), 6, clip=1)
    clean = clips(KINDS)
    with torch.no_grad():
        out = opt(x).last_hidden_state
        want = opt(clean).last_hidden_state
        assert_per_clip(out, x, 1, lambda c: backbone(c).last_hidden_state, lambda i: want[i])


class SingleHead(Attention):
    """Attention on (B, N, d): no heads axis."""

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(F.scaled_dot_product_attention(q, k, v))


class HeadsInBatch(Attention):
    """Attention on (B * H, N, d): the heads folded into the batch."""

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = (t.reshape(b * self.heads, n, c // self.heads) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v).reshape(b, self.heads, n, c // self.heads)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


def tiny(attention=None, cls_token=False):
    torch.manual_seed(0)
    model = TinyVideoViT(cls_token=cls_token).eval()
    if attention is not None:
        for blk in model.blocks:
            a = attention(48, 3)
            a.load_state_dict(blk.attn.state_dict())
            blk.attn = a
    return model


def tiny_reference(model, video, cls_token=False):
    """One clip (C, T, H, W) alone on its kept tokens."""
    keep = reference_keep(video.transpose(0, 1), TS, P, 0.1).flatten()
    if cls_token:
        keep = torch.cat([torch.tensor([True]), keep])
    t = model.tokens(video[None])[:, keep]
    for blk in model.blocks:
        t = blk(t)
    t = model.norm(t)
    return model.head(t[:, 0] if cls_token else t.mean(1))[0]


@pytest.mark.parametrize("attention,cls_token,layout", [
    (None, True, "packed"), (None, True, "padded"), (SingleHead, False, "packed"), (HeadsInBatch, False, "packed")],
    ids=["class-token-packed", "class-token-padded", "single-head-packed", "heads-in-batch-packed"])
def test_user_model_attention_layouts(attention, cls_token, layout):
    """Attention over (B, H, N, d), (B, N, d) and (B * H, N, d): packed clips never share a matmul."""
    model = tiny(attention, cls_token)
    x = clips(KINDS, seed=4).transpose(1, 2)  # (B, C, T, H, W)
    opt = dittofx.optimize(model, [RLT(layout=layout)], (x,))
    bad = x.clone()
    bad[0, 2, 6, 20, 20] = float("nan")
    with torch.no_grad():
        assert_per_clip(opt(bad), bad, 0, model, lambda i: tiny_reference(model, x[i], cls_token))


def test_finite_clips():
    x = torch.zeros(5, 3, 4, 8, 8)
    x[1, 0, 0, 0, 0] = float("nan")
    x[2, 2, 3, 7, 7] = float("inf")
    x[3, 1, 2, 3, 4] = float("-inf")
    x[4, 0, 0, 0, 0], x[4, 0, 0, 0, 1] = float("inf"), float("-inf")
    assert finite_clips(x).tolist() == [True, False, False, False, False]
    # half precision: large finite values must not overflow the sum into a false "non-finite"
    assert finite_clips(torch.full((2, 3, 8, 32, 32), 100.0, dtype=torch.float16)).tolist() == [True, True]


@pytest.fixture(scope="module")
def onnx_session(videomae, tmp_path_factory):
    """The packed layout exported: it has every op the fix touches (the tokenizer's decision, attention one clip
    per row without a mask, the per-clip mean); the padded layout shares the tokenizer's decision."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from dittofx.exporters.onnx import export_onnx

    opt = dittofx.optimize(videomae.model, [RLT(tau=0.1, layout="packed")], videomae.example_inputs)
    path = tmp_path_factory.mktemp("rlt_nonfinite") / "rlt.onnx"
    export_onnx(opt, path, example_inputs=(clips(KINDS),))
    return ort.InferenceSession(str(path))


@pytest.mark.parametrize("value", VALUES[:2], ids=["nan", "inf"])
def test_onnx_nonfinite_pixel_stays_in_its_clip(videomae, onnx_session, value):
    name = onnx_session.get_inputs()[0].name
    x = poisoned(value, 6, clip=1)
    got = torch.from_numpy(onnx_session.run(None, {name: x.numpy()})[0])
    model = videomae.model
    with torch.no_grad():
        assert_per_clip(got, x, 1, lambda c: model(c).logits,
                        lambda i: videomae_reference(model, x[i], reference_keep(x[i], TS, P, 0.1)), rtol=1e-4)
