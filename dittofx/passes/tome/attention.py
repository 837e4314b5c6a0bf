"""What in an attention keeps its tokens from being merged: shared by both modes."""

from __future__ import annotations

from torch import fx

from dittofx.rewriter import axes as ax
from dittofx.rewriter.analysis import AttentionSite
from dittofx.rewriter.edit import arg
from dittofx.rewriter.tokens import is_size_bias


def shape(node) -> tuple[int, ...]:
    return ax.shape_of(node) or ()


def attention_problem(site: AttentionSite) -> str | None:
    """What in the attention itself keeps its tokens from being merged."""
    if site.windowed:
        return "the attention runs over windows of the patch grid: a merge would mix tokens of different windows"
    if site.position_bias:
        return ("the attention adds a learned relative-position bias indexed by token position: merged tokens "
                "have no position in it")
    mask = arg(site.node, "attn_mask")
    if arg(site.node, "is_causal", False):
        return "the attention is causal"
    if isinstance(mask, fx.Node) and not is_size_bias(mask) and (shape(mask)[-1:] or (1,))[0] != 1:
        return "the attention has a mask over the tokens"
    return None
