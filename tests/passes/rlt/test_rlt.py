"""Run-Length Tokenization: exact against a plain-PyTorch reference that runs each clip alone on its
kept tokens; no-op at tau < 0; packed clips; errors; ONNX with the tokenizer in the graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dittofx
from dittofx.errors import PassSpecError, UnsupportedModelError
from dittofx.models import zoo
from dittofx.passes.rlt import RLT
from dittofx.passes.spec import parse_pass

TS, P = 2, 8  # the zoo VideoMAE: 8 frames of 32x32, tubelets of 2x8x8 -> 4 x 4 x 4 tokens

# ---------------------------------------------------------------------------------------------
# the reference: one clip at a time, loops over positions, the model's own submodules


def reference_keep(clip: torch.Tensor, ts: int, p: int, tau: float, compare: str = "previous") -> torch.Tensor:
    """clip (T, C, H, W), the pixels the model receives -> bool (T/ts, H/p, W/p).

    The paper's rule: the last frame of tubelet t against the first frame of tubelet t-1 (or, with
    run_start, of the tubelet that started the current run), mean |difference| over the patch's
    pixels and channels; dropped when <= tau; tubelet 0 always kept."""
    t_, _, h, w = clip.shape
    nt, nh, nw = t_ // ts, h // p, w // p
    keep = torch.zeros(nt, nh, nw, dtype=torch.bool)
    keep[0] = True
    for i in range(nh):
        for j in range(nw):
            start = 0
            for t in range(1, nt):
                ref = t - 1 if compare == "previous" else start
                now = clip[t * ts + ts - 1, :, i * p:(i + 1) * p, j * p:(j + 1) * p]
                then = clip[ref * ts, :, i * p:(i + 1) * p, j * p:(j + 1) * p]
                if (now - then).abs().mean() > tau:
                    keep[t, i, j] = True
                    start = t
    return keep


def reference_lengths(keep: torch.Tensor) -> list[int]:
    """Run length of each kept token, listed in the tokens' own (t, h, w) order."""
    nt, nh, nw = keep.shape
    out = []
    for t in range(nt):
        for i in range(nh):
            for j in range(nw):
                if keep[t, i, j]:
                    nxt = next((u for u in range(t + 1, nt) if keep[u, i, j]), nt)
                    out.append(nxt - t)
    return out


def videomae_reference(model, clip: torch.Tensor, keep: torch.Tensor, length_table=None) -> torch.Tensor:
    """Logits of one clip (T, C, H, W) run alone on its kept tokens."""
    emb = model.videomae.embeddings
    with torch.no_grad():
        x = emb.patch_embeddings(clip[None]) + emb.position_embeddings
        x = x[:, keep.flatten()]
        if length_table is not None:
            x = x + length_table[torch.tensor(reference_lengths(keep)) - 1]
        for layer in model.videomae.encoder.layer:
            x = layer(x)
        return model.classifier(model.fc_norm(x.mean(1)))[0]


