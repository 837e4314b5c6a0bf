"""ToMe's diffusion mode on joint text-image attention (passes/tome/joint.py).

A hand-written joint-attention DiT block (double-stream as SD3 / Flux: projections per stream,
concatenated after; single-stream as CogVideoX / HunyuanVideo: concatenated before one shared
projection) against a plain-PyTorch reference: image tokens merged by 2x2 grid cells, attention over
[merged image, text], every image token given its group's output. Then the zoo's joint models.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dittofx
from dittofx.errors import UnsupportedModelError
from dittofx.models import zoo
from dittofx.passes.tome import ToMe

try:  # tests/passes is a package
    from . import reference as ref
except ImportError:  # run as loose files
    import reference as ref

C, HEADS, PATCH, TEXT = 32, 2, 2, 5


class JointBlock(nn.Module):
    """Patchify, one joint attention block over [image, text] or [text, image], unpatchify."""

    def __init__(self, single: bool, frames: int = 1, rotary: bool = False):
        super().__init__()
        self.single, self.frames, self.rotary = single, frames, rotary
        angle = torch.arange(frames * 64 + TEXT)[:, None] * (0.3 ** torch.arange(C // HEADS // 2))
        self.register_buffer("cos", angle.cos().repeat(1, 2), persistent=False)  # (tokens, head dim)
        self.register_buffer("sin", angle.sin().repeat(1, 2), persistent=False)
        self.patch = nn.Conv2d(4, C, PATCH, PATCH)
        self.embed_text = nn.Linear(24, C)
        self.norm_x, self.norm_t = nn.LayerNorm(C), nn.LayerNorm(C)
        self.qkv = nn.ModuleList(nn.Linear(C, C) for _ in range(3))
        self.text_qkv = nn.ModuleList(nn.Linear(C, C) for _ in range(3))
        self.out, self.text_out = nn.Linear(C, C), nn.Linear(C, C)
        self.unpatch = nn.Linear(C, 4 * PATCH * PATCH)

    def tokens(self, x):
        b, f = x.shape[0], self.frames
        h = self.patch(x.flatten(0, 1) if f > 1 else x)  # (B*F, C, H', W')
        return h.flatten(2).transpose(1, 2).reshape(b, -1, C)

    def heads(self, z):
        return z.view(z.shape[0], -1, HEADS, C // HEADS).transpose(1, 2)

    def attention(self, a, t, n, text_mask=None, positions=None):
        """Joint attention of image tokens `a` (already normed) and text `t` -> (image out, text out);
        `text_mask` (B, TEXT) bool: the text tokens attended to (a padded prompt); with `rotary`, q and k
        rotated by the table rows of `positions` (default: every row, in order)."""
        mask = None
        if text_mask is not None:
            image = torch.ones(a.shape[0], a.shape[1], dtype=torch.bool)
            mask = torch.cat([text_mask, image] if self.single else [image, text_mask], dim=1)[:, None, None, :]
        if self.single:  # text first, one projection
            joint = torch.cat([t, a], dim=1)
            q, k, v = (self.heads(p(joint)) for p in self.qkv)
        else:  # image first, projections per stream
            q, k, v = (torch.cat([self.heads(p(a)), self.heads(tp(t))], dim=2)
                       for p, tp in zip(self.qkv, self.text_qkv))
        if self.rotary:
            cos, sin = (self.cos, self.sin) if positions is None else (self.cos[positions], self.sin[positions])
            half = C // HEADS // 2
            q, k = (z * cos + torch.cat([-z[..., half:], z[..., :half]], -1) * sin for z in (q, k))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        img, txt = (o[:, TEXT:], o[:, :TEXT]) if self.single else (o[:, :n], o[:, n:])
        return img, txt

    def forward(self, x, text, text_mask=None):
        h = self.tokens(x)
        t = self.embed_text(text)
        n = h.shape[1]
        img, txt = self.attention(self.norm_x(h), self.norm_t(t), n, text_mask)
        h = h + self.out(img)
        t = t + self.text_out(txt)
        return self.unpatch(h), t


def reference(model: JointBlock, x, text, ratio, grid, text_mask=None):
    """A merged token sits where its destination (the first of its group) does."""
    """The same block with tomesd's merge of the image tokens written out sample by sample."""
    frames, rows, cols = grid
    per_frame = ref.top_left_destinations(rows, cols)
    dst = [f * rows * cols + d for f in range(frames) for d in per_frame]
    h, t = model.tokens(x), model.embed_text(text)
    n = h.shape[1]
    r = int(n * ratio)
    a = model.norm_x(h)
    img_out = torch.empty_like(h)
    txt_out = torch.empty_like(t)
    for i in range(h.shape[0]):
        groups = ref.grid_match_one(h[i], dst, r)  # the metric: the image tokens entering the block
        merged = torch.stack([a[i][g].mean(0) for g in groups])[None]
        image_pos = torch.tensor([g[0] for g in groups])
        text_pos = torch.arange(n, n + TEXT) if not model.single else torch.arange(TEXT)
        pos = torch.cat([text_pos, image_pos + TEXT]) if model.single else torch.cat([image_pos, text_pos])
        img, txt = model.attention(merged, model.norm_t(t[i:i + 1]), merged.shape[1],
                                   None if text_mask is None else text_mask[i:i + 1], pos)
        for row, g in enumerate(groups):
            img_out[i, g] = img[0, row]
        txt_out[i] = txt[0]
    return model.unpatch(h + model.out(img_out)), t + model.text_out(txt_out)


