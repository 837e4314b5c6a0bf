"""Run-Length Tokenization (Choudhury et al., NeurIPS 2024) as a front end inserted into video ViTs.

    opt = dittofx.optimize(videomae, ["rlt:tau=0.1"], example_inputs=(clips,))
    logits = opt(clips)
    opt.report.stats["rlt"].kept      # grid tokens kept per clip in the last forward (also in str(report))

What the pass inserts, right where the patch tokens (with their positional embeddings) enter the
first transformer block:

1. The tokenizer. The video is cut into tubelets by the model's Conv3d patch embedding (kernel =
   stride = (ts, ph, pw)); its input is the normalised video the model sees, (B, C, T, H, W). For
   each tubelet t >= 1 and spatial position, the last frame of tubelet t is compared with the first
   frame of tubelet t-1 (`compare="previous"`: DESIGN.md's wording and the reference code,
   `x[:, :, 2ts-1::ts] - x[:, :, :-ts:ts]`), or with the first frame of the tubelet that started
   the current run (`compare="run_start"`, so slow drift accumulates until it is kept): mean
   absolute difference over the patch's pixels and channels. A token is dropped when that
   difference is <= tau; tubelet 0 is always kept.
2. The kept tokens, with the positional embeddings they already carry, in their own (t, h, w)
   order; optionally plus a learned run-length embedding: zero-initialised, row l - 1 for a run of l
   tubelets (tubelets until the next kept token at that position), computed in the tokens' own order
   (the reference code computes lengths in (h, w, t) order against (t, h, w) tokens: a bug avoided).
3. One of two layouts (`layout="auto"` picks packed, or padded when a later pass changes tokens):
   - packed: the clips of the batch in one sequence (1, L, D), L = all kept tokens. Token-wise
     layers run on exactly L tokens. Attention is block-diagonal: at each site q, k, v are laid out
     one clip per row (B, H, M, d), M the longest clip, with pad slots masked as keys by an SDPA
     mask (no L x L mask, so attention costs what per-clip attention costs), and put back after.
   - padded: one clip per row (B, M, D); a shorter clip ends with copies of its last token, which
     together count as one token through ToMe's token sizes (log(size) added to the attention
     logits, size-weighted means). A ToMe pass after RLT continues from those sizes and merges
     within each clip (the copies, identical, merge first).
4. Per-clip exits: a mean over the tokens (VideoMAE's mean pooling before fc_norm) averages each
   clip's kept tokens; a class token (`x[:, 0]`) or a first-tubelet token is each clip's own; a
   token sequence returned by the model is run-length decoded back to (B, N, ...) (a dropped token
   gets the value of the kept token that starts its run).

Sizes that the capture hard-coded (token count; packed: the batch) are rewritten by the rewriter's
token-size facility to be read at run time. `tau < 0` keeps every token: the pass then leaves the
graph untouched (identical outputs).

Exporting: the tokenizer is plain tensor code; under torch.export it becomes NonZero + Gather with a
data-dependent sequence length, so `export_onnx(opt, ...)` writes one ONNX file with the tokenizer
inside (TensorRT: NonZero needs an output allocator). While exporting, pad slots are left out of the
softmax by renormalising with an extra column of v instead of a mask (cheaper in onnxruntime; see
`rlt_attention`).
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensor

from dittofx.errors import PassSpecError, UnsupportedModelError
from dittofx.passes.base import Pass, PassContext, PassResult
from dittofx.rewriter import axes as ax
from dittofx.rewriter.analysis import SDPA, Analysis, Block, module_path
from dittofx.rewriter.graph import (
    copy_scope,
    descendants,
    sdpa_is_causal,
    sdpa_mask,
    set_sdpa_mask,
)
from dittofx.rewriter.tokens import make_token_sizes_dynamic

aten = torch.ops.aten
CONVS = (aten.conv3d.default, aten.convolution.default)
COMPARES = ("previous", "run_start")
LAYOUTS = ("auto", "packed", "padded")
# ops that mix tokens other than through attention: packing clips would make them mix clips
TOKEN_MIXING = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
                aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
                aten.max_pool2d.default, aten.max_pool3d.default, aten.roll.default, aten.flip.default,
                aten.cumsum.default, aten.sort.default, aten.topk.default}


# ---------------------------------------------------------------------------------------------
# the algorithm, on tensors


def patch_diff(a: torch.Tensor, b: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """Mean |a - b| over channels and each ph x pw patch: (B, C, [T,] H, W) -> (B, [T,] H/ph, W/pw)."""
    d = (a - b).abs()
    h, w = d.shape[-2], d.shape[-1]
    d = d.reshape(*d.shape[:-2], h // ph, ph, w // pw, pw)
    return d.mean(dim=(1, -3, -1))


def keep_mask(video: torch.Tensor, tubelet: tuple[int, int, int], tau: float, compare: str = "previous") -> torch.Tensor:
    """Which tubelet tokens to keep: video (B, C, T, H, W) -> bool (B, T/ts, H/ph, W/pw)."""
    ts, ph, pw = tubelet
    b, _, t, h, w = video.shape
    nt = t // ts
    keep0 = torch.ones((b, 1, h // ph, w // pw), dtype=torch.bool, device=video.device)
    if nt == 1:
        return keep0
    if compare == "previous":
        # last frame of tubelets 1.. against the first frame of tubelets 0..nt-2 (the reference code's
        # x[:, :, 2ts-1::ts] - x[:, :, :-ts:ts])
        diff = patch_diff(video[:, :, 2 * ts - 1:nt * ts:ts], video[:, :, 0:(nt - 1) * ts:ts], ph, pw)
        return torch.cat([keep0, diff > tau], dim=1)
    first = video[:, :, 0:nt * ts:ts]  # first frame of every tubelet
    last = video[:, :, ts - 1:nt * ts:ts]  # last frame of every tubelet
    # run_start: compare with the first frame of the tubelet that started the current run
    ref = first[:, :, 0]
    keeps = [keep0[:, 0]]
    for i in range(1, nt):
        k = patch_diff(last[:, :, i], ref, ph, pw) > tau  # (B, h', w')
        keeps.append(k)
        sel = k.repeat_interleave(ph, dim=1).repeat_interleave(pw, dim=2).unsqueeze(1)
        ref = torch.where(sel, first[:, :, i], ref)
    return torch.stack(keeps, dim=1)


def run_lengths(keep: torch.Tensor) -> torch.Tensor:
    """(B, T', H', W') bool -> int64 run length of each token: tubelets until the next kept one at
    the same position (or the end of the clip). Meaningful at kept tokens."""
    nt = keep.shape[1]
    nxt = torch.full_like(keep[:, 0], nt, dtype=torch.long)
    out = [None] * nt
    for t in range(nt - 1, -1, -1):
        out[t] = nxt - t
        nxt = torch.where(keep[:, t], torch.full_like(nxt, t), nxt)
    return torch.stack(out, dim=1)


def _nonzero(flat: torch.Tensor, hint: int) -> torch.Tensor:
    """Indices of the kept tokens. Under a fake-tensor mode without a shape environment (the
    rewriter's metadata refresh) the count is unknown: the example's count `hint` stands in."""
    try:
        idx = flat.nonzero().squeeze(1)
    except DynamicOutputShapeException:
        return torch.arange(hint, device=flat.device)
    torch._check(idx.shape[0] >= 1)
    return idx


def _record(state: nn.Module, name: str, value: torch.Tensor) -> None:
    """Keep a run-time value on `state` for the report: in eager and under torch.compile (a side
    effect dynamo replays), not while exporting or propagating fake tensors."""
    if torch.compiler.is_exporting():
        return
    if not torch.compiler.is_compiling() and (isinstance(value, FakeTensor)
                                              or torch._guards.detect_fake_mode(value) is not None):
        return
    setattr(state, name, value.detach())


class RLTState(nn.Module):
    """What the inserted tokenizer needs: the tubelet geometry, the options, the learned length
    embedding, and the counts of the last forward (`kept`, `total`; the report shows them)."""

    def __init__(self, tubelet, grid, order, prefix, dim, tau, compare, length_embedding, hint, hint_slots,
                 hint_grid):
        super().__init__()
        self.tubelet = tuple(tubelet)
        self.grid = tuple(grid)  # (T', H', W')
        self.order = tuple(order)  # token order as a permutation of (t, h, w) = (0, 1, 2), major first
        self.prefix = prefix
        self.tau = float(tau)
        self.compare = compare
        # on the example: the packed length, the longest clip, the kept tubelets
        self.hint, self.hint_slots, self.hint_grid = hint, hint_slots, hint_grid
        # row l - 1 for a run of l tubelets (prefix tokens get none), zero at first: the model is unchanged
        self.length_embedding = nn.Parameter(torch.zeros(grid[0], dim)) if length_embedding else None
        self.kept_counts: torch.Tensor | None = None  # (B,) set by every forward
        self.lengths: torch.Tensor | None = None  # run lengths of the packed tokens (with length_embedding)

    @property
    def kept(self) -> list[int] | None:
        """Grid tokens kept per clip in the last forward (eager or torch.compile)."""
        return None if self.kept_counts is None else [int(c) for c in self.kept_counts.tolist()]

    @property
    def total(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def __str__(self) -> str:
        if self.kept is None:
            return f"tokens kept per clip: (no forward yet) of {self.total}"
        share = sum(self.kept) / (len(self.kept) * self.total)
        return f"tokens kept per clip in the last forward: {self.kept} of {self.total} ({share:.0%})"

    def extra_repr(self) -> str:
        return f"tubelet={self.tubelet}, grid={self.grid}, tau={self.tau}, compare={self.compare!r}"


def rlt_keep(state: "RLTState", video: torch.Tensor) -> torch.Tensor:
    """The tokenizer's decision, (B, T', H', W') bool, from the normalised video (B, C, T, H, W)."""
    return keep_mask(video, state.tubelet, state.tau, state.compare)


def _forward_fill(keep: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """For every (b, t, h, w): pos of the kept token that starts its run (the last kept t' <= t)."""
    cover, covers = pos[:, 0], [pos[:, 0]]
    for t in range(1, keep.shape[1]):
        cover = torch.where(keep[:, t], pos[:, t], cover)
        covers.append(cover)
    return torch.stack(covers, dim=1)


def rlt_patch_embed(state: "RLTState", video: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    keep: torch.Tensor) -> torch.Tensor:
    """The model's Conv3d tubelet embedding (kernel = stride), computed for the kept tubelets only, as
    the reference code embeds only the tokens it keeps: (B, C, T, H, W) -> (B, D, T', H', W'). A
    dropped tubelet gets the embedding of the kept one that starts its run (the tokenizer drops it)."""
    ts, ph, pw = state.tubelet
    b, c, _, _, _ = video.shape
    nt, nh, nw = state.grid
    flat = keep.reshape(-1)
    idx = _nonzero(flat, state.hint_grid)
    if _eager() and idx.shape[0] == flat.shape[0]:  # every tubelet kept: the model's own convolution
        return F.conv3d(video, weight, bias, stride=(ts, ph, pw))
    d = weight.shape[0]
    tubelets = video.reshape(b, c, nt, ts, nh, ph, nw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    rows = tubelets.reshape(b * nt * nh * nw, c * ts * ph * pw).index_select(0, idx)
    emb = rows @ weight.reshape(d, -1).t()
    if bias is not None:
        emb = emb + bias
    pos = (torch.cumsum(flat.to(torch.long), dim=0) - 1).reshape(b, nt, nh, nw)
    cover = _forward_fill(keep, pos).reshape(-1)
    return emb.index_select(0, cover).reshape(b, nt, nh, nw, d).permute(0, 4, 1, 2, 3)


class _Kept(NamedTuple):
    keep: torch.Tensor  # (B, T', H', W') bool
    idx: torch.Tensor  # (L,) kept positions in the flattened (B * (P + N)) tokens, clip after clip
    counts: torch.Tensor  # (B,) tokens kept per clip, prefix included
    starts: torch.Tensor  # (B,) where each clip starts in the packed order
    cover: torch.Tensor  # (B * (P + N),) packed index of the kept token that starts each token's run
    lengths: torch.Tensor | None  # (L,) run length of each kept token (0 for prefix tokens), with length_embedding


def _kept(state: RLTState, keep: torch.Tensor, x: torch.Tensor) -> _Kept:
    """Which tokens of `x` (B, P + N, D) stay, in the packed order; keep (B, T', H', W') from rlt_keep."""
    b, s, _ = x.shape
    p, (nt, nh, nw) = state.prefix, state.grid
    perm = (0,) + tuple(1 + i for i in state.order)
    keep_tok = keep.permute(perm).reshape(b, nt * nh * nw)
    if p:
        keep_tok = torch.cat([torch.ones((b, p), dtype=torch.bool, device=x.device), keep_tok], dim=1)
    flat = keep_tok.reshape(-1)
    idx = _nonzero(flat, state.hint)
    lengths = None
    if state.length_embedding is not None:
        lengths = run_lengths(keep).permute(perm).reshape(b, nt * nh * nw)
        if p:
            lengths = torch.cat([torch.zeros((b, p), dtype=torch.long, device=x.device), lengths], dim=1)
        lengths = lengths.reshape(-1).index_select(0, idx)
        _record(state, "lengths", lengths)
    counts = keep_tok.sum(dim=1)
    starts = torch.cumsum(counts, dim=0) - counts
    # run-length decode: each original token reads the kept token that starts its run
    pos = (torch.cumsum(flat.to(torch.long), dim=0) - 1).reshape(b, s)  # packed index of every kept position
    grid_pos = pos[:, p:].reshape(b, *[(nt, nh, nw)[i] for i in state.order])
    inverse = [0] + [1 + state.order.index(i) for i in range(3)]
    grid_pos = grid_pos.permute(inverse)  # (B, T', H', W')
    cover = _forward_fill(keep, grid_pos).permute(perm).reshape(b, nt * nh * nw)
    if p:
        cover = torch.cat([pos[:, :p], cover], dim=1)
    _record(state, "kept_counts", keep.reshape(b, -1).sum(dim=1))
    return _Kept(keep, idx, counts, starts, cover.reshape(-1), lengths)


def _with_lengths(state: RLTState, tokens: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Add the learned run-length embedding (row l - 1 for a run of l tubelets; prefix tokens: none)."""
    if lengths is None:
        return tokens
    table = torch.cat([torch.zeros_like(state.length_embedding[:1]), state.length_embedding], dim=0)
    return tokens + table.to(tokens.dtype).index_select(0, lengths)


def _slots(state: RLTState, k: _Kept, s: int) -> torch.Tensor:
    """arange(M), M the longest clip's token count."""
    m = _nonzero(torch.arange(s, device=k.counts.device) < k.counts.max(), state.hint_slots)
    if not _eager():
        torch._check(m.shape[0] > 1)  # broadcasting a (.., 1, M) mask over M queries needs M != 1 shown
    return m


def _lowest(x: torch.Tensor) -> torch.Tensor:
    return torch.full((), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device)


def rlt_tokenize(state: RLTState, keep: torch.Tensor, x: torch.Tensor):
    """Drop repeated tubelet tokens of `x` (B, P + N, D) and pack the clips into one sequence.

    Returns (packed (1, L, D), clip of each packed token (L,), pooling matrix (B, L), segment
    starts (B,), run-length decode index (B * (P + N),), the index (B * M,) that lays the packed tokens
    out one clip per row for attention, the index (L,) back, and the key bias (B, M): 0, or the lowest
    value at pad slots).
    """
    b, s, d = x.shape
    k = _kept(state, keep, x)
    rows = x.reshape(b * s, d)
    packed = rows if _eager() and k.idx.shape[0] == b * s else rows.index_select(0, k.idx)  # all kept: a view
    packed = _with_lengths(state, packed, k.lengths)
    seg = torch.div(k.idx, s, rounding_mode="floor")  # the clip of every packed token
    onehot = (seg.unsqueeze(0) == torch.arange(b, device=x.device).unsqueeze(1)).to(x.dtype)  # (B, L)
    pool = onehot / onehot.sum(dim=1, keepdim=True)
    # block-diagonal attention without an L x L mask: each clip's tokens padded to the longest clip's
    # count M (the pad slots repeat the clip's last token and are masked as keys), (B, M) slots
    slots = _slots(state, k, s)
    m = slots.shape[0]
    valid = slots.unsqueeze(0) < k.counts.unsqueeze(1)  # (B, M)
    pad_idx = (k.starts.unsqueeze(1) + torch.minimum(slots.unsqueeze(0), (k.counts - 1).unsqueeze(1))).reshape(-1)
    key_bias = torch.where(valid, torch.zeros((), dtype=x.dtype, device=x.device), _lowest(x))  # (B, M)
    unpad_idx = seg * m + (torch.arange(k.idx.shape[0], device=x.device) - k.starts.index_select(0, seg))
    return packed.unsqueeze(0), seg, pool, k.starts, k.cover, pad_idx, unpad_idx, key_bias


def rlt_tokenize_padded(state: RLTState, keep: torch.Tensor, x: torch.Tensor):
    """Drop repeated tubelet tokens of `x` (B, P + N, D); one clip per row, padded to the longest clip.

    A clip shorter than M ends with copies of its last kept token; that token and its copies get
    size 1 / (number of copies + 1), every other token size 1, so that log(size) added to the
    attention logits (ToMe's proportional attention) and size-weighted means count them as one token.
    Returns (tokens (B, M, D), sizes (B, M, 1), run-length decode index (B * (P + N),) into the B * M rows).
    """
    b, s, d = x.shape
    k = _kept(state, keep, x)
    slots = _slots(state, k, s)
    m = slots.shape[0]
    last = (k.counts - 1).unsqueeze(1)
    sel = (k.starts.unsqueeze(1) + torch.minimum(slots.unsqueeze(0), last)).reshape(-1)  # (B * M,) packed order
    rows = x.reshape(b * s, d)
    if _eager() and k.idx.shape[0] == b * s:  # every token of every clip kept: a view
        tokens = x
    else:
        tokens = rows.index_select(0, k.idx.index_select(0, sel)).reshape(b, m, d)
    if k.lengths is not None:
        tokens = _with_lengths(state, tokens.reshape(b * m, d), k.lengths.index_select(0, sel)).reshape(b, m, d)
    copies = (m - k.counts).unsqueeze(1)  # pad slots per clip
    one = torch.ones((), dtype=x.dtype, device=x.device)
    size = torch.where(slots.unsqueeze(0) >= last, one / (copies + 1).to(x.dtype), one).unsqueeze(-1)
    clip = torch.div(torch.arange(b * s, device=x.device), s, rounding_mode="floor")
    cover = clip * m + k.cover - k.starts.index_select(0, clip)
    return tokens, size, cover


def _eager() -> bool:
    """Shape-dependent shortcuts are taken in eager mode only: export and compile see one general graph."""
    return not (torch.compiler.is_compiling() or torch.compiler.is_exporting())


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Packed (1, H, L, d) -> (L, H, d): the model's own rows (a transpose that cancels, not a copy)."""
    return t.transpose(1, 2).squeeze(0)


def _packed(rows: torch.Tensor) -> torch.Tensor:
    return rows.unsqueeze(0).transpose(1, 2)


def _pad(t: torch.Tensor, pad_idx: torch.Tensor, b: int, m: int) -> torch.Tensor:
    """Packed (1, H, L, d) -> one row per clip (B, H, M, d); pad slots repeat the clip's last token."""
    rows = _rows(t)
    h, d = rows.shape[1], rows.shape[2]
    if _eager() and b * m == rows.shape[0]:  # every clip has M tokens: a view
        return rows.reshape(b, m, h, d).transpose(1, 2)
    return rows.index_select(0, pad_idx).reshape(b, m, h, d).transpose(1, 2)


def _unpad(o: torch.Tensor, unpad_idx: torch.Tensor) -> torch.Tensor:
    """(B, H, M, d) -> packed (1, H, L, d)."""
    b, h, m, d = o.shape
    rows = o.transpose(1, 2).reshape(b * m, h, d)
    if not (_eager() and b * m == unpad_idx.shape[0]):
        rows = rows.index_select(0, unpad_idx)
    return _packed(rows)


def rlt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad_idx: torch.Tensor, key_bias: torch.Tensor,
                  unpad_idx: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Block-diagonal attention over packed q, k, v (1, H, L, d) -> (1, H, L, dv), without an L x L mask:
    one row per clip (B, H, M, d), M the longest clip, the pad slots hidden by an SDPA key mask.

    While exporting there is no mask (in onnxruntime a mask add, or a bias column on q and k, costs
    ~45 % of the attention): v's pad rows are zeroed and, when some clip is padded, v gains a column
    that is 1 at real keys, so the last output column is the softmax mass on real keys, which divides
    the rest. Exact: the copies' logits equal the last real key's, so that mass is >= 1 / (M - n + 1).
    The column's width (0 or 1) is a size computed at run time, so a batch with no padding (one clip,
    nothing static) pays for neither column nor mask; the attention is written out (SDPA's shape
    check cannot take a value width it cannot decide while tracing), as opset 18 exports SDPA anyway."""
    b, m = key_bias.shape
    qp, kp, vp = (_pad(t, pad_idx, b, m) for t in (q, k, v))
    if not torch.compiler.is_exporting():
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=key_bias.to(q.dtype).reshape(b, 1, 1, m), scale=scale)
        return _unpad(o, unpad_idx)
    extra = torch.sym_min(b * m - q.shape[2], 1)  # 1 where some clip is padded, else 0
    torch._check(extra >= 0)
    d = vp.shape[-1]
    real = (key_bias == 0).to(vp.dtype).reshape(b, 1, m, 1).expand(b, vp.shape[1], m, 1)
    weights = ((qp @ kp.transpose(-2, -1)) * (qp.shape[-1] ** -0.5 if scale is None else scale)).softmax(dim=-1)
    o = _unpad(weights @ torch.cat([vp * real, real[..., :extra]], dim=-1), unpad_idx)
    return o[..., :d] / (o[..., d:].sum(dim=-1, keepdim=True) + (1 - extra))


def rlt_block_mask(seg: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Additive block-diagonal mask (L, L) over packed tokens: 0 within a clip, the lowest value across."""
    same = seg.unsqueeze(1) == seg.unsqueeze(0)
    return torch.where(same, torch.zeros((), dtype=like.dtype, device=like.device),
                       torch.full((), torch.finfo(like.dtype).min, dtype=like.dtype, device=like.device))


def rlt_pool(x: torch.Tensor, pool: torch.Tensor, keepdim: bool) -> torch.Tensor:
    """Mean over each clip's tokens of packed `x` (1, L, ...) -> (B, ...) (keepdim: (B, 1, ...))."""
    rest = x.shape[2:]
    out = (pool @ x.reshape(x.shape[1], -1)).reshape(pool.shape[0], *rest)
    return out.unsqueeze(1) if keepdim else out


def rlt_select(x: torch.Tensor, starts: torch.Tensor, index: int) -> torch.Tensor:
    """Prefix token `index` of every clip of packed `x` (1, L, ...) -> (B, ...)."""
    return x[0].index_select(0, starts + index)


def rlt_unpack(x: torch.Tensor, cover: torch.Tensor, batch_like: torch.Tensor) -> torch.Tensor:
    """Run-length decode packed (1, L, ...) or padded (B, M, ...) `x` to (B, P + N, ...) (the first two
    dims of `batch_like`): every original token reads the row `cover` names."""
    out = x.reshape(-1, *x.shape[2:]).index_select(0, cover)
    return out.reshape(batch_like.shape[0], batch_like.shape[1], *x.shape[2:])


# axis provenance of the inserted functions
def _keep_rule(node: fx.Node, amap: ax.AxisMap):
    return (amap.axis_of(node.args[1], 0), ax.EMPTY, ax.EMPTY, ax.EMPTY)


def _patch_embed_rule(node: fx.Node, amap: ax.AxisMap):
    """Like a convolution: the output's last three axes are the tubelet grid (a patch embedding)."""
    shape = ax.shape_of(node)
    amap.patch_embeddings.append(node)
    grid = tuple(ax.Axis((ax.Label(k, node.name, shape[2 + i]),)) if shape[2 + i] > 1 else ax.EMPTY
                 for i, k in enumerate(("grid_t", "grid_h", "grid_w")))
    return (amap.axis_of(node.args[1], 0), ax.EMPTY) + grid


def _tokenize_rule(node: fx.Node, amap: ax.AxisMap):
    keep, x = node.args[1], node.args[2]
    batch = amap.axis_of(keep, 0)
    tok = amap.axis_of(x, 1)
    return [(ax.EMPTY, tok, amap.axis_of(x, 2)), (tok,), (batch, tok), (batch,), (ax.EMPTY,), (ax.EMPTY,),
            (tok,), (batch, tok)]


def _tokenize_padded_rule(node: fx.Node, amap: ax.AxisMap):
    x = node.args[2]
    tok = amap.axis_of(x, 1)
    batch = amap.axis_of(x, 0)
    return [(batch, tok, amap.axis_of(x, 2)), (batch, tok, ax.EMPTY), (ax.EMPTY,)]


def _attention_rule(node: fx.Node, amap: ax.AxisMap):
    q, v = amap[node.args[0]], amap[node.args[2]]
    return (ax.EMPTY, q[1], q[2], v[3]) if len(q) == len(v) == 4 else None


def _block_mask_rule(node: fx.Node, amap: ax.AxisMap):
    tok = amap.axis_of(node.args[0], 0)
    return (tok, tok)


def _pool_rule(node: fx.Node, amap: ax.AxisMap):
    x, pool, keepdim = node.args
    rest = amap[x][2:]
    return (amap.axis_of(pool, 0),) + ((ax.EMPTY,) if keepdim else ()) + tuple(rest)


def _select_rule(node: fx.Node, amap: ax.AxisMap):
    x, starts = node.args[:2]
    return (amap.axis_of(starts, 0),) + tuple(amap[x][2:])


def _unpack_rule(node: fx.Node, amap: ax.AxisMap):
    x, _, like = node.args
    return (amap.axis_of(like, 0), amap.axis_of(like, 1)) + tuple(amap[x][2:])


ax.register_rule(rlt_keep, _keep_rule)
ax.register_rule(rlt_patch_embed, _patch_embed_rule)
ax.register_rule(rlt_tokenize, _tokenize_rule)
ax.register_rule(rlt_tokenize_padded, _tokenize_padded_rule)
ax.register_rule(rlt_attention, _attention_rule)
ax.register_rule(rlt_block_mask, _block_mask_rule)
ax.register_rule(rlt_pool, _pool_rule)
ax.register_rule(rlt_select, _select_rule)
ax.register_rule(rlt_unpack, _unpack_rule)


# ---------------------------------------------------------------------------------------------
# the pass


def _ints(v, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(v)
    return v * n if len(v) == 1 else v


def tubelet_embeddings(analysis: Analysis) -> list[fx.Node]:
    """The patch embeddings that cut a video into tubelets: convolutions over 3 axes (T, H, W)."""
    return [c for c in analysis.patch_embeddings if c.target in CONVS + (rlt_patch_embed,)
            and c.meta.get("val") is not None and c.meta["val"].dim() == 5]


def _grid_labels(axis: ax.Axis) -> list[ax.Label]:
    return [lab for lab in axis.labels if lab.is_grid]


class RLT(Pass):
    """Run-Length Tokenization: drop video tokens that repeat the previous tubelet, pack the clips.

    tau: drop a token when its mean absolute difference (normalised pixels) is <= tau; < 0 keeps all.
    length_embedding: add a learned, zero-initialised run-length embedding to the kept tokens.
    compare: "previous" (the paper: with tubelet t-1) or "run_start" (with the first tubelet of the
        current run, so slow drift is not dropped).
    layout: "packed" (the clips of a batch in one sequence, block-diagonal attention: token-wise
        layers run on exactly the kept tokens), "padded" (one clip per row, padded to the longest
        clip with copies of its last token that count as one token through ToMe's token sizes: a
        later ToMe pass merges within each clip), or "auto": padded when a later pass changes the
        token count, else packed.
    """

    name = "rlt"
    changes_tokens = True

    def __init__(self, tau: float = 0.1, length_embedding: bool = False, compare: str = "previous",
                 layout: str = "auto"):
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau != tau:
            raise PassSpecError(f"rlt tau must be a number (a mean absolute pixel difference, e.g. 0.1; < 0 keeps "
                                f"every token), got {tau!r}")
        if not isinstance(length_embedding, bool):
            raise PassSpecError(f"rlt length_embedding must be True or False, got {length_embedding!r}")
        if compare not in COMPARES:
            raise PassSpecError(f"rlt compare must be one of {', '.join(map(repr, COMPARES))}, got {compare!r}")
        if layout not in LAYOUTS:
            raise PassSpecError(f"rlt layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
        self.tau = float(tau)
        self.length_embedding = length_embedding
        self.compare = compare
        self.layout = layout

    def options(self) -> dict:
        opts = {"tau": self.tau}
        if self.length_embedding:
            opts["length_embedding"] = True
        if self.compare != "previous":
            opts["compare"] = self.compare
        if self.layout != "auto":
            opts["layout"] = self.layout
        return opts

    # -- applicability ------------------------------------------------------------------------

    def check(self, analysis: Analysis, block: Block) -> str | None:
        convs = tubelet_embeddings(analysis)
        if not convs:
            return "no Conv3d tubelet embedding: RLT needs video tokens from a (T, H, W) patch embedding"
        grid = {lab for c in convs for lab in analysis.axes.axis_of(c, 2).labels if lab.kind == "grid_t"}
        if block.token_dim is None:
            return "no token axis found in the residual stream"
        for site in block.sites:
            labels = set(site.seq_axis.labels)
            if not grid & labels:
                return f"attention {site.module} ({site.kind}) does not run over time and space jointly"
            if site.kind == "cross":
                return f"attention {site.module} is cross attention"
        return None

    # -- rewrite ------------------------------------------------------------------------------

    def run(self, ctx: PassContext) -> PassResult:
        result = PassResult()
        gm, analysis = ctx.gm, ctx.analysis
        conv = self._tubelet(analysis, type(ctx.model).__name__)
        if conv.target is rlt_patch_embed:
            raise UnsupportedModelError("RLT already tokenizes this model: give the rlt pass once")
        video = conv.args[0]
        tubelet = self._geometry(conv)
        blocks = [b for b in analysis.blocks if self.check(analysis, b) is None]
        if not blocks:
            reasons = {b.name: self.check(analysis, b) for b in analysis.blocks}
            first = next(iter(reasons.items()), ("model", "no attention blocks"))
            raise UnsupportedModelError(f"RLT applies to no block of {type(ctx.model).__name__}: "
                                        f"{first[0]}: {first[1]}")
        if self.tau < 0:
            result.note(None, "rlt: tau < 0 keeps every token; graph left unchanged")
            result.stats["rlt"] = "tau < 0: every token kept"
            return result
        amap = analysis.axes
        stream = self._stream_in(analysis, blocks[0])
        tok_axis = amap.axis_of(stream, 1)
        grid_labels = _grid_labels(tok_axis)
        conv_grid = [amap.axis_of(conv, 2 + i) for i in range(3)]
        order = self._order(grid_labels, conv_grid, type(ctx.model).__name__)
        batch_labels = [lab for lab in amap.axis_of(stream, 0).labels if lab.kind == "batch"]
        if not batch_labels:
            raise UnsupportedModelError("RLT needs a batch axis first in the token stream "
                                        f"({stream.name} has axes {amap[stream]})")
        prefix = tok_axis.prefix
        shape = ax.shape_of(stream)
        grid = tuple(ax.shape_of(conv)[2:])
        dim = shape[2]

        layout = self._layout(ctx)
        region = self._region(stream, amap, set(grid_labels))
        self._check_region(region, amap, set(grid_labels))
        # sizes: read the token count (and, packed, the batch: 1 once packed) from tensors from here on
        labels = set(grid_labels)
        if layout == "packed":
            self._batch_symbols_to_literals(region, amap, set(batch_labels))
            labels |= set(batch_labels)
        make_token_sizes_dynamic(gm, amap, labels, after=stream)

        hint, hint_slots = self._example_count(ctx, video, tubelet, prefix)
        hint_grid = hint - prefix * shape[0]
        state = RLTState(tubelet, grid, order, prefix, dim, self.tau, self.compare, self.length_embedding, hint,
                         hint_slots, hint_grid)
        name = "rlt"
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, state)

        graph = gm.graph
        with graph.inserting_before(conv):
            state_node = graph.get_attr(name)
            keep = graph.call_function(rlt_keep, (state_node, video))
            embed = graph.call_function(rlt_patch_embed, (state_node, video, conv.args[1],
                                                          conv.args[2] if len(conv.args) > 2 else None, keep))
        copy_scope(conv, keep)
        copy_scope(conv, embed)
        conv.replace_all_uses_with(embed)
        graph.erase_node(conv)
        fn = rlt_tokenize if layout == "packed" else rlt_tokenize_padded
        with graph.inserting_after(stream):
            tok = graph.call_function(fn, (state_node, keep, stream))
        copy_scope(stream, tok)
        outs = []
        prev = tok
        for i in range(8 if layout == "packed" else 3):
            with graph.inserting_after(prev):
                item = graph.call_function(operator.getitem, (tok, i))
            copy_scope(stream, item)
            outs.append(item)
            prev = item
        stream.replace_all_uses_with(outs[0], delete_user_cb=lambda u: u is not tok)
        sites = [n for n in graph.nodes if n.target is SDPA and n in region]
        for node in sites:
            self._check_site(node, region)
        if layout == "packed":
            self._packed_attention(gm, sites, outs, amap, stream)
            exits = self._rewrite_exits(gm, region, amap, set(grid_labels), stream, state, outs, layout)
        else:
            self._padded_attention(gm, sites, outs, stream)
            exits = self._rewrite_exits(gm, region, amap, set(grid_labels), stream, state, outs, layout)
        graph.lint()
        gm.recompile()

        result.changed = True
        result.stats["rlt"] = state
        where = module_path(conv)
        how = ("clips packed into one sequence, block-diagonal attention" if layout == "packed" else
               "clips padded to the longest with copies of their last token, weighted as one token (ToMe sizes)")
        result.note(None, f"rlt: tubelets {tubelet[0]}x{tubelet[1]}x{tubelet[2]} from "
                          f"{where[-1] if where else conv.name}, grid {grid[0]}x{grid[1]}x{grid[2]}, tau={self.tau:g}, "
                          f"compare={self.compare}{', length embedding' if self.length_embedding else ''}; "
                          f"{how} at {len(sites)} attention sites; exits: {', '.join(exits)}; "
                          f"{hint - prefix * shape[0]} of {shape[0] * (shape[1] - prefix)} tokens kept on the example; "
                          f"tokens kept per clip after each forward: report.stats['rlt']")
        for b in blocks:
            result.note(b.name, f"rlt: {layout} clips")
        return result

    def _layout(self, ctx: PassContext) -> str:
        later = [p.name for p in getattr(ctx, "later", []) if p.changes_tokens]
        if self.layout == "packed" and later:
            raise PassSpecError(f"rlt layout='packed' leaves no per-clip attention for {', '.join(later)} to "
                                f"rewrite: use layout='padded' (or 'auto', which picks it)")
        if self.layout != "auto":
            return self.layout
        return "padded" if later else "packed"

    @staticmethod
    def _check_site(node: fx.Node, region: set[fx.Node]) -> None:
        q, k, v = node.args[:3]
        causal = sdpa_is_causal(node)
        if sdpa_mask(node) is not None or causal:
            raise UnsupportedModelError(f"RLT cannot pack clips through attention {node.name}: it already has "
                                        f"{'a causal flag' if causal else 'a mask'}")
        if not all(n in region for n in (q, k, v) if isinstance(n, fx.Node)):
            raise UnsupportedModelError(f"RLT cannot pack clips through attention {node.name}: its keys or "
                                        f"values do not come from the video tokens")

    def _packed_attention(self, gm, sites, outs, amap, stream) -> None:
        """Block-diagonal attention over the packed tokens at every site."""
        graph = gm.graph
        packed, seg, _, _, _, pad_idx, unpad_idx, key_bias = outs
        block_mask = None
        for node in sites:
            q, k, v = node.args[:3]
            heads_first = all(len(ax.shape_of(n)) == 4 and amap.axis_of(n, 0).labels and amap.axis_of(n, 2).labels
                              and not amap.axis_of(n, 1).labels for n in (q, k, v))
            if heads_first:  # (B, H, N, d): block-diagonal attention one clip per row, no L x L mask
                kwargs = {k: v for k, v in node.kwargs.items() if k != "attn_mask"}
                with graph.inserting_before(node):
                    att = graph.call_function(rlt_attention, (q, k, v, pad_idx, key_bias, unpad_idx), kwargs)
                copy_scope(node, att)
                node.replace_all_uses_with(att)
                graph.erase_node(node)
            else:
                # another layout: an additive (L, L) block-diagonal mask, broadcast over the leading dims
                if block_mask is None:
                    with graph.inserting_after(key_bias):
                        block_mask = graph.call_function(rlt_block_mask, (seg, packed))
                    copy_scope(stream, block_mask)
                set_sdpa_mask(node, block_mask)

    def _padded_attention(self, gm, sites, outs, stream) -> None:
        """One clip per row; a clip's last token and its copies count as one token: log(size) added to
        the attention logits (ToMe's proportional attention, which a later ToMe pass continues)."""
        from dittofx.passes.tome import proportional_bias

        graph = gm.graph
        size = outs[1]
        with graph.inserting_after(outs[-1]):
            bias = graph.call_function(proportional_bias, (size,))
        copy_scope(stream, bias)
        for node in sites:
            set_sdpa_mask(node, bias)

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _tubelet(analysis: Analysis, model: str) -> fx.Node:
        convs = tubelet_embeddings(analysis)
        if not convs:
            raise UnsupportedModelError(
                f"{model} has no tubelet embedding: RLT needs video tokens made by a Conv3d patch embedding "
                f"(kernel = stride = (frames, height, width) of a tubelet), as in VideoMAE or ViViT")
        return convs[0]

    @staticmethod
    def _geometry(conv: fx.Node) -> tuple[int, int, int]:
        weight = conv.args[1]
        kernel = tuple(ax.shape_of(weight)[2:])
        args = list(conv.args) + [None] * 9
        if conv.target is aten.conv3d.default:
            stride, padding, dilation, groups = args[3], args[4], args[5], args[6]
        else:
            stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
            if args[6]:
                raise UnsupportedModelError("RLT needs a forward Conv3d tubelet embedding, not a transposed one")
        stride = _ints(stride if stride is not None else 1, 3)
        padding = _ints(padding if padding is not None else 0, 3)
        dilation = _ints(dilation if dilation is not None else 1, 3)
        if stride != kernel or any(padding) or dilation != (1, 1, 1) or (groups or 1) != 1:
            raise UnsupportedModelError(
                f"RLT needs non-overlapping tubelets: the Conv3d patch embedding has kernel {kernel}, stride "
                f"{stride}, padding {padding}, dilation {dilation}; accepted: stride = kernel, no padding")
        video = ax.shape_of(conv.args[0])
        dims = video[2:]
        if any(d % k for d, k in zip(dims, kernel)):
            raise UnsupportedModelError(
                f"video of {dims[0]} frames of {dims[1]}x{dims[2]} is not divisible into tubelets of "
                f"{kernel[0]}x{kernel[1]}x{kernel[2]} (frames x height x width): use a frame count and size "
                f"that are multiples of the tubelet")
        return kernel

    @staticmethod
    def _stream_in(analysis: Analysis, block: Block) -> fx.Node:
        """The residual stream entering `block`: the operand of its first residual add that does not
        come from the attention."""
        site = block.sites[0]
        if site.residual is None:
            raise UnsupportedModelError(f"RLT found no residual connection around {site.module}")
        inside = descendants(site.node) | {site.node}
        others = [a for a in site.residual.args[:2] if isinstance(a, fx.Node) and a not in inside]
        if len(others) != 1:
            raise UnsupportedModelError(f"RLT cannot tell the token stream entering {block.name}")
        stream = others[0]
        shape = ax.shape_of(stream)
        tok = analysis.axes.axis_of(stream, 1)
        if shape is None or len(shape) != 3 or len({lab.kind for lab in _grid_labels(tok)}) != 3:
            raise UnsupportedModelError(
                f"RLT needs the tokens entering {block.name} as (batch, tokens, channels) with tokens over "
                f"(frames, rows, columns); found {stream.name} of shape {shape}")
        return stream

    @staticmethod
    def _order(grid_labels, conv_grid, model: str) -> tuple[int, int, int]:
        """Token order as a permutation of the conv's (t, h, w) axes, major first."""
        conv_labels = [a.labels[0] if a.labels else None for a in conv_grid]
        try:
            order = tuple(conv_labels.index(lab) for lab in grid_labels)
        except ValueError:
            order = ()
        if sorted(order) != [0, 1, 2]:
            raise UnsupportedModelError(f"{model}: the tokens are not the tubelet grid of the patch embedding "
                                        f"(token axis {grid_labels}, grid {conv_labels})")
        return order

    @staticmethod
    def _region(stream: fx.Node, amap: ax.AxisMap, grid: set) -> set[fx.Node]:
        """Nodes downstream of `stream` that still carry its token axis."""
        region, todo = {stream}, [stream]
        while todo:
            n = todo.pop()
            for user in n.users:
                if user in region or user.op != "call_function":
                    continue
                axes = amap.tensors.get(user)
                carried = axes if isinstance(axes, tuple) else [a for t in (axes or []) for a in t]
                if any(grid & set(a.labels) for a in carried):
                    region.add(user)
                    todo.append(user)
        return region

    @staticmethod
    def _check_region(region: set[fx.Node], amap: ax.AxisMap, grid: set) -> None:
        for n in region:
            if n.target in TOKEN_MIXING:
                raise UnsupportedModelError(f"RLT cannot pack clips: {n.name} ({n.target}) mixes tokens other "
                                            f"than through attention")
            if n.target is aten.slice.Tensor:
                d = n.args[1] if len(n.args) > 1 else 0
                if grid & set(amap.axis_of(n.args[0], d).labels):
                    raise UnsupportedModelError(f"RLT cannot pack clips: {n.name} slices the token axis")

    @staticmethod
    def _batch_symbols_to_literals(region: set[fx.Node], amap: ax.AxisMap, batch: set) -> None:
        """In reshapes over packed tokens, a batch size read from the input becomes its example value,
        which the token-size facility then turns into a size read from the reshaped tensor (1 once packed)."""
        for n in region:
            if n.target not in ax.RESHAPES and n.target is not aten.expand.default:
                continue
            target = list(n.args[1])
            out_axes = amap[n]
            changed = False
            for d, s in enumerate(target):
                if isinstance(s, fx.Node) and s in amap.symbols and set(amap.symbols[s].labels) <= batch \
                        and d < len(out_axes) and batch & set(out_axes[d].labels):
                    target[d] = ax.int_value(s)
                    changed = True
            if changed:
                n.args = (n.args[0], target) + tuple(n.args[2:])

    def _example_count(self, ctx: PassContext, video: fx.Node, tubelet, prefix: int) -> int:
        """Tokens kept (with prefix tokens) on the capture's example: the sequence length the graph's
        metadata shows."""
        values = {}

        class Stop(Exception):
            pass

        class Recorder(fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n is video:
                    values["video"] = out
                    raise Stop
                return out

        try:
            with torch.no_grad():
                Recorder(ctx.gm).run(*ctx.capture.flat_inputs())
        except Stop:
            pass
        v = values["video"]
        counts = keep_mask(v, tubelet, self.tau, self.compare).reshape(v.shape[0], -1).sum(1) + prefix
        return int(counts.sum()), int(counts.max())

    @staticmethod
    def _rewrite_exits(gm, region, amap, grid, stream, state, outs, layout) -> list[str]:
        """Replace each place where the tokens leave the token axis by its per-clip form."""
        prefix = state.prefix
        graph = gm.graph
        done = []
        if layout == "packed":
            _, _, pool, starts, cover = outs[:5]
        else:
            _, size, cover = outs
        inserted = set(outs) | {stream}
        ours = (rlt_keep, rlt_patch_embed, rlt_tokenize, rlt_tokenize_padded, rlt_attention, rlt_block_mask)
        for n in [n for n in graph.nodes if n in region and n is not stream]:
            for user in list(n.users):
                if user in region or user in inserted or user.target in ours or user.target is aten.sym_size.int or \
                        "assert" in getattr(user.target, "__name__", ""):
                    continue
                if user.op == "output":
                    with graph.inserting_before(user):
                        new = graph.call_function(rlt_unpack, (n, cover, stream))
                    copy_scope(n, new)
                    user.replace_input_with(n, new)
                    done.append("token output run-length decoded")
                    continue
                axes = amap[n]
                tok_dims = [d for d, a in enumerate(axes) if grid & set(a.labels)]
                if user.target is aten.mean.dim and tok_dims == [1]:
                    dims = user.args[1]
                    dims = [dims] if isinstance(dims, int) else list(dims)
                    keepdim = bool(user.args[2] if len(user.args) > 2 else user.kwargs.get("keepdim", False))
                    if [d % len(axes) for d in dims] == [1]:
                        if layout == "packed":
                            fn, args = rlt_pool, (n, pool, keepdim)
                        else:
                            from dittofx.passes.tome import size_weighted_mean

                            fn, args = size_weighted_mean, (n, size, 0, keepdim)
                        with graph.inserting_before(user):
                            new = graph.call_function(fn, args)
                        copy_scope(user, new)
                        user.replace_all_uses_with(new)
                        graph.erase_node(user)
                        done.append("mean over tokens pooled per clip")
                        continue
                if user.target is aten.select.int and tok_dims == [1] and user.args[1] % len(axes) == 1:
                    index = user.args[2]
                    # prefix tokens and (tokens in (t, ...) order) the first tubelet are always kept, in place
                    first = state.grid[1] * state.grid[2] if state.order[0] == 0 else 0
                    if 0 <= index < prefix + first:
                        if layout == "packed":
                            with graph.inserting_before(user):
                                new = graph.call_function(rlt_select, (n, starts, index))
                            copy_scope(user, new)
                            user.replace_all_uses_with(new)
                            graph.erase_node(user)
                        done.append(f"token {index} taken per clip")
                        continue
                raise UnsupportedModelError(
                    f"RLT cannot unpack the tokens at {user.name} ({user.target}): dittofx handles a mean over the "
                    f"tokens, taking a class token or a token of the first tubelet, and returning the token sequence")
        return sorted(set(done)) or ["none"]