def clips(batch_kinds, seed=0, frames=8, size=32):
    """A batch of (T, C, H, W) clips: "static" (one frame repeated), "partial" (a static frame with a
    moving 16x16 corner), "noise" (every frame new)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for kind in batch_kinds:
        base = torch.randn(1, 3, size, size, generator=g).expand(frames, -1, -1, -1).clone()
        if kind == "partial":
            base[:, :, :16, :16] = torch.randn(frames, 3, 16, 16, generator=g)
        elif kind == "noise":
            base = torch.randn(frames, 3, size, size, generator=g)
        out.append(base)
    return torch.stack(out)


@pytest.fixture(scope="module")
def videomae():
    return zoo.build("videomae", batch=3)


@pytest.fixture(scope="module", params=["packed", "padded"])
def packed(videomae, request):
    """RLT in either layout: packed (the default alone) or padded (what a later ToMe pass gets)."""
    return dittofx.optimize(videomae.model, [RLT(tau=0.1, layout=request.param)], videomae.example_inputs)


def logits(out):
    return out.logits if hasattr(out, "logits") else out


# ---------------------------------------------------------------------------------------------
# exactness


def test_tau_negative_is_the_untouched_model(videomae):
    x = clips(["static", "partial", "noise"])
    opt = dittofx.optimize(videomae.model, [RLT(tau=-1)], (x,))
    with torch.no_grad():
        assert torch.equal(logits(opt(x)), videomae.model(x).logits)
    assert "graph left unchanged" in " ".join(opt.report.notes)


def test_mixed_batch_matches_each_clip_alone(videomae, packed):
    x = clips(["static", "partial", "noise"])
    with torch.no_grad():
        out = logits(packed(x))
    keeps = [reference_keep(c, TS, P, 0.1) for c in x]
    assert [int(k.sum()) for k in keeps] == [16, 28, 64]  # the test clips are what they claim
    for i, (clip, keep) in enumerate(zip(x, keeps)):
        torch.testing.assert_close(out[i], videomae_reference(videomae.model, clip, keep), rtol=1e-5, atol=1e-5)
    # report: tokens kept per clip in the last forward
    stats = packed.report.stats["rlt"]
    assert stats.kept == [16, 28, 64] and stats.total == 64
    assert "[16, 28, 64] of 64" in str(packed.report)


def test_nothing_static_is_the_untouched_model(videomae, packed):
    x = clips(["noise"] * 4, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(logits(packed(x)), videomae.model(x).logits, rtol=1e-5, atol=1e-5)
    assert packed.report.stats["rlt"].kept == [64] * 4


@pytest.mark.parametrize("kinds", [["static"], ["partial", "static"],
                                   ["noise", "static", "partial", "partial", "static"]])
def test_any_batch_size_and_mix(videomae, packed, kinds):
    x = clips(kinds, seed=len(kinds))
    with torch.no_grad():
        out = logits(packed(x))
    for i, clip in enumerate(x):
        ref = videomae_reference(videomae.model, clip, reference_keep(clip, TS, P, 0.1))
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)
    assert len(packed.variants) == 1  # one graph serves every batch size and every kept count


def drift_clip(delta=0.03, frames=8, size=32, seed=5):
    """A static frame whose left half brightens by `delta` per frame: 3 * delta per compared pair
    (frames 2t+1 and 2t-2) stays under tau=0.1, the drift from a run's start does not."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 3, size, size, generator=g).expand(frames, -1, -1, -1).clone()
    base[:, :, :, :16] += delta * torch.arange(frames, dtype=torch.float32)[:, None, None, None]
    return base


def test_run_start_keeps_slow_drift(videomae):
    x = torch.stack([drift_clip(), clips(["partial"])[0]])
    prev, run = reference_keep(x[0], TS, P, 0.1), reference_keep(x[0], TS, P, 0.1, "run_start")
    assert int(prev.sum()) == 16 and int(run.sum()) == 16 + 8  # previous drops the drift, run_start keeps t=2
    opt = dittofx.optimize(videomae.model, [RLT(compare="run_start")], (x,))
    with torch.no_grad():
        out = logits(opt(x))
    for i, clip in enumerate(x):
        ref = videomae_reference(videomae.model, clip, reference_keep(clip, TS, P, 0.1, "run_start"))
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)
    assert opt.report.stats["rlt"].kept == [24, 28]


