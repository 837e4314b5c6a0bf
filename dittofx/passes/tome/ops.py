"""ToMe's algorithm on tensors: each function is one node of the rewritten graph.

A matching is three index tensors: `keep` (B, N - r), the positions of the tokens that stay, in
output order; `src` (B, r), the positions of the tokens merged away; `dst` (B, r), where in the
output each of those goes. The merge is a gather and a scatter-add followed by a divide:
`scatter_reduce(mean)` exports to ONNX wrongly. Token sizes and proportional attention are the
rewriter's (`rewriter/tokens.py`), shared with every pass that gives tokens sizes.
"""

from __future__ import annotations

import torch
from torch import fx

from dittofx.rewriter import axes as ax
from dittofx.runtime import Recorder

Tensor = torch.Tensor

def head_mean(key: Tensor) -> Tensor:
    """The ToMe metric: keys (B, heads, N, d) averaged over heads -> (B, N, d)."""
    return key.mean(1) if key.dim() == 4 else key


def _best_edges(a: Tensor, b: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """Cosine scores of A against B; each A token's best B match; A sorted by that score.
    Returns (the r best A tokens, the other A tokens, the B match of each of the r)."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
    order = node_max.argsort(dim=-1, descending=True)
    src, unm = order[:, :r], order[:, r:]
    return src, unm, node_idx.gather(1, src)


def num_destinations(n: int, protected: int) -> int:
    """How many tokens are in B (odd positions past the protected prefix)."""
    return max(0, (n - protected + protected % 2) // 2)


def bipartite_soft_matching(metric: Tensor, r: int, protected: int) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe's matching on (B, N, C): A = even positions, B = odd, the first `protected` excluded."""
    batch, n = metric.shape[:2]
    a0 = protected + protected % 2  # first unprotected even position
    b0 = protected + 1 - protected % 2  # first unprotected odd position
    src, unm, dst = _best_edges(metric[:, a0::2], metric[:, b0::2], r)
    if protected:
        unm = unm.sort(dim=-1).values  # the reference keeps A in order when a class token exists
    num_b = num_destinations(n, protected)
    keep = torch.cat([torch.arange(protected, device=metric.device).expand(batch, protected),
                      a0 + 2 * unm,
                      (b0 + 2 * torch.arange(num_b, device=metric.device)).expand(batch, num_b)], dim=1)
    return keep, a0 + 2 * src, protected + unm.shape[1] + dst


def grid_matching(metric: Tensor, a_pos: Tensor, b_pos: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """tomesd's matching: B = the given destination positions (one per grid cell), A = the rest."""
    batch = metric.shape[0]
    src, unm, dst = _best_edges(metric.index_select(1, a_pos), metric.index_select(1, b_pos), r)
    keep = torch.cat([a_pos[unm], b_pos.expand(batch, -1)], dim=1)
    return keep, a_pos[src], unm.shape[1] + dst


def _rows(x: Tensor, idx: Tensor) -> Tensor:
    """x[b, idx[b, j]] for (B, N, C) x and (B, M) idx: whole rows, copied (on CPU much faster than a
    gather with an expanded index). M given, not -1: a batch of 0 has no elements to infer it from."""
    b, n, c = x.shape
    flat = (idx + torch.arange(b, device=idx.device)[:, None] * n).flatten()
    return x.reshape(b * n, c).index_select(0, flat).view(b, idx.shape[1], c)


def _add_rows(out: Tensor, idx: Tensor, rows: Tensor) -> Tensor:
    """out[b, idx[b, j]] += rows[b, j], repeated indices accumulating: a scatter-add (in place, except
    while exporting)."""
    b, n, c = out.shape
    if torch.compiler.is_exporting():  # one ScatterElements(add): what ONNX and TensorRT read
        return out.scatter_add(1, idx[..., None].expand(-1, -1, c), rows)
    flat = (idx + torch.arange(b, device=idx.device)[:, None] * n).flatten()
    out.view(b * n, c).index_add_(0, flat, rows.reshape(-1, c))  # whole rows: much faster on CPU
    return out


def _merge_sum(x: Tensor, keep: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """Kept tokens in output order, each source added into its destination."""
    return _add_rows(_rows(x, keep), dst, _rows(x, src))


def merge_sizes(x: Tensor, size: Tensor | None, keep: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """Token sizes (B, N, 1) after the merge; None means every token has size 1."""
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    return _merge_sum(size, keep, src, dst)


def merge_wavg(x: Tensor, size: Tensor | None, new_size: Tensor, keep: Tensor, src: Tensor, dst: Tensor,
               num_dst: int) -> Tensor:
    """The size-weighted average of each group of merged tokens. The destinations are the last
    `num_dst` outputs; the outputs before them are copies of their input tokens."""
    out, moved = _rows(x, keep), _rows(x, src)
    first = out.shape[1] - num_dst
    if size is not None:
        moved = moved * _rows(size, src)
    if torch.compiler.is_exporting():  # functional: Gather, ScatterElements(add), Concat
        groups = out[:, first:] if size is None else out[:, first:] * _rows(size, keep[:, first:])
        groups = _add_rows(groups, dst - first, moved) / new_size[:, first:]
        return torch.cat([out[:, :first], groups], dim=1)
    groups = out[:, first:]  # eager: in place, so that the only large new tensor is `out`
    if size is not None:
        groups.mul_(_rows(size, keep[:, first:]))
    _add_rows(out, dst, moved)
    groups.div_(new_size[:, first:])
    return out


def merge_source(x: Tensor, source: Tensor | None, keep: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """Which input tokens each token covers: (B, N_out, N_in), 0/1 (groups are disjoint)."""
    if source is None:
        batch, n = x.shape[:2]
        source = torch.eye(n, dtype=x.dtype, device=x.device).expand(batch, n, n).contiguous()
    return _merge_sum(source, keep, src, dst)


def unmerge_index(keep: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """For every original token, its position in the merged sequence (B, N)."""
    batch, n_out = keep.shape
    where = torch.zeros(batch, n_out + src.shape[1], dtype=keep.dtype, device=keep.device)
    where = where.scatter(1, keep, torch.arange(n_out, device=keep.device).expand(batch, n_out))
    return where.scatter(1, src, dst)


def unmerge(x: Tensor, where: Tensor) -> Tensor:
    """Every original token back: merged-away tokens take their destination's value."""
    return _rows(x, where)


def parse_r(layers: int, r) -> list[int]:
    """r per layer: an int, a list (padded with zeros), or (r, inflection): r(1-i) .. r(1+i) linearly."""
    if isinstance(r, list):
        return list(r) + [0] * (layers - len(r))
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / (layers - 1) if layers > 1 else 0.0
    return [int(lo + step * i) for i in range(layers)]


def grid_destinations(h: int, w: int, generator: torch.Generator | None = None, sy: int = 2,
                      sx: int = 2) -> tuple[Tensor, Tensor]:
    """(A, B) positions on an h x w raster: B holds one token per sy x sx cell (top-left, or drawn
    from `generator`); rows and columns beyond the last whole cell are all in A."""
    hs, ws = h // sy, w // sx
    pick = (torch.randint(sy * sx, (hs, ws), generator=generator) if generator is not None
            else torch.zeros(hs, ws, dtype=torch.long))
    rows = torch.arange(hs)[:, None] * sy + pick // sx
    cols = torch.arange(ws)[None, :] * sx + pick % sx
    is_dst = torch.zeros(h * w, dtype=torch.bool)
    is_dst[(rows * w + cols).flatten()] = True
    return (~is_dst).nonzero().flatten(), is_dst.nonzero().flatten()


class SourceRecorder(Recorder):
    """Keeps the last source matrix computed (trace_source=True): `opt.tome_source`."""

    def __str__(self) -> str:
        if self.value is None:
            return "not recorded yet (call the model)"
        return f"(batch, tokens, patches) = {tuple(self.value.shape)} from the last call: opt.tome_source"


def _matching_axes(node: fx.Node, amap: ax.AxisMap):
    batch = amap.axis_of(node.args[0], 0)
    return [(batch, ax.EMPTY)] * 3


for _fn in (merge_wavg, merge_sizes, merge_source, unmerge, head_mean):
    ax.register_rule(_fn, ax.same_as_first_input)
ax.register_rule(bipartite_soft_matching, _matching_axes)
ax.register_rule(grid_matching, _matching_axes)