def _inputs(frames):
    g = torch.Generator().manual_seed(0)
    shape = (2, frames, 4, 16, 16) if frames > 1 else (2, 4, 16, 16)
    return torch.randn(shape, generator=g), torch.randn(2, TEXT, 24, generator=g)


@pytest.mark.parametrize("single,frames,masked,rotary", [(False, 1, False, False), (True, 1, False, False),
                                                         (True, 3, False, False), (False, 1, True, False),
                                                         (False, 1, False, True), (True, 3, True, True)])
def test_hand_written_block_matches_reference(single, frames, masked, rotary):
    torch.manual_seed(1)
    model = JointBlock(single, frames, rotary).eval()
    x, text = _inputs(frames)
    text_mask = torch.tensor([[True] * TEXT, [True] * (TEXT - 2) + [False] * 2]) if masked else None
    args = (x, text) if text_mask is None else (x, text, text_mask)
    opt = dittofx.optimize(model, [ToMe(ratio=0.5)], args)
    lines = [a for b in opt.report.blocks for a in b.actions] + list(opt.report.notes)
    assert any(f"merged {32 * frames} of {64 * frames} image tokens" in a for a in lines)
    with torch.no_grad():
        got = opt(*args)
        want = reference(model, x, text, 0.5, (frames, 8, 8), text_mask)
        plain = model(*args)
    for g, w, p in zip(got, want, plain):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        assert (g - p).abs().max() > 1e-3  # the merge changed something, text outputs included


def test_hand_written_ratio0_is_the_original():
    model = JointBlock(False).eval()
    x, text = _inputs(1)
    opt = dittofx.optimize(model, [ToMe(ratio=0.0)], (x, text))
    with torch.no_grad():
        for g, w in zip(opt(x, text), model(x, text)):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# the zoo


# image tokens merged at ratio 0.5 in each joint attention (SD3, Flux: 8x8 patches; the video models 3 frames,
# CogVideoX 1.5: 2)
zoo_merged = {"sd3": 32, "flux": 32, "cogvideox": 96, "cogvideox5b": 96, "cogvideox15": 64, "wan": 96,
              "hunyuanvideo": 96, "allegro": 96, "easyanimate": 96}


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.mark.parametrize("name", list(zoo_merged))
def test_zoo_joint_models_merge(name):
    zm = zoo.build(name, batch=2)
    opt = dittofx.optimize(zm.model, [ToMe(ratio=0.5)], zm.example_inputs, zm.example_kwargs)
    actions = [a for b in opt.report.blocks for a in b.actions]
    assert sum(f"merged {zoo_merged[name]} of" in a for a in actions) == 2
    exact = dittofx.optimize(zm.model, [ToMe(ratio=0.0)], zm.example_inputs, zm.example_kwargs)
    with torch.no_grad():
        want = _first(zm.model(*zm.example_inputs, **zm.example_kwargs))
        got = _first(opt(*zm.example_inputs, **zm.example_kwargs))
        assert got.shape == want.shape and torch.isfinite(got).all()
        assert 1e-4 < (got - want).abs().max() < want.abs().max()  # merged: close, not equal
        torch.testing.assert_close(_first(exact(*zm.example_inputs, **zm.example_kwargs)), want, rtol=0, atol=0)


def test_attention_per_sample_is_refused_in_one_line():
    """Mochi attends sample by sample (its valid text tokens only): one projection feeds several attentions."""
    zm = zoo.build("mochi", batch=2)
    with pytest.raises(UnsupportedModelError) as e:
        dittofx.optimize(zm.model, [ToMe(ratio=0.5)], zm.example_inputs, zm.example_kwargs)
    assert "\n" not in str(e.value)


def test_packed_latents_take_a_square_grid_or_the_one_given():
    """Flux packs 2x2 latents into tokens before the model: the graph cannot tell rows from columns. 64
    tokens are read as 8x8 (said in the report); grid= sets another; a grid of another size is refused."""
    zm = zoo.build("flux", batch=2)
    args = zm.example_inputs, zm.example_kwargs
    square = dittofx.optimize(zm.model, [ToMe(ratio=0.5)], *args)
    assert any("read as a 8x8 grid" in a for b in square.report.blocks for a in b.actions)
    wide = dittofx.optimize(zm.model, [ToMe(ratio=0.5, grid=(4, 16))], *args)
    assert not any("read as" in a for b in wide.report.blocks for a in b.actions)
    with torch.no_grad():  # other cells, other destinations
        assert (_first(square(*args[0], **args[1])) - _first(wide(*args[0], **args[1]))).abs().max() > 1e-4
    with pytest.raises(UnsupportedModelError, match=r"grid=\(4, 8\) holds 32 tokens, the packed latent 64") as e:
        dittofx.optimize(zm.model, [ToMe(ratio=0.5, grid=(4, 8))], *args)
    assert "\n" not in str(e.value)


def test_use_rand_draws_destinations_on_every_call():
    model = JointBlock(False).eval()
    x, text = _inputs(1)
    opt = dittofx.optimize(model, [ToMe(ratio=0.5, use_rand=True, seed=0)], (x, text))
    fixed = dittofx.optimize(model, [ToMe(ratio=0.5)], (x, text))
    with torch.no_grad():
        first, second = opt(x, text)[0], opt(x, text)[0]
        assert (first - second).abs().max() > 1e-4  # new destinations each call
        torch.testing.assert_close(opt(x[:1], text[:1])[0], fixed(x[:1], text[:1])[0])  # odd batch: top-left
        opt.reset()  # the draws start again: with a seed, the first call's destinations
        assert torch.equal(opt(x, text)[0], first) and torch.equal(opt(x, text)[0], second)
