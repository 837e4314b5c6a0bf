"""RLT's algorithm on tensors: the tokenizer, the two layouts, block-diagonal attention, the per-clip
exits; each function is one node of the rewritten graph, with its axis rule.

The tokenizers return tuples whose fields `Packed` and `Padded` name: the pass reads them by name.

Non-finite input stays in its clip, as in the original model: a clip with a NaN or inf keeps every
token (its output is the original's for it), and no op mixes clips through arithmetic (0 x inf is
NaN): packed clips meet only in gathers, and attention and pooling run one clip per row.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import DynamicOutputShapeException

from dittofx._torch_compat import detect_fake_mode, is_fake
from dittofx.rewriter import axes as ax

COMPARES = ("previous", "run_start")


class Packed(NamedTuple):
    """What `rlt_tokenize` returns (as a tuple), field by field."""

    tokens: object  # (1, L, D): the kept tokens of every clip, clip after clip
    clip: object  # (L,) the clip of every packed token
    pool: object  # (B, M) bool: which of a clip's M slots are its own tokens (the others are pad slots)
    starts: object  # (B,) where each clip starts
    cover: object  # (B * (P + N),) run-length decode index into the packed tokens
    pad_idx: object  # (B * M,) lays the packed tokens out one clip per row for attention
    unpad_idx: object  # (L,) and back
    key_bias: object  # (B, M) 0, or the lowest value at pad slots


class Padded(NamedTuple):
    """What `rlt_tokenize_padded` returns (as a tuple), field by field."""

    tokens: object  # (B, M, D): one clip per row, padded with copies of its last token
    size: object  # (B, M, 1) token sizes: a clip's last token and its copies count as one
    cover: object  # (B * (P + N),) run-length decode index into the B * M rows


def patch_diff(a: torch.Tensor, b: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """Mean |a - b| over channels and each ph x pw patch: (B, C, [T,] H, W) -> (B, [T,] H/ph, W/pw)."""
    d = (a - b).abs()
    h, w = d.shape[-2], d.shape[-1]
    d = d.reshape(*d.shape[:-2], h // ph, ph, w // pw, pw)
    return d.mean(dim=(1, -3, -1))


def finite_clips(video: torch.Tensor) -> torch.Tensor:
    """(B,) whether every value of each clip is finite, from one sum per clip: a NaN or inf makes the
    sum non-finite. A finite clip whose sum overflows counts as non-finite, which costs only speed."""
    acc = torch.float32 if video.dtype in (torch.float16, torch.bfloat16) else None
    return video.sum(dim=tuple(range(1, video.dim())), dtype=acc).isfinite()


def keep_mask(video: torch.Tensor, tubelet: tuple[int, int, int], tau: float,
              compare: str = "previous") -> torch.Tensor:
    """Which tubelet tokens to keep: video (B, C, T, H, W) -> bool (B, T/ts, H/ph, W/pw). A clip with a
    NaN or inf keeps every token: its output is then the original model's (NaN is never <= tau, but a
    non-finite pixel can sit in a frame no comparison reads)."""
    ts, ph, pw = tubelet
    b, _, t, h, w = video.shape
    nt = t // ts
    keep0 = torch.ones((b, 1, h // ph, w // pw), dtype=torch.bool, device=video.device)
    if nt == 1:
        return keep0
    every = ~finite_clips(video).reshape(b, 1, 1, 1)
    if compare == "previous":
        # last frame of tubelets 1.. against the first frame of tubelets 0..nt-2 (the reference code's
        # x[:, :, 2ts-1::ts] - x[:, :, :-ts:ts])
        diff = patch_diff(video[:, :, 2 * ts - 1:nt * ts:ts], video[:, :, 0:(nt - 1) * ts:ts], ph, pw)
        return torch.cat([keep0, (diff > tau) | every], dim=1)
    first = video[:, :, 0:nt * ts:ts]  # first frame of every tubelet
    last = video[:, :, ts - 1:nt * ts:ts]  # last frame of every tubelet
    # run_start: compare with the first frame of the tubelet that started the current run
    ref = first[:, :, 0]
    keeps = [keep0[:, 0]]
    for i in range(1, nt):
        k = (patch_diff(last[:, :, i], ref, ph, pw) > tau) | every[:, 0]  # (B, h', w')
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
    """Indices of the kept tokens. Under a fake-tensor mode without a shape environment the count is
    unknown: the example's count `hint` stands in. That is how the rewriter refreshes metadata after
    RLT: torch's symbolic propagation refuses a fresh data-dependent size inside a call like this one
    (rewriter/edit.py, refresh_meta)."""
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
    if not torch.compiler.is_compiling() and (is_fake(value) or detect_fake_mode(value) is not None):
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


def rlt_keep(state: RLTState, video: torch.Tensor) -> torch.Tensor:
    """The tokenizer's decision, (B, T', H', W') bool, from the normalised video (B, C, T, H, W)."""
    return keep_mask(video, state.tubelet, state.tau, state.compare)


def _forward_fill(keep: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """For every (b, t, h, w): pos of the kept token that starts its run (the last kept t' <= t)."""
    cover, covers = pos[:, 0], [pos[:, 0]]
    for t in range(1, keep.shape[1]):
        cover = torch.where(keep[:, t], pos[:, t], cover)
        covers.append(cover)
    return torch.stack(covers, dim=1)


def rlt_patch_embed(state: RLTState, video: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
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

    Returns (packed (1, L, D), clip of each packed token (L,), which of the B x M slots are real tokens
    (B, M), segment starts (B,), run-length decode index (B * (P + N),), the index (B * M,) that lays
    the packed tokens out one clip per row for attention and pooling, the index (L,) back, and the key
    bias (B, M): 0, or the lowest value at pad slots).
    """
    b, s, d = x.shape
    k = _kept(state, keep, x)
    rows = x.reshape(b * s, d)
    packed = rows if _eager() and k.idx.shape[0] == b * s else rows.index_select(0, k.idx)  # all kept: a view
    packed = _with_lengths(state, packed, k.lengths)
    seg = torch.div(k.idx, s, rounding_mode="floor")  # the clip of every packed token
    # block-diagonal attention without an L x L mask: each clip's tokens padded to the longest clip's
    # count M (the pad slots repeat the clip's last token and are masked as keys), (B, M) slots
    slots = _slots(state, k, s)
    m = slots.shape[0]
    valid = slots.unsqueeze(0) < k.counts.unsqueeze(1)  # (B, M)
    pad_idx = (k.starts.unsqueeze(1) + torch.minimum(slots.unsqueeze(0), (k.counts - 1).unsqueeze(1))).reshape(-1)
    key_bias = torch.where(valid, torch.zeros((), dtype=x.dtype, device=x.device), _lowest(x))  # (B, M)
    unpad_idx = seg * m + (torch.arange(k.idx.shape[0], device=x.device) - k.starts.index_select(0, seg))
    return packed.unsqueeze(0), seg, valid, k.starts, k.cover, pad_idx, unpad_idx, key_bias


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
    """Packed (..., L, d) -> (L, G, d), G the leading dims (heads; the batch is 1): the model's own rows
    (for (1, H, L, d) a transpose that cancels, not a copy)."""
    return t.reshape(math.prod(t.shape[:-2]), t.shape[-2], t.shape[-1]).transpose(0, 1)


def _pad(t: torch.Tensor, pad_idx: torch.Tensor, b: int, m: int) -> torch.Tensor:
    """Packed (..., L, d) -> one row per clip (B, G, M, d); pad slots repeat the clip's last token."""
    rows = _rows(t)
    g, d = rows.shape[1], rows.shape[2]
    if not (_eager() and b * m == rows.shape[0]):  # else every clip has M tokens: a view
        rows = rows.index_select(0, pad_idx)
    return rows.reshape(b, m, g, d).transpose(1, 2)


def _unpad(o: torch.Tensor, unpad_idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, G, M, d) -> packed (..., L, d), the leading dims of `like`."""
    b, g, m, d = o.shape
    rows = o.transpose(1, 2).reshape(b * m, g, d)
    if not (_eager() and b * m == unpad_idx.shape[0]):
        rows = rows.index_select(0, unpad_idx)
    return rows.transpose(0, 1).reshape(*like.shape[:-2], rows.shape[0], d)


def rlt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad_idx: torch.Tensor, key_bias: torch.Tensor,
                  unpad_idx: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Block-diagonal attention over packed q, k, v (..., L, d) -> (..., L, dv), e.g. (1, H, L, d), without
    an L x L mask: one row per clip (B, G, M, d), M the longest clip, G the leading dims, the pad slots
    hidden by an SDPA key mask. No clip meets another in arithmetic, so a NaN stays in its clip.

    While exporting there is no mask (in onnxruntime a mask add, or a bias column on q and k, costs
    ~45 % of the attention): v's pad rows are zeroed (a select, so an inf stays an inf) and, when some
    clip is padded, v gains a column
    that is 1 at real keys, so the last output column is the softmax mass on real keys, which divides
    the rest. Exact: the copies' logits equal the last real key's, so that mass is >= 1 / (M - n + 1).
    The column's width (0 or 1) is a size computed at run time, so a batch with no padding (one clip,
    nothing static) pays for neither column nor mask; the attention is written out (SDPA's shape
    check cannot take a value width it cannot decide while tracing), as opset 18 exports SDPA anyway."""
    b, m = key_bias.shape
    qp, kp, vp = (_pad(t, pad_idx, b, m) for t in (q, k, v))
    if not torch.compiler.is_exporting():
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=key_bias.to(q.dtype).reshape(b, 1, 1, m), scale=scale)
        return _unpad(o, unpad_idx, q)
    extra = torch.sym_min(b * m - q.shape[2], 1)  # 1 where some clip is padded, else 0
    torch._check(extra >= 0)
    d = vp.shape[-1]
    is_real = (key_bias == 0).reshape(b, 1, m, 1)
    real = is_real.to(vp.dtype).expand(b, vp.shape[1], m, 1)
    weights = ((qp @ kp.transpose(-2, -1)) * (qp.shape[-1] ** -0.5 if scale is None else scale)).softmax(dim=-1)
    vp = torch.where(is_real, vp, torch.zeros((), dtype=vp.dtype, device=vp.device))
    o = _unpad(weights @ torch.cat([vp, real[..., :extra]], dim=-1), unpad_idx, q)
    return o[..., :d] / (o[..., d:].sum(dim=-1, keepdim=True) + (1 - extra))


def rlt_pool(x: torch.Tensor, pool: torch.Tensor, pad_idx: torch.Tensor, keepdim: bool) -> torch.Tensor:
    """Mean over each clip's tokens of packed `x` (1, L, ...) -> (B, ...) (keepdim: (B, 1, ...)): one
    clip per row (B, M, ...), pad slots (`pool` False) selected away, not multiplied by 0 (0 x inf is NaN)."""
    b, m = pool.shape
    rest = x.shape[2:]
    rows = x.reshape(x.shape[1], -1)
    if _eager() and b * m == rows.shape[0]:  # no pad slots: the model's own mean, per clip
        out = rows.reshape(b, m, -1).mean(dim=1)
    else:
        rows = torch.where(pool.reshape(b, m, 1), rows.index_select(0, pad_idx).reshape(b, m, -1),
                           torch.zeros((), dtype=x.dtype, device=x.device))
        out = rows.sum(dim=1) / pool.sum(dim=1, keepdim=True).to(x.dtype)
    out = out.reshape(b, *rest)
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
    return (ax.EMPTY,) + tuple(q[1:-1]) + (v[-1],) if len(q) == len(v) >= 3 else None


def _pool_rule(node: fx.Node, amap: ax.AxisMap):
    x, pool, _, keepdim = node.args
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
ax.register_rule(rlt_pool, _pool_rule)
ax.register_rule(rlt_select, _select_rule)
ax.register_rule(rlt_unpack, _unpack_rule)
