"""Every ATen form of a patch embedding gives the patch grid: ToMe merges on it, RLT cuts tubelets by it.

Each form is a small ViT whose patch embedding computes what a standard `Conv2d` (or `Conv3d`, for
video) with the same weights computes; ToMe on it is compared with the plain-PyTorch reference of
tests/passes/tome/reference.py, RLT with the standard form's result.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dittofx
from dittofx.errors import UnsupportedModelError
from dittofx.passes.rlt import keep_mask
from dittofx.rewriter.analysis import analyze, patch_grid, tubelets
from dittofx.rewriter.capture import capture
from dittofx.rewriter.edit import values_at
from tests.passes.tome import reference as ref

D, HEADS, P, SIZE = 32, 2, 4, 16  # width, heads, patch, image side: a 4x4 grid
TS, FRAMES = 2, 4  # video: tubelets of 2 frames, a 2x4x4 grid


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, D))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(D), Attention(), nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """`embed` maps the image (or video) to (B, N, D) tokens; a class token head or a mean pool."""

    def __init__(self, embed: nn.Module, tokens: int, cls_token: bool = True, depth: int = 3):
        super().__init__()
        self.embed = embed
        self.cls = nn.Parameter(torch.randn(1, 1, D)) if cls_token else None
        self.pos = nn.Parameter(torch.randn(1, tokens + int(cls_token), D) * 0.1)
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, 5)

    def tokens(self, x):
        t = self.embed(x)
        if self.cls is not None:
            t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1)
        return t + self.pos

    def forward(self, x):
        t = self.tokens(x)
        for blk in self.blocks:
            t = blk(t)
        t = self.norm(t)
        return self.head(t[:, 0] if self.cls is not None else t.mean(1))


# ---------------------------------------------------------------------------------------------
# the forms; each holds the weight and bias of the standard convolution (`conv`)


class ConvEmbed(nn.Module):
    """The standard form: nn.Conv2d / nn.Conv3d with padding=0 (ATen conv2d / conv3d), or the same
    convolution as `padding="valid"` (conv2d.padding / conv3d.padding) or `torch.convolution`."""

    def __init__(self, conv: nn.Module, how: str = "module"):
        super().__init__()
        self.conv, self.how = conv, how

    def forward(self, x):
        c = self.conv
        if self.how == "valid":
            conv = F.conv2d if x.dim() == 4 else F.conv3d
            y = conv(x, c.weight, c.bias, stride=c.stride, padding="valid")
        elif self.how == "convolution":
            y = torch.convolution(x, c.weight, c.bias, c.stride, [0] * (x.dim() - 2), [1] * (x.dim() - 2), False,
                                  [0] * (x.dim() - 2), 1)
        else:
            y = c(x)
        return y.flatten(2).transpose(1, 2)


class LinearEmbed(nn.Module):
    """A Linear over patches cut by `how`: Tensor.unfold, F.unfold (im2col), or reshape-permute-flatten;
    features in (channels, patch rows, patch columns) order, the conv's weight flattened."""

    def __init__(self, conv: nn.Module, how: str):
        super().__init__()
        self.how = how
        self.linear = nn.Linear(conv.weight[0].numel(), D)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight.flatten(1))
            self.linear.bias.copy_(conv.bias)

    def forward(self, x):
        if x.dim() == 5:  # (B, C, T, H, W) into tubelets (ts, p, p)
            if self.how == "unfold":
                x = x.unfold(2, TS, TS).unfold(3, P, P).unfold(4, P, P)  # (B, C, t, h, w, ts, p, p)
                x = x.permute(0, 2, 3, 4, 1, 5, 6, 7).flatten(4).flatten(1, 3)
            else:
                b, c, t, h, w = x.shape
                x = x.reshape(b, c, t // TS, TS, h // P, P, w // P, P).permute(0, 2, 4, 6, 1, 3, 5, 7)
                x = x.reshape(b, (t // TS) * (h // P) * (w // P), c * TS * P * P)
            return self.linear(x)
        if self.how == "unfold":
            x = x.unfold(2, P, P).unfold(3, P, P).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        elif self.how == "im2col":
            x = F.unfold(x, P, stride=P).transpose(1, 2)
        else:
            b, c, h, w = x.shape
            x = x.reshape(b, c, h // P, P, w // P, P).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * P * P)
        return self.linear(x)


IMAGE_FORMS = {  # name: (embedding, the ATen op it is captured as)
    "conv2d": (lambda c: ConvEmbed(c), "aten.conv2d.default"),
    "conv2d_valid": (lambda c: ConvEmbed(c, "valid"), "aten.conv2d.padding"),
    "convolution": (lambda c: ConvEmbed(c, "convolution"), "aten.convolution.default"),
    "unfold": (lambda c: LinearEmbed(c, "unfold"), "aten.unfold.default"),
    "im2col": (lambda c: LinearEmbed(c, "im2col"), "aten.im2col.default"),
    "reshape": (lambda c: LinearEmbed(c, "reshape"), "aten.permute.default"),
}
VIDEO_FORMS = {
    "conv3d": (lambda c: ConvEmbed(c), "aten.conv3d.default"),
    "conv3d_valid": (lambda c: ConvEmbed(c, "valid"), "aten.conv3d.padding"),
    "convolution3d": (lambda c: ConvEmbed(c, "convolution"), "aten.convolution.default"),
    "unfold3d": (lambda c: LinearEmbed(c, "unfold"), "aten.unfold.default"),
    "reshape3d": (lambda c: LinearEmbed(c, "reshape"), "aten.permute.default"),
}


def pair(form: str, cls_token: bool = True):
    """The ViT with the patch embedding in `form`, the same ViT with the standard convolution, an input."""
    torch.manual_seed(0)
    video = form in VIDEO_FORMS
    conv = nn.Conv3d(3, D, (TS, P, P), (TS, P, P)) if video else nn.Conv2d(3, D, P, P)
    grid = (FRAMES // TS if video else 1) * (SIZE // P) ** 2
    make, _ = (VIDEO_FORMS if video else IMAGE_FORMS)[form]
    standard = ViT(ConvEmbed(conv), grid, cls_token).eval()
    model = ViT(make(conv), grid, cls_token).eval()
    model.load_state_dict(standard.state_dict(), strict=False)  # blocks, class token, positions, head
    x = torch.randn(2, 3, FRAMES, SIZE, SIZE) if video else torch.randn(2, 3, SIZE, SIZE)
    return model, standard, x


def analysed(model, x):
    cap = capture(model, (x,))
    return cap, analyze(cap.graph_module, cap.batched_inputs)


def tome_reference(model: ViT, x, r: int):
    """ToMe on `model` (its own submodules, merges in between) by tests/passes/tome/reference.py."""
    with torch.no_grad():
        t = model.tokens(x)
        prefix = int(model.cls is not None)
        size, merged = torch.ones(t.shape[:2]), False
        for blk in model.blocks:
            h = blk.norm1(t)
            b, n, _ = h.shape
            q, k, v = blk.attn.qkv(h).reshape(b, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
            o = ref.attend(q, k, v, size if merged else None)
            t = t + blk.attn.proj(o.transpose(1, 2).reshape(b, n, -1))
            t, size, _ = ref.tome_merge(t, k.mean(1), size, r, prefix)
            merged = True
            t = t + blk.mlp(blk.norm2(t))
        t = model.norm(t)
        return model.head(t[:, 0] if prefix else ref.weighted_pool(t, size, 0))


@pytest.mark.parametrize("form", list(IMAGE_FORMS) + list(VIDEO_FORMS))
def test_every_form_gives_the_patch_grid(form):
    model, standard, x = pair(form)
    with torch.no_grad():  # the form computes what the standard convolution computes
        torch.testing.assert_close(model(x), standard(x), rtol=1e-5, atol=1e-5)
    cap, analysis = analysed(model, x)
    op = (VIDEO_FORMS | IMAGE_FORMS)[form][1]
    assert op in {str(n.target) for n in cap.graph_module.graph.nodes}
    assert len(analysis.sites) == 3
    grid = {"grid_h": SIZE // P, "grid_w": SIZE // P} | ({"grid_t": FRAMES // TS} if form in VIDEO_FORMS else {})
    for block, site in zip(analysis.blocks, analysis.sites):
        assert site.kind == ("joint" if form in VIDEO_FORMS else "spatial") and site.is_self
        assert {lab.kind: lab.size for lab in site.seq_axis.labels if lab.is_grid} == grid
        assert site.seq_axis.prefix == block.prefix == 1 and block.token_dim == 1
        if form in IMAGE_FORMS:
            assert patch_grid(site) is None  # the class token leads: not exactly the grid
    if form in IMAGE_FORMS:  # without the class token the tokens are exactly the grid, row-major
        model, _, x = pair(form, cls_token=False)
        assert {patch_grid(s) for s in analysed(model, x)[1].sites} == {(SIZE // P, SIZE // P)}


@pytest.mark.parametrize("form", ["conv2d_valid", "convolution", "unfold", "im2col", "reshape", "conv3d_valid",
                                  "unfold3d"])
@pytest.mark.parametrize("cls_token", [True, False])
def test_tome_on_every_form_matches_the_reference(form, cls_token):
    model, _, x = pair(form, cls_token)
    opt = dittofx.optimize(model, ["tome:r=2"], (x,))
    with torch.no_grad():
        out = opt(x)
    torch.testing.assert_close(out, tome_reference(model, x, 2), rtol=1e-5, atol=1e-5)
    assert sum("merged 2 tokens" in note for b in opt.report.blocks for note in b.actions) == 3


def test_siglip_patch_conv_with_valid_padding_is_spatial():
    """transformers' SiglipVisionModel: `Conv2d(padding="valid")`, ATen conv2d.padding."""
    transformers = pytest.importorskip("transformers")
    config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = transformers.SiglipVisionModel(config).eval()
    cap, analysis = analysed(model, torch.randn(2, 3, 32, 32))
    assert "aten.conv2d.padding" in {str(n.target) for n in cap.graph_module.graph.nodes}
    assert [(s.module.rsplit(".", 2)[-2], s.kind, patch_grid(s)) for s in analysis.sites] == \
        [("0", "spatial", (4, 4)), ("1", "spatial", (4, 4))]  # the encoder's layers; the pooling head has no SDPA


# ---------------------------------------------------------------------------------------------
# RLT: the tubelet grid of every form


def video_clips():
    """A static clip, one with a moving corner, one of noise: (B, C, T, H, W)."""
    g = torch.Generator().manual_seed(3)
    still = torch.randn(1, 3, 1, SIZE, SIZE, generator=g).expand(-1, -1, FRAMES, -1, -1).clone()
    corner = still.clone()
    corner[:, :, :, :P, :P] = torch.randn(1, 3, FRAMES, P, P, generator=g)
    return torch.cat([still, corner, torch.randn(1, 3, FRAMES, SIZE, SIZE, generator=g)])


@pytest.mark.parametrize("form", ["conv3d_valid", "convolution3d", "unfold3d", "reshape3d"])
def test_rlt_on_other_forms_matches_the_standard_form(form):
    model, standard, _ = pair(form, cls_token=False)
    x = video_clips()
    opt, expected = (dittofx.optimize(m, ["rlt:tau=0.1"], (x,)) for m in (model, standard))
    with torch.no_grad():
        torch.testing.assert_close(opt(x), expected(x), rtol=1e-5, atol=1e-5)
    assert opt.report.stats["rlt"].kept == expected.report.stats["rlt"].kept == [16, 17, 32]


@pytest.mark.parametrize("form", ["conv3d", "conv3d_valid", "unfold3d", "reshape3d"])
def test_tubelets_of_every_form(form):
    """What RLT reads of a tubelet embedding, whatever its form: the video, its (C, T, H, W) dims, the
    tubelet and the grid labels in the tokens; the tokenizer's decision on them is the standard one."""
    model, _, _ = pair(form, cls_token=False)
    x = video_clips()
    cap, analysis = analysed(model, x)
    (found,) = tubelets(analysis)
    assert found.form == ("convolution" if form.startswith("conv") else "linear")
    assert found.tubelet == (TS, P, P) and found.dims == (1, 2, 3, 4)
    assert [lab.size for lab in found.grid] == [FRAMES // TS, SIZE // P, SIZE // P]
    stream = analysis.axes.axis_of(analysis.blocks[0].sites[0].query, -2)
    assert [lab for lab in stream.labels if lab.is_grid] == list(found.grid)  # tokens in (t, h, w) order
    video = values_at(cap.graph_module, [found.video], [x])[found.video].permute(0, *found.dims)
    torch.testing.assert_close(video, x)
    assert keep_mask(video, found.tubelet, 0.1).flatten(1).sum(1).tolist() == [16, 17, 32]


class FramesFirst(nn.Module):
    """A Linear over tubelets of a (B, T, C, H, W) video, as transformers' VideoMAE takes it, cut by a
    reshape (the frames are dim 1); features in the conv's (channels, frames, rows, columns) order."""

    def __init__(self, conv):
        super().__init__()
        self.linear = nn.Linear(conv.weight[0].numel(), D)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight.flatten(1))
            self.linear.bias.copy_(conv.bias)

    def forward(self, x):
        b, t, c, h, w = x.shape
        x = x.reshape(b, t // TS, TS, c, h // P, P, w // P, P).permute(0, 1, 4, 6, 3, 2, 5, 7)
        return self.linear(x.reshape(b, -1, c * TS * P * P))


def test_tubelets_of_a_video_given_frames_first():
    model, _, _ = pair("conv3d", cls_token=False)
    model.embed = FramesFirst(model.embed.conv)
    cap, analysis = analysed(model, video_clips().transpose(1, 2))
    (found,) = tubelets(analysis)
    assert found.dims == (2, 1, 3, 4) and found.tubelet == (TS, P, P) and found.video.op == "placeholder"


def test_rlt_on_a_video_given_frames_first_matches_the_standard_form():
    model, standard, _ = pair("conv3d", cls_token=False)
    model.embed = FramesFirst(model.embed.conv)
    x = video_clips()
    opt = dittofx.optimize(model, ["rlt:tau=0.1"], (x.transpose(1, 2),))
    expected = dittofx.optimize(standard, ["rlt:tau=0.1"], (x,))
    with torch.no_grad():
        torch.testing.assert_close(opt(x.transpose(1, 2)), expected(x), rtol=1e-5, atol=1e-5)
    assert opt.report.stats["rlt"].kept == expected.report.stats["rlt"].kept == [16, 17, 32]


def test_conv3d_same_padding_is_refused_as_overlapping_tubelets_with_its_padding():
    """conv3d.padding with padding="same" (stride 1): the padding it adds, named in the refusal."""
    model = nn.Conv3d(3, D, (TS, P, P), padding="same").eval()
    cap, analysis = analysed(model, video_clips())
    (found,) = tubelets(analysis)
    assert str(found.node.target) == "aten.conv3d.padding"
    with pytest.raises(UnsupportedModelError, match=r"stride \(1, 1, 1\), padding \(1, 3, 3\)"):
        assert found.tubelet is None  # raises first


@pytest.mark.parametrize("form,named", [("conv2d", "embed.conv (conv2d)"), ("im2col", "embed.linear (linear over "
                                                                                      "patches)")])
def test_report_names_the_patch_embedding_of_any_form(form, named):
    model, _, x = pair(form)
    assert dittofx.optimize(model, [], (x,)).report.patch_embedding == named