def test_length_embedding_zero_init_then_learned(videomae, packed):
    x = clips(["partial", "static", "noise"], seed=7)
    x[0, 4:] = x[0, 4:].flip(-1)  # a cut at frame 4: runs of different lengths at different positions
    opt = dittofx.optimize(videomae.model, [RLT(length_embedding=True, layout=packed.passes[0].layout)], (x,))
    with torch.no_grad():
        torch.testing.assert_close(logits(opt(x)), logits(packed(x)), rtol=0, atol=0)  # zero-initialised
    state = opt.graph_module.rlt
    assert state.length_embedding.shape == (4, 64) and state.length_embedding.requires_grad
    table = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        state.length_embedding.copy_(table)
        out = logits(opt(x))
    keeps = [reference_keep(c, TS, P, 0.1) for c in x]
    want = sum((reference_lengths(k) for k in keeps), [])
    assert state.lengths.tolist() == want
    # the reference code's order (h, w, t) gives other lengths for these tokens: the bug is avoided
    hwt = [(nxt - t) for k in keeps[:1] for i in range(4) for j in range(4) for t in range(4) if k[t, i, j]
           for nxt in [next((u for u in range(t + 1, 4) if k[u, i, j]), 4)]]
    assert hwt != reference_lengths(keeps[0]) and sorted(hwt) == sorted(reference_lengths(keeps[0]))
    for i, (clip, keep) in enumerate(zip(x, keeps)):
        ref = videomae_reference(videomae.model, clip, keep, length_table=table)
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)


