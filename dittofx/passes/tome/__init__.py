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
    ratio: diffusion mode: the share of the tokens of each spatial self-attention merged, in [0, 1).
    merge_mlp: diffusion mode: merge and unmerge around the feed-forward too.
    seed: diffusion mode: draw each 2x2 cell's destination with this seed (None: the top-left one).
    """

    name: ClassVar[str] = "tome"
    changes_tokens: ClassVar[bool] = True

    r: int | list | tuple | None = None
    prop_attn: bool = True
    trace_source: bool = False
    ratio: float | None = None
    merge_mlp: bool = False
    seed: int | None = None

    def __post_init__(self):
        self.r = _check_r(self.r)
        self.ratio = _check_ratio(self.ratio)
        for key in ("prop_attn", "trace_source", "merge_mlp"):
            if not isinstance(getattr(self, key), bool):
                raise PassSpecError(f"tome: {key} must be True or False, got {getattr(self, key)!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise PassSpecError(f"tome: seed must be an int or None, got {self.seed!r}")
        if self.ratio is not None and self.r not in (0, None):
            raise PassSpecError("tome: give r (ViT mode: merge for good) or ratio (diffusion mode: merge and "
                                "unmerge), not both")

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
