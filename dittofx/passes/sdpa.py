"""Canonicalise hand-written attention, softmax(Q @ K^T * s + mask) @ V, to one SDPA node.

Every other pass then sees one form of attention, and the fused kernel runs. The scale is read
from the graph: a multiply or divide by a constant between the two matmuls (a scale applied to Q
before the first matmul stays where it is, and SDPA gets scale=1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from dittofx.passes.base import Pass, PassContext, PassResult
from dittofx.rewriter.analysis import SDPA, module_path
from dittofx.rewriter.edit import arg, copy_scope, remove_dead, set_arg, values_at

aten = torch.ops.aten
MATMULS = {aten.matmul.default, aten.bmm.default}
PASS_THROUGH = {aten.dropout.default, aten.to.dtype, aten.type_as.default, aten.clone.default}


def _through(node: fx.Node) -> fx.Node:
    """Skip casts and (inference-time) dropouts."""
    while node.target in PASS_THROUGH and isinstance(node.args[0], fx.Node):
        if node.target is aten.dropout.default and node.args[1] and node.args[2]:
            break  # an active dropout is not a no-op
        node = node.args[0]
    return node


def _key_of(kt: fx.Node) -> fx.Node | None:
    """K from K^T: transpose(k, -2, -1) or permute swapping the last two dims."""
    rank = kt.meta["val"].dim()
    if kt.target is aten.transpose.int:
        dims = {d % rank for d in kt.args[1:3]}
        return kt.args[0] if dims == {rank - 2, rank - 1} else None
    if kt.target is aten.permute.default:
        perm = [d % rank for d in kt.args[1]]
        return kt.args[0] if perm == list(range(rank - 2)) + [rank - 1, rank - 2] else None
    return None


def match_attention(out: fx.Node):
    """(q, k, v, scale, mask) if `out` is softmax(q @ k^T * scale + mask) @ v, else None."""
    if out.target not in MATMULS:
        return None
    probs, v = out.args[:2]
    probs = _through(probs)
    if probs.target not in (aten.softmax.int, aten._softmax.default) or probs.args[1] % probs.meta["val"].dim() \
            != probs.meta["val"].dim() - 1:
        return None
    logits, mask, scale = _through(probs.args[0]), None, 1.0
    if logits.target is aten.add.Tensor and all(isinstance(a, fx.Node) for a in logits.args):
        logits, mask = logits.args
    for _ in range(2):
        if logits.target in (aten.mul.Tensor, aten.div.Tensor) and isinstance(logits.args[1], (int, float)):
            factor = float(logits.args[1])
            scale *= factor if logits.target is aten.mul.Tensor else 1.0 / factor
            logits = logits.args[0]
    if logits.target not in MATMULS:
        return None
    q, kt = logits.args[:2]
    k = _key_of(kt)
    if k is None or q.meta["val"].dim() != k.meta["val"].dim() or q.meta["val"].dim() not in (3, 4):
        return None
    return q, k, v, scale, mask


def _shape_only(node: fx.Node) -> bool:
    """True when `node` is computed from sizes and constants only, never from input values."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" or (n.op == "get_attr" and n.meta.get("val") is not None
                                     and n.meta["val"].requires_grad):
            return False
        if n.target is aten.sym_size.int:
            continue
        todo.extend(n.all_input_nodes)
    return True


def drop_trivial_masks(gm: fx.GraphModule, flat_inputs: list) -> int:
    """Remove attention masks that hide nothing and depend only on shapes (an all-true boolean mask
    or an all-zero additive one, as transformers materialises under export). They hard-code the token
    count and cost a masked kernel for nothing."""
    masked = {n: arg(n, "attn_mask") for n in gm.graph.nodes if n.target is SDPA}
    masks = {m for m in masked.values() if isinstance(m, fx.Node) and _shape_only(m)}
    if not masks:
        return 0
    values = values_at(gm, masks, flat_inputs)
    trivial = {m for m, v in values.items() if (v.all() if v.dtype == torch.bool else not v.any())}
    for sdpa, m in masked.items():
        if m in trivial:
            set_arg(sdpa, "attn_mask", None)
    return sum(m in trivial for m in masked.values())


@dataclass(repr=False)
class CanonicalizeAttention(Pass):
    """Replace softmax(Q K^T s) V by aten.scaled_dot_product_attention (exact up to rounding), and drop
    attention masks that mask nothing. The pass manager runs it first (its prologue)."""

    name: ClassVar[str] = "sdpa"
    needs_attention: ClassVar[bool] = False  # it is what makes attention visible
    listed: ClassVar[bool] = False

    def run(self, ctx: PassContext) -> PassResult:
        result = PassResult()
        graph = ctx.gm.graph
        for node in list(graph.nodes):
            found = match_attention(node)
            if found is None:
                continue
            q, k, v, scale, mask = found
            if mask is not None and mask.meta["val"].dtype == torch.bool:
                continue  # a boolean mask added to logits is not what it looks like: leave it
            with graph.inserting_before(node):
                sdpa = graph.call_function(SDPA, (q, k, v),
                                           {"attn_mask": mask, "scale": scale})
            copy_scope(node, sdpa)
            node.replace_all_uses_with(sdpa)
            paths = module_path(node)
            result.note(None, f"canonicalised hand-written attention in {paths[-1] if paths else node.name} "
                              f"to scaled_dot_product_attention (scale {scale:.4g})")
            result.changed = True
        dropped = drop_trivial_masks(ctx.gm, ctx.capture.flat_inputs())
        if dropped:
            result.note(None, f"dropped {dropped} attention masks that mask nothing")
            result.changed = True
        if result.changed:
            remove_dead(ctx.gm)
        return result