def test_backbone_outputs_every_token_run_length_decoded(videomae):
    """VideoMAEModel returns the token sequence: dropped tokens take their run's kept token."""
    backbone = videomae.model.videomae
    x = clips(["static", "noise", "partial"], seed=2)
    opt = dittofx.optimize(backbone, [RLT()], (x,))
    with torch.no_grad():
        out = opt(x).last_hidden_state
        full = backbone(x).last_hidden_state
    assert out.shape == full.shape
    torch.testing.assert_close(out[1], full[1], rtol=1e-5, atol=1e-5)  # the noise clip keeps everything
    emb = backbone.embeddings
    for i in (0, 2):
        keep = reference_keep(x[i], TS, P, 0.1)
        with torch.no_grad():
            t = (emb.patch_embeddings(x[i:i + 1]) + emb.position_embeddings)[:, keep.flatten()]
            for layer in backbone.encoder.layer:
                t = layer(t)
        kept_pos = keep.flatten().nonzero().squeeze(1).tolist()
        grid = keep.clone()
        for n in range(64):
            tt, rest = divmod(n, 16)
            start = max(u for u in range(tt + 1) if grid[u].flatten()[rest])
            torch.testing.assert_close(out[i, n], t[0, kept_pos.index(start * 16 + rest)], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# RLT, then ToMe


def videomae_tome_reference(model, clip, keep, r):
    """One clip alone: its kept tokens, then ToMe (tests/passes/tome/reference.py, written for the ToMe tests) after
    every layer's attention, proportional attention, size-weighted mean pooling."""
    from tests.passes.tome.reference import attend, tome_merge, weighted_pool

    emb = model.videomae.embeddings
    with torch.no_grad():
        t = (emb.patch_embeddings(clip[None]) + emb.position_embeddings)[:, keep.flatten()]
        size, merged = torch.ones(t.shape[:2]), False
        for layer in model.videomae.encoder.layer:
            a = layer.attention.attention
            h = layer.layernorm_before(t)
            b, n, _ = h.shape
            q, k, v = (proj(h).view(b, n, -1, a.attention_head_size).transpose(1, 2)
                       for proj in (a.query, a.key, a.value))
            o = attend(q, k, v, size if merged else None, scale=a.scaling)
            t = layer.attention.output(o.transpose(1, 2).reshape(b, n, -1), None) + t
            t, size, _ = tome_merge(t, k.mean(1), size, r, 0)
            merged = True
            t = layer.output(layer.intermediate(layer.layernorm_after(t)), t)
        return model.classifier(model.fc_norm(weighted_pool(t, size, 0)))[0]


def test_composes_with_tome(videomae):
    from dittofx.passes import tome

    x = clips(["noise", "partial", "static"], seed=11)
    opt = dittofx.optimize(videomae.model, [RLT(), tome.ToMe(r=4)], (x,))
    notes = " ".join(opt.report.notes)
    assert "padded to the longest" in notes  # RLT saw a later pass change tokens: one clip per row
    assert any("tome" in a for b in opt.report.blocks for a in b.actions)
    with torch.no_grad():
        out = logits(opt(x))
        assert opt.report.stats["rlt"].kept == [64, 28, 16]
        alone = [logits(opt(x[i:i + 1]))[0] for i in range(3)]
    keeps = [reference_keep(c, TS, P, 0.1) for c in x]
    # a clip alone (no padding), and the longest clip of a batch, are RLT then ToMe on that clip exactly
    for i in range(3):
        torch.testing.assert_close(alone[i], videomae_tome_reference(videomae.model, x[i], keeps[i], 4),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0], alone[0], rtol=1e-5, atol=1e-5)
    # shorter clips carry copies of their last token, weighted as one: ToMe merges those first
    assert torch.isfinite(out).all()
    # ToMe with r=0 after RLT is RLT alone
    plain = dittofx.optimize(videomae.model, [RLT(layout="padded")], (x,))
    r0 = dittofx.optimize(videomae.model, [RLT(), tome.ToMe(r=0)], (x,))
    with torch.no_grad():
        torch.testing.assert_close(logits(r0(x)), logits(plain(x)), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# a user's own video model: Conv3d tubelets + positional embedding, optional class token


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyVideoViT(nn.Module):
    """Input (B, C, T, H, W); tubelets 2x8x8; mean pooling, or a class token head."""

    def __init__(self, frames=8, size=32, dim=48, heads=3, depth=2, classes=5, cls_token=False):
        super().__init__()
        self.embed = nn.Conv3d(3, dim, (2, 8, 8), (2, 8, 8))
        n = (frames // 2) * (size // 8) ** 2
        self.cls = nn.Parameter(torch.randn(1, 1, dim)) if cls_token else None
        self.pos = nn.Parameter(torch.randn(1, n + int(cls_token), dim) * 0.1)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def tokens(self, video):
        x = self.embed(video).flatten(2).transpose(1, 2)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos

    def forward(self, video):
        x = self.tokens(video)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return self.head(x[:, 0] if self.cls is not None else x.mean(1))


@pytest.mark.parametrize("cls_token", [False, True])
def test_user_model_with_and_without_class_token(cls_token):
    torch.manual_seed(0)
    model = TinyVideoViT(cls_token=cls_token).eval()
    x = clips(["static", "noise", "partial"], seed=4).transpose(1, 2)  # (B, C, T, H, W)
    opt = dittofx.optimize(model, ["rlt:tau=0.1"], (x,))
    with torch.no_grad():
        out = opt(x)
        for i in range(3):
            keep = reference_keep(x[i].transpose(0, 1), TS, P, 0.1).flatten()
            if cls_token:
                keep = torch.cat([torch.tensor([True]), keep])
            t = model.tokens(x[i:i + 1])[:, keep]
            for blk in model.blocks:
                t = blk(t)
            t = model.norm(t)
            ref = model.head(t[:, 0] if cls_token else t.mean(1))[0]
            torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)
    assert opt.report.stats["rlt"].kept == [16, 64, 28]
    assert ("token 0 taken per clip" in " ".join(opt.report.notes)) == cls_token


def test_vivit_class_token_head():
    """transformers' ViViT: Conv3d tubelets, a class token, positional embeddings, a class-token head."""
    from transformers import VivitConfig, VivitForVideoClassification

    torch.manual_seed(0)
    cfg = VivitConfig(image_size=32, num_frames=8, tubelet_size=[2, 8, 8], hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=128, num_labels=5)
    model = VivitForVideoClassification(cfg).eval()
    x = clips(["static", "partial", "noise"], seed=6)
    opt = dittofx.optimize(model, ["rlt"], (x,))
    with torch.no_grad():
        out = logits(opt(x))
        for i in range(3):
            keep = torch.cat([torch.tensor([True]), reference_keep(x[i], TS, P, 0.1).flatten()])
            t = model.vivit.embeddings(x[i:i + 1])[:, keep]
            for layer in model.vivit.layers:
                t = layer(t)
                t = t[0] if isinstance(t, tuple) else t
            ref = model.classifier(model.vivit.layernorm(t)[:, 0])[0]
            torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)
    assert opt.report.stats["rlt"].kept == [16, 28, 64]


