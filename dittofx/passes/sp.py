"""Sequence parallelism: the tokens split between the ranks of a process group, as in DeepSpeed-Ulysses.

Every rank builds the same model and applies the pass (`dittofx.optimize(model, ["sp", "pab"], x)`
after `torch.distributed.init_process_group`); each gets the full inputs and returns the full output.
In between, each rank holds only its contiguous chunk of the token axis (cut as torch.tensor_split
cuts it: 189 tokens on 2 ranks are 95 + 94), from where the token axis first appears after the patch
embedding: the grid tokens of the model's longest self-attention (the axes analysis says which).

Around each self-attention whose queries, keys and values are split along their tokens:
- method="ulysses" (default): an all_to_all swaps the token split for a head split (each rank then
  holds every token of H/W heads), the attention runs, an all_to_all swaps back;
- method="allgather", or where the heads do not divide by the world size or a mask differs per head:
  keys and values are all-gathered and the local queries attend to all of them.
Cross-attention (keys and values from the text, not split) communicates nothing; an attention whose
batch holds the split tokens (Latte's temporal attention: one spatial position's frames) neither.
Joint attention over [text, video] concatenated: the replicated text is cut to its chunk too, each
rank holding its chunk of each segment, and slices back to the text or video part follow the
segments (`rewriter/shard.py`). Anything the walk does not know is gathered first (the global order
restored) and runs replicated, as the output does (the unpatchify).

The analyses after the split read each attention's kind (spatial, temporal, cross, joint) as it was
found on the whole graph (`analysis.pin_sites`): views of a chunk no longer match the patch grid's
labels, and PAB picks its ranges by kind.

Composes with PAB: write ["sp", "pab"]. PAB wraps each attention with its all_to_alls (they are in
the attention module's scope and only it reads them), so a broadcast step runs neither the attention
nor its communication; the decision depends only on the timestep and the call index, the same on
every rank, so every rank makes the same collectives in the same order. The collectives are counted
(`dittofx.runtime.sp.CommStats`): `opt.graph_module.sp.stats`, and the report's stats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import fx

from dittofx.errors import PassSpecError, UnsupportedModelError
from dittofx.passes.base import Pass, PassContext, PassResult, shown
from dittofx.rewriter import axes as ax
from dittofx.rewriter.analysis import Analysis, Block, pin_sites
from dittofx.rewriter.edit import arg
from dittofx.rewriter.shard import Fallback, Sharder, Split, Unsplittable
from dittofx.runtime import sp as rt

METHODS = ("ulysses", "allgather")
START = ("start one: torch.distributed.init_process_group('gloo' on CPU, 'nccl' on GPUs) in each of N >= 2 "
         "processes (torchrun --nproc-per-node N, or dittofx.runtime.sp.launch(fn, N))")

for _fn in (rt.local_slice, rt.gather, rt.seq_to_heads, rt.heads_to_seq):
    ax.register_rule(_fn, ax.same_as_first_input)
ax.register_rule(rt.qkv_to_heads, lambda node, axes: (ax.EMPTY, *axes.tensors.get(node.args[0], ())))


@dataclass(repr=False)
class SequenceParallel(Pass):
    """Split the tokens between the ranks of `group` (None: the default group).

    method: "ulysses" (all_to_all to a head split around each self-attention) or "allgather" (keys
    and values gathered; also where heads do not divide by the world size).
    """

    name: ClassVar[str] = "sp"
    runs_before: ClassVar[tuple[str, ...]] = ("pab",)
    # after the split, the axes analysis reads chunks: what ToMe and RLT would decide from it is untested
    composes_with: ClassVar[tuple[str, ...]] = ("pab", "sdpa")
    exact_setting: ClassVar[str] = "as given (sequence parallelism computes what one process does)"

    method: str = shown("ulysses")
    group: object = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise PassSpecError(f"sp: method must be one of {', '.join(METHODS)}, got {self.method!r}")
        # what every graph this pass makes communicates (one optimized model's input forms share it):
        # `opt.comm_stats`, the report's stats
        self.stats = rt.CommStats()

    def check(self, analysis: Analysis, block: Block) -> str | None:
        if not any(s.is_self for s in block.sites):
            return "no self-attention over the tokens"
        return None

    def world(self) -> tuple[int, int]:
        """(rank, world size) in the group; PassSpecError where there is no group of 2 or more."""
        if not (dist.is_available() and dist.is_initialized()):
            raise PassSpecError(f"sp needs an initialised torch.distributed process group of 2 or more ranks and "
                                f"there is none: {START}")
        world = dist.get_world_size(self.group)
        if world < 2:
            raise PassSpecError(f"sp needs a process group of 2 or more ranks, this one has {world}: {START}")
        return dist.get_rank(self.group), world

    def run(self, ctx: PassContext) -> PassResult:
        rank, world = self.world()
        result = PassResult()
        gm, analysis = ctx.gm, ctx.analysis
        if isinstance(getattr(gm, "sp", None), rt.SPGraph):
            raise PassSpecError("sp: the graph is already split between ranks; give the pass once")
        labels = _token_labels(analysis)
        start = _split_point(gm, analysis.axes, labels) if labels else None
        if start is None:
            raise UnsupportedModelError(
                f"sp: no token axis of the patch grid found in {type(ctx.model).__name__} to split between ranks "
                f"(sequence parallelism needs a model whose attention runs over patch tokens)")
        node, dim = start
        pin_sites(analysis)
        size = ax.shape_of(node)[dim]
        key = rt.register(self.group, rank, world, self.stats)
        counts = {"ulysses": 0, "allgather": 0, "local": 0, "cross": 0, "gathered": 0}
        sharder = Sharder(gm, key, rank, world, lambda sh, n: self._attention(sh, n, counts), rt.local_slice, rt.gather)
        sharder.split_at(node, Split(dim, ((1, size, 1),)))
        try:
            sharder.run(node)
        except Unsplittable as e:
            raise UnsupportedModelError(f"sp: cannot split the tokens of {type(ctx.model).__name__}: {e}") from e
        gm.add_module("sp", rt.SPGraph(key, self.method))
        chunk = rt.chunk(size, rank, world)
        result.note(None, f"sp: {size} tokens split over {world} ranks after {node.name} (this rank: {chunk}); "
                          f"attention: {counts['ulysses']} ulysses, {counts['allgather']} all-gather of keys/values, "
                          f"{counts['local']} local (tokens in the batch), {counts['cross']} cross (no communication)"
                          + (f", {counts['gathered']} gathered whole" if counts["gathered"] else "")
                          + (f"; {len(sharder.slices)} replicated tensors over the tokens cut to the local chunk"
                             if sharder.slices else ""))
        if sharder.gathers:
            where = ", ".join(f"{k} ({v})" for k, v in sharder.gathers.items())
            result.note(None, f"sp: all-gathered before {where}")
        result.stats["sp"] = gm.sp.stats
        result.changed = True
        return result

    def _attention(self, sh: Sharder, node: fx.Node, counts: dict) -> Split | None:
        q, k, v = node.args[:3]
        sq, sk, sv = sh.split_of(q), sh.split_of(k), sh.split_of(v)
        mask = arg(node, "attn_mask")
        rank = sh.rank_of(q)
        seq = rank - 2
        if arg(node, "is_causal") or (isinstance(mask, fx.Node) and sh.split_of(mask) is not None):
            counts["gathered"] += 1
            raise Fallback
        if sq is not None and sq.dim < seq:  # the split tokens are in the batch: each rank attends on its own
            out = sh.align(node, [q, k, v] + ([mask] if isinstance(mask, fx.Node) else []), rank)
            if out is None or out.dim >= seq:
                raise Fallback
            counts["local"] += 1
            return out
        if sq is None or sq.dim != seq:
            counts["gathered"] += 1
            raise Fallback
        if sk is None and sv is None:  # cross-attention: keys and values replicated
            self._mask_rows(sh, node, mask, sq)
            counts["cross"] += 1
            return sq
        if sk is None or sk != sv or sk.dim != seq:
            counts["gathered"] += 1
            raise Fallback
        heads = sh.shape[q][1] if rank == 4 else 0
        kv_heads = sh.shape[k][1] if rank == 4 else 0
        # a replicated mask over (queries, keys) holds as it is after the swap (the tokens are back in their
        # global order), where it is the same for every head
        mask_ok = mask is None or not isinstance(mask, fx.Node) or sh.rank_of(mask) < 3 or sh.shape[mask][-3] == 1
        ulysses = self.method == "ulysses" and rank == 4 and mask_ok and heads % sh.world == 0 \
            and kv_heads % sh.world == 0
        if ulysses and sq == sk and sh.shape[q] == sh.shape[k] == sh.shape[v]:
            # one all_to_all for the three (the same bytes; one collective's latency instead of three)
            qkv = sh.call_before(node, rt.qkv_to_heads, (q, k, v, sh.ctx, sq.segments), (3, *sh.shape[q]))
            for i, x in enumerate((q, k, v)):
                node.replace_input_with(x, sh.call_before(node, torch.ops.aten.select.int, (qkv, 0, i), sh.shape[x]))
        elif ulysses:
            for x, split in ((q, sq), (k, sk), (v, sk)):
                swapped = sh.call_before(node, rt.seq_to_heads, (x, sh.ctx, split.segments), sh.shape[x])
                node.replace_input_with(x, swapped)
        if ulysses:
            users = list(node.users)
            back = sh.call_after(node, rt.heads_to_seq, (node, sh.ctx, sq.segments), sh.shape[node])
            for u in users:
                u.replace_input_with(node, back)
            sh.state[back] = sq
            counts["ulysses"] += 1
            return None  # the SDPA itself holds (B, H/W, N, d): nothing reads it but `back`
        for x in (k, v):
            node.replace_input_with(x, sh.call_before(node, rt.gather, (x, sh.ctx, sk.dim, sk.segments), sh.shape[x]))
        self._mask_rows(sh, node, mask, sq)
        counts["allgather"] += 1
        return sq

    @staticmethod
    def _mask_rows(sh: Sharder, node: fx.Node, mask, sq: Split) -> None:
        """A replicated mask over (queries, keys): its query rows cut to the local queries."""
        if not isinstance(mask, fx.Node) or sh.shape.get(mask) is None:
            return
        rows = sh.rank_of(mask) - 2
        if rows >= 0 and sh.shape[mask][rows] == sq.size and sq.size != 1:
            node.replace_input_with(mask, sh.local(mask, sq.at(rows), node))


def _token_labels(analysis: Analysis) -> frozenset:
    """The labels of the longest self-attention's visual tokens (patch grid, and the latent's frames)."""
    latent = analysis.latent_input.name if analysis.latent_input is not None else None
    best, size = frozenset(), 0
    for site in analysis.sites:
        if not site.is_self or site.kind == "other":
            continue
        labels = frozenset(lab for lab in site.seq_axis.labels
                           if lab.is_grid or (lab.kind == "input" and lab.input_name == latent))
        n = 1
        for lab in labels:
            n *= lab.size
        if any(lab.is_grid for lab in labels) and n > size:
            best, size = labels, n
    return best


def _split_point(gm: fx.GraphModule, amap: ax.AxisMap, labels: frozenset) -> tuple[fx.Node, int] | None:
    """The first node with an axis made of exactly `labels`: where the token axis appears."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        for d, axis in enumerate(amap[node]):
            if d > 0 and set(axis.labels) == labels:
                return node, d
    return None
