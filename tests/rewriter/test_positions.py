"""rewriter/positions.py on a tiny hand-written rotary attention: after the tokens entering the attention
are re-ordered and thinned (per sample), `follow_tokens` makes its rotary tables take the rows of the
positions the tokens carry, exactly as a plain-PyTorch reference that indexes the tables itself."""

import torch
import torch.nn.functional as F
from torch import nn

from dittofx.rewriter.analysis import analyze, projection_input
from dittofx.rewriter.capture import capture
from dittofx.rewriter.positions import follow_tokens, position_operands, positional_problem
from dittofx.rewriter.tokens import make_token_sizes_dynamic, token_labels


def rotate(x, sin, cos):
    pairs = x.unflatten(-1, (-1, 2))
    return x * cos + torch.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2) * sin


class RotaryAttention(nn.Module):
    """A class token and a 4x4 grid of patches; two rotary embeddings: a sin/cos table buffer applied to
    the patches only (slice, then cat with the class token: EVA02's form), and angles computed from
    arange over every token (VJEPA2's form)."""

    def __init__(self, dim=32, heads=2, grid=4):
        super().__init__()
        self.heads, n, d = heads, grid * grid, dim // heads
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        angles = torch.randn(n, d)
        self.register_buffer("sin", angles.sin())
        self.register_buffer("cos", angles.cos())

    def tokens(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1)

    def attend(self, t, sin, cos, ids):
        """sin, cos: (B, 1, patches, d) rows for the patch tokens; ids: (B, 1, N, 1) positions of all tokens."""
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q = torch.cat([q[:, :, :1], rotate(q[:, :, 1:], sin, cos)], dim=2)
        k = torch.cat([k[:, :, :1], rotate(k[:, :, 1:], sin, cos)], dim=2)
        angle = ids * 0.1
        q, k = rotate(q, angle.sin(), angle.cos()), rotate(k, angle.sin(), angle.cos())
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))

    def forward(self, x):
        t = self.tokens(x)
        n = t.shape[1]
        ids = torch.arange(n, device=x.device, dtype=x.dtype)[None, None, :, None]
        return self.attend(t, self.sin[None, None], self.cos[None, None], ids)


def select_tokens(t, keep):
    """The tokens at `keep` (B, N') of each sample, in that order."""
    return torch.stack([t[b, keep[b]] for b in range(t.shape[0])])


def batch_keep(keep):
    return keep


def _captured(model, *inputs):
    """The captured graph, its analysis and its one attention site, whose tables can follow."""
    cap = capture(model, inputs)
    analysis = analyze(cap.graph_module, cap.batched_inputs)
    (site,) = analysis.sites
    assert positional_problem(site) is None
    return cap.graph_module, analysis, site


def _kept():
    """Per sample, the class token and 9 of the 16 patches, in random order."""
    return torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(16)[:9] + 1]) for _ in range(2)])


def test_follow_tokens_matches_reference():
    torch.manual_seed(0)
    model = RotaryAttention().eval()
    x = torch.randn(2, 3, 16, 16)
    gm, analysis, site = _captured(model, x)
    assert len(position_operands(site)) == 8  # sin, cos of the table and of the angles, for q and for k
    keep = _kept()  # thin and re-order the tokens entering the attention
    positions = _thin(gm, analysis, site, keep)
    assert follow_tokens(gm, site, positions) == 8

    with torch.no_grad():
        got = gm(x)
        t = select_tokens(model.tokens(x), keep)
        rows = keep[:, 1:] - 1  # table rows of the kept patches
        want = model.attend(t, model.sin[rows][:, None], model.cos[rows][:, None], keep[:, None, :, None].float())
    got = got if isinstance(got, torch.Tensor) else got[0]
    assert got.shape == (2, 10, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class ShiftedRope(RotaryAttention):
    """The table starts past the class token in a model with no grid to say the class token is a prefix:
    the tokens are the rows of an input, not patches."""

    def forward(self, t):
        n = t.shape[1]
        ids = torch.arange(n, device=t.device, dtype=t.dtype)[None, None, :, None]
        return self.attend(t, self.sin[None, None], self.cos[None, None], ids)


def test_problem_is_one_line():
    torch.manual_seed(0)
    model = ShiftedRope().eval()
    cap = capture(model, (torch.randn(2, 17, 32),))
    (site,) = analyze(cap.graph_module, cap.batched_inputs).sites
    problem = positional_problem(site)
    assert problem is not None and "\n" not in problem
    assert "past the 0 leading tokens that never move" in problem


def rotate_into(x, sin, cos):
    """Wan's form: the rotated pairs written in place into the slices of a new tensor."""
    out = torch.empty_like(x)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 0::2]
    out[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 1::2]
    return out


