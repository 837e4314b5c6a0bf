"""ToMe's algorithm on tensors: each function is one node of the rewritten graph.

A matching is three index tensors: `keep` (B, N - r), the positions of the tokens that stay, in
output order; `src` (B, r), the positions of the tokens merged away; `dst` (B, r), where in the
output each of those goes. The merge is a gather and a scatter-add followed by a divide:
`scatter_reduce(mean)` exports to ONNX wrongly. Token sizes and proportional attention are the
rewriter's (`rewriter/tokens.py`), shared with every pass that gives tokens sizes.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import fx

from dittofx.errors import PassSpecError
from dittofx.rewriter import axes as ax
from dittofx.runtime import Recorder, SequenceState

Tensor = torch.Tensor

def head_mean(key: Tensor, tokens: Tensor | None = None) -> Tensor:
    """The ToMe metric: keys averaged over heads -> (B, N, d). Keys are (B, heads, N, d), (B, N, d) of
    one head, or (B·heads, N, d) with the heads folded batch-major into the batch (B from `tokens`)."""
    if key.dim() == 4:
        return key.mean(1)
    batch = key.shape[0] if tokens is None else tokens.shape[0]
    if batch == key.shape[0]:
        return key
    return key.reshape(batch, key.shape[0] // max(batch, 1), *key.shape[1:]).mean(1)


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


def compose_where(where: Tensor, earlier: Tensor | None) -> Tensor:
    """Where each original token is after one more merge: `earlier` (B, N0) indexes the sequence
    that `where` (B, N) maps on (None: that sequence is the original)."""
    return where if earlier is None else where.gather(1, earlier)


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
    return _cell_positions(h, w, pick, sy, sx)


def _cell_positions(h: int, w: int, pick: Tensor, sy: int, sx: int) -> tuple[Tensor, Tensor]:
    """(A, B) positions when cell (i, j) sends its `pick[i, j]`-th token (row-major in the cell) to B."""
    hs, ws = pick.shape
    device = pick.device
    rows = torch.arange(hs, device=device)[:, None] * sy + pick // sx
    cols = torch.arange(ws, device=device)[None, :] * sx + pick % sx
    is_src = torch.ones(h * w, dtype=torch.uint8, device=device)
    is_src[(rows * w + cols).flatten()] = 0
    order = is_src.argsort(stable=True)  # B then A, each in raster order; no nonzero: no device sync
    return order[hs * ws:].clone(), order[:hs * ws].clone()  # two tensors, not views of one


# -- destinations drawn on every call (tomesd's use_rand) -------------------------------------------
#
# The draw is a custom op: torch.compile(fullgraph=True) keeps it as one opaque call, run at every call
# of the compiled graph, and torch.export (hence ONNX) refuses it, since an exported model cannot hold a
# generator. The generator lives on a `DestinationDraws` module of the rewritten graph; the op finds it
# by key.

_DRAWS: dict[int, weakref.ref] = {}
_keys = itertools.count()


class DestinationDraws(SequenceState):
    """The generator of the destinations drawn on every call (`ToMe(use_rand=True)`), as tomesd's.

    tomesd makes its generator at its first merge: a fork of the global RNG of the tokens' device
    (after `torch.manual_seed(s)`, the state of `Generator().manual_seed(s)`); `seed` seeds it instead.
    Each merging block draws `randint(sy * sx, (h // sy, w // sx))` from it in the order the blocks run;
    a call with an odd batch draws nothing and uses the top-left destinations (tomesd: its batch cannot
    hold a prompted and an unprompted half). `reset()` starts the sequence again."""

    # what export_onnx says instead of exporting (one line)
    not_exportable = ("tome: use_rand=True draws the destinations from a generator at every call, which an exported "
                      "model (ONNX, TensorRT) cannot hold: rewrite with use_rand=False to export (fixed destinations)")

    def __init__(self, seed: int | None = None):
        super().__init__()
        self.seed = seed
        self.generator: torch.Generator | None = None
        self.key = next(_keys)
        self.sites = 0  # draws inserted: each its own call of the op
        _DRAWS[self.key] = weakref.ref(self, lambda _, key=self.key: _DRAWS.pop(key, None))

    def reset(self) -> None:
        self.generator = None

    def draw(self, add, metric, h: int, w: int, sy: int, sx: int):
        """Insert, with `add` (an Inserter), one draw of (A, B) positions for the tokens of `metric`."""
        self.sites += 1
        return add.getitems(add(torch.ops.dittofx.tome_random_destinations.default, metric, self.key, self.sites,
                                h, w, sy, sx), 2)

    def generator_for(self, device: torch.device) -> torch.Generator:
        """The generator, made at the first draw (or moved, as tomesd does, when the device changes)."""
        gen = self.generator
        if gen is not None and gen.device == device:
            return gen
        if device.type not in ("cpu", "cuda"):
            device = torch.device("cpu") if gen is None else gen.device
        if gen is None or gen.device != device:
            gen = torch.Generator(device=device)
            if self.seed is not None:
                gen.manual_seed(self.seed)
            else:
                gen.set_state(torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device))
        self.generator = gen
        return gen

    def __deepcopy__(self, memo):  # the graph's nodes name it by key: a copy of the graph shares it
        return self

    def extra_repr(self) -> str:
        return f"seed={self.seed}"


def destination_draws(gm: fx.GraphModule, seed: int | None) -> DestinationDraws:
    """The graph's generator of destinations drawn every call: one per graph (`gm.tome_draws`), shared
    by every merge in the order they run, as tomesd's one generator."""
    if not hasattr(gm, "tome_draws"):
        gm.add_submodule("tome_draws", DestinationDraws(seed))
    return gm.tome_draws


@torch.library.custom_op("dittofx::tome_random_destinations", mutates_args=())
def random_destinations(metric: Tensor, key: int, site: int, h: int, w: int, sy: int, sx: int
                        ) -> tuple[Tensor, Tensor]:
    """(A, B) positions for this call: B one token per sy x sx cell, drawn from the generator of
    `DestinationDraws` `key` (`site` only tells the calls apart); the top-left ones for an odd batch."""
    ref = _DRAWS.get(key)
    draws = ref() if ref is not None else None
    if draws is None:
        raise RuntimeError("tome: the generator of use_rand=True is gone (its graph was freed)")
    gen = draws.generator_for(metric.device)
    shape = (h // sy, w // sx)
    if metric.shape[0] % 2:
        pick = torch.zeros(shape, dtype=torch.long, device=metric.device)
    else:
        pick = torch.randint(sy * sx, shape, generator=gen, device=gen.device).to(metric.device)
    return _cell_positions(h, w, pick, sy, sx)


@random_destinations.register_fake
def _(metric, key, site, h, w, sy, sx):
    if torch.compiler.is_exporting():
        raise PassSpecError(DestinationDraws.not_exportable)
    n_dst = (h // sy) * (w // sx)
    return (metric.new_empty(h * w - n_dst, dtype=torch.long), metric.new_empty(n_dst, dtype=torch.long))


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
ax.register_rule(torch.ops.dittofx.tome_random_destinations.default, lambda node, amap: [(ax.EMPTY,)] * 2)
