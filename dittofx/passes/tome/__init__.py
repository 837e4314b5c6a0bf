"""Token Merging (ToMe, Bolya et al., ICLR 2023) as a graph rewrite.

Two modes, one file each: `vit.py` (`ToMe(r=16)`: merge for good after each attention, the paper's
ViT setting) and `diffusion.py` (`ToMe(ratio=0.5)`: merge before each attention and unmerge after,
tomesd's setting, where every output token must stay). This file holds the options and says which
mode runs.

Every step is one of the tensor functions of `ops.py`, inserted as one graph node; this file says
where they go. Token sizes and proportional attention are the rewriter's (`rewriter/tokens.py`): a
ToMe pass after RLT continues from the sizes RLT gave its padded clips.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from dittofx.errors import PassSpecError
from dittofx.passes.base import Pass, PassContext, PassResult
from dittofx.passes.tome.diffusion import diffusion_check, run_diffusion
from dittofx.passes.tome.ops import (  # noqa: F401 - re-exported: the tensor functions' old home
    bipartite_soft_matching,
    grid_destinations,
    grid_matching,
    merge_sizes,
    merge_source,
    merge_wavg,
    num_destinations,
    parse_r,
    unmerge,
    unmerge_index,
)
from dittofx.passes.tome.vit import default_r, run_vit, vit_check
from dittofx.rewriter.analysis import Analysis, Block
from dittofx.rewriter.tokens import proportional_bias  # noqa: F401 - re-exported (old home)

__all__ = ["ToMe", "default_r"]


@dataclass(repr=False)
class ToMe(Pass):
    """Token Merging: `ToMe(r=16)` for ViTs, `ToMe(ratio=0.5)` for diffusion transformers.

    r: tokens merged in each block: an int, a list (one per block, missing blocks 0), or
        (r, inflection) with inflection in [-1, 1]. ViT mode. None (the default): `default_r` of the
        model's token count and depth, chosen when the pass runs.
    prop_attn: proportional attention: log(size) added to the attention logits after a merge.
    trace_source: record which input tokens each output token covers, (B, N_out, N_in), available
        as `opt.tome_source` after a call.
    unmerge_output: ViT mode on a model that outputs every token (a backbone: Dinov2, CLIP vision):
        after the last merging block, every token takes its merged token's value again, so the output
        has the original's tokens. False (default): such a model is refused.
    ratio: diffusion mode: the share of the tokens merged before each spatial self-attention, or of the
        image tokens of each joint text-image attention (text untouched), in [0, 1).

    Diffusion mode, option for option as tomesd's `apply_patch` (same defaults, same output):
    max_downsample: merge only in blocks whose token grid is at most this much coarser than the finest
        one (the latent's grid after the patch embedding; 1, 2, 4 or 8 on SD's UNet). 1 merges at the
        highest resolution only; a transformer with one resolution (DiT) merges everywhere at any value.
    sx, sy: the destination cells: one destination per sy x sx cell of the grid.
    use_rand: each cell's destination drawn anew at every call, from a generator the rewritten graph
        holds, `opt.graph_module.tome_draws` (`seed` seeds it; None: forked from the global RNG at the
        first call, as tomesd; its `reset()` starts over; a call with an odd batch uses the top-left
        ones and draws nothing, as tomesd). False: the top-left one, or one drawn once
        with `seed` when the pass runs. None (default): True where the model has several resolutions
        (tomesd's UNets), False on a one-resolution transformer. True runs eagerly and under
        torch.compile; an exported model (ONNX) cannot hold the generator: export refuses it.
    merge_attn, merge_crossattn, merge_mlp: merge and unmerge around the self-attention, the
        cross-attention's queries, the feed-forward (one matching per block, from the block's input).
    seed: see use_rand.
    grid: (rows, columns) or (frames, rows, columns) of packed latent tokens (Flux: the pipeline packs
        the latent before the model, so the graph cannot tell rows from columns). None: a square grid
        where the token count is a square (said in the report), else refused naming this option.
    """

    name: ClassVar[str] = "tome"
    changes_tokens: ClassVar[bool] = True

    r: int | list | tuple | None = None
    prop_attn: bool = True
    trace_source: bool = False
    unmerge_output: bool = False
    ratio: float | None = None
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool | None = None
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    seed: int | None = None
    grid: tuple | None = None

    def __post_init__(self):
        self.r = _check_r(self.r)
        self.ratio = _check_ratio(self.ratio)
        for key in ("prop_attn", "trace_source", "unmerge_output", "merge_attn", "merge_crossattn", "merge_mlp"):
            if not isinstance(getattr(self, key), bool):
                raise PassSpecError(f"tome: {key} must be True or False, got {getattr(self, key)!r}")
        if not (self.use_rand is None or isinstance(self.use_rand, bool)):
            raise PassSpecError(f"tome: use_rand must be True, False or None (True on models with several "
                                f"resolutions), got {self.use_rand!r}")
        for key in ("max_downsample", "sx", "sy"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PassSpecError(f"tome: {key} must be a positive int, got {value!r}")
        if self.grid is not None:
            if not isinstance(self.grid, (tuple, list)) or len(self.grid) not in (2, 3) or \
                    any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in self.grid):
                raise PassSpecError(f"tome: grid must be (rows, columns) or (frames, rows, columns) of positive ints, "
                                    f"got {self.grid!r}")
            self.grid = tuple(self.grid)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise PassSpecError(f"tome: seed must be an int or None, got {self.seed!r}")
        if self.ratio is not None and self.r not in (0, None):
            raise PassSpecError("tome: give r (ViT mode: merge for good) or ratio (diffusion mode: merge and "
                                "unmerge), not both")
        if self.ratio is not None and self.unmerge_output:
            raise PassSpecError("tome: unmerge_output applies to r (ViT mode); ratio (diffusion mode) unmerges after "
                                "each attention already")
        if self.ratio is None:
            diffusion_only = [f.name for f in dataclasses.fields(self) if f.name in _DIFFUSION_ONLY
                              and getattr(self, f.name) != f.default]
            if diffusion_only:
                raise PassSpecError(f"tome: {', '.join(diffusion_only)} apply to diffusion mode only: give ratio "
                                    f"(e.g. tome:ratio=0.5,{diffusion_only[0]}=...)")

    # -- where it applies

    def check(self, analysis: Analysis, block: Block) -> str | None:
        if self.ratio is not None:
            return diffusion_check(self, analysis, block)
        reason = vit_check(self, analysis, block)
        if reason is None or self.r not in (0, None):
            return reason
        return None if diffusion_check(self, analysis, block) is None else reason

    # -- the rewrite

    def exact(self) -> ToMe:
        return dataclasses.replace(self, r=0) if self.ratio is None else dataclasses.replace(self, ratio=0.0)

    def run(self, ctx: PassContext) -> PassResult:
        result = PassResult()
        if self.ratio is None and self.r is None and \
                not any(vit_check(self, ctx.analysis, b) is None for b in ctx.analysis.blocks):
            reason = next((vit_check(self, ctx.analysis, b) for b in ctx.analysis.blocks), "no blocks")
            raise PassSpecError(f"tome: give ratio for this model (diffusion mode: merge before each attention, "
                                f"unmerge after), e.g. tome:ratio=0.5; r (merge for good) does not apply: {reason}")
        if self.ratio is not None:
            run_diffusion(self, ctx, result)
        elif self.r == 0:
            result.note(None, "tome: r=0, nothing merged")
        else:
            run_vit(self, ctx, result)
        return result


_DIFFUSION_ONLY = ("max_downsample", "sx", "sy", "use_rand", "merge_attn", "merge_crossattn", "merge_mlp", "seed",
                   "grid")


def _check_r(r):
    if r is None:
        return None

    def bad():
        return PassSpecError(f"tome: r must be a non-negative int, a list of them (one per block), (r, inflection) "
                             f"with inflection in [-1, 1], or None (chosen from the model's depth); got {r!r}")

    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if count(r):
        return r
    if isinstance(r, list) and all(count(v) for v in r):
        return list(r)
    if isinstance(r, tuple) and len(r) == 2 and count(r[0]) and isinstance(r[1], (int, float)) \
            and not isinstance(r[1], bool) and -1 <= r[1] <= 1:
        return (r[0], float(r[1]))
    raise bad()


def _check_ratio(ratio):
    if ratio is None:
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise PassSpecError(f"tome: ratio must be a number in [0, 1) (the share of tokens merged), got {ratio!r}")
    return float(ratio)