# ---------------------------------------------------------------------------------------------
# options, applicability, errors


def test_packed_layout_before_a_token_pass_is_refused(videomae):
    with pytest.raises(PassSpecError, match="layout='padded'"):
        dittofx.optimize(videomae.model, [RLT(layout="packed"), "tome:r=2"], videomae.example_inputs)


def test_spec_and_options():
    p = parse_pass("rlt:tau=0.2,compare=run_start,length_embedding=true")
    assert (p.tau, p.compare, p.length_embedding) == (0.2, "run_start", True)
    assert parse_pass(p.spec()).options() == p.options()
    assert RLT().spec() == "rlt:tau=0.1"
    for bad in ("rlt:tau='x'", "rlt:compare=next", "rlt:length_embedding=2", "rlt:window=3"):
        with pytest.raises(PassSpecError):
            parse_pass(bad)


def test_report_says_where_rlt_applies(videomae, packed):
    assert all("rlt" in b.applicable for b in packed.report.blocks)
    image = zoo.build("hf_vit")
    from dittofx.rewriter.analysis import analyze
    from dittofx.rewriter.capture import capture

    cap = capture(image.model, image.example_inputs)
    analysis = analyze(cap.graph_module, cap.batched_inputs)
    reason = RLT().check(analysis, analysis.blocks[0])
    assert reason and "tubelet" in reason and "\n" not in reason


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_error_no_tubelet_embedding():
    image = zoo.build("hf_vit")
    with pytest.raises(UnsupportedModelError) as e:
        dittofx.optimize(image.model, [RLT()], image.example_inputs)
    assert "no tubelet embedding" in one_line(e) and "Conv3d" in one_line(e)


@pytest.mark.parametrize("shape,what", [((2, 3, 7, 32, 32), "7 frames"), ((2, 3, 8, 36, 32), "36x32")])
def test_error_video_not_divisible_into_tubelets(shape, what):
    model = TinyVideoViT(frames=shape[2] // 2 * 2, size=32).eval()
    model.pos = nn.Parameter(torch.zeros(1, 1, 48))  # broadcast: any token count runs
    with pytest.raises(UnsupportedModelError) as e:
        dittofx.optimize(model, [RLT()], (torch.randn(shape),))
    text = one_line(e)
    assert "not divisible into tubelets of 2x8x8" in text and what in text


# ---------------------------------------------------------------------------------------------
# export


def test_onnx_tokenizer_in_the_graph(videomae, packed, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from dittofx.exporters.onnx import export_onnx

    x = clips(["static", "partial", "noise"])
    result = export_onnx(packed, tmp_path / "rlt.onnx", example_inputs=(x,))
    assert result.max_rel_diff < 1e-4
    assert result.trt_report.ok  # NonZero is a warning (the runner needs an output allocator), not an error
    assert any("NonZero" in str(w) for w in result.trt_report.warnings)
    session = ort.InferenceSession(str(tmp_path / "rlt.onnx"))
    name = session.get_inputs()[0].name
    # one clip, clips of one length (no pad slots: no extra column of v), clips of different lengths
    for kinds in (["static"], ["noise", "noise"], ["noise", "partial"], ["static", "static", "partial", "noise"]):
        xb = clips(kinds, seed=9)
        got = session.run(None, {name: xb.numpy()})[0]
        with torch.no_grad():
            want = logits(packed(xb))
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_fullgraph(videomae):
    x = clips(["static", "partial", "noise"])
    opt = dittofx.optimize(videomae.model, [RLT()], (x,), compile=True)
    with torch.no_grad():
        out = logits(opt(x))
    for i, clip in enumerate(x):
        ref = videomae_reference(videomae.model, clip, reference_keep(clip, TS, P, 0.1))
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)
    assert opt.report.stats["rlt"].kept == [16, 28, 64]