class InPlaceRope(RotaryAttention):
    """Text tokens first, then patches; the rotary embedding written in place into the patch slice of q and
    k (CogVideoX's `q[:, :, text:] = rope(q[:, :, text:])`), computed into an empty tensor (Wan's form)."""

    def attend(self, t, sin, cos, ids):
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = q.clone(), k.clone()
        q[:, :, 1:] = rotate_into(q[:, :, 1:], sin, cos)
        k[:, :, 1:] = rotate_into(k[:, :, 1:], sin, cos)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


def test_follow_tokens_through_in_place_writes():
    torch.manual_seed(0)
    model = InPlaceRope().eval()
    x = torch.randn(2, 3, 16, 16)
    gm, analysis, site = _captured(model, x)
    assert len(position_operands(site)) == 8  # sin and cos of each of the two writes, for q and for k
    keep = _kept()
    positions = _thin(gm, analysis, site, keep)
    assert follow_tokens(gm, site, positions) == 8
    with torch.no_grad():
        got = gm(x)
        t = select_tokens(model.tokens(x), keep)
        rows = keep[:, 1:] - 1
        want = model.attend(t, model.sin[rows][:, None], model.cos[rows][:, None], None)
    got = got if isinstance(got, torch.Tensor) else got[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _thin(gm, analysis, site, keep):
    """The tokens entering the site's projection, taken at `keep` per sample; the positions node."""
    gm.register_buffer("keep", keep)
    make_token_sizes_dynamic(gm, analysis.axes, token_labels(site.seq_axis))
    entering = projection_input(site.value)
    graph = gm.graph
    with graph.inserting_after(entering):
        table = graph.get_attr("keep")
    with graph.inserting_after(table):
        positions = graph.call_function(batch_keep, (table,))
    with graph.inserting_after(positions):
        thinned = graph.call_function(select_tokens, (entering, positions))
    entering.replace_all_uses_with(thinned, delete_user_cb=lambda u: u is not thinned)
    gm.recompile()
    return positions


class InputRope(RotaryAttention):
    """The tables are inputs with a batch axis (a DiT fed its positions' frequencies per sample)."""

    def forward(self, x, sin, cos):
        t = self.tokens(x)
        ids = torch.arange(t.shape[1], device=x.device, dtype=x.dtype)[None, None, :, None]
        return self.attend(t, sin, cos, ids)


def test_follow_tokens_with_per_sample_tables():
    torch.manual_seed(0)
    model = InputRope().eval()
    x, sin, cos = torch.randn(2, 3, 16, 16), torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    gm, analysis, site = _captured(model, x, sin, cos)
    keep = _kept()
    positions = _thin(gm, analysis, site, keep)
    assert follow_tokens(gm, site, positions) == 8
    with torch.no_grad():
        got = gm(x, sin, cos)
        t = select_tokens(model.tokens(x), keep)
        rows = (keep[:, 1:] - 1)[:, None, :, None].expand(-1, 1, -1, 16)
        want = model.attend(t, sin.gather(2, rows), cos.gather(2, rows), keep[:, None, :, None].float())
    got = got if isinstance(got, torch.Tensor) else got[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
