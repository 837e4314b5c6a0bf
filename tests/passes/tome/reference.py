"""An independent, plain-PyTorch reference of Token Merging for the tests of the ToMe pass.

Written from the paper's description, one sample at a time with Python lists (slow and obvious), and
re-running the models' own submodules with the merges in between. It shares no code with
dittofx.passes.tome.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# one merge


def match_one(metric: torch.Tensor, r: int, protected: int) -> list[list[int]]:
    """ToMe's bipartite soft matching for one sample: the groups of positions (in output order) that
    become one token each. A = even positions, B = odd; positions < `protected` never merge."""
    n = metric.shape[0]
    m = metric / metric.norm(dim=-1, keepdim=True)
    a = [i for i in range(protected, n) if i % 2 == 0]
    b = [i for i in range(protected, n) if i % 2 == 1]
    r = min(r, (n - protected) // 2)
    best, match = (m[a] @ m[b].T).max(dim=1)
    ranked = sorted(range(len(a)), key=lambda i: -best[i].item())
    sources, unmerged = ranked[:r], ranked[r:]
    if protected:
        unmerged.sort()
    groups = {j: [b[j]] for j in range(len(b))}
    for i in sources:
        groups[int(match[i])].append(a[i])
    return [[i] for i in range(protected)] + [[a[i]] for i in unmerged] + [groups[j] for j in range(len(b))]


def merge_groups(x: torch.Tensor, size: torch.Tensor, groups: list[list[int]]):
    """Size-weighted average of each group: x (N, C), size (N,) -> (len(groups), C), (len(groups),)."""
    rows, sizes = [], []
    for g in groups:
        s = size[g]
        rows.append((x[g] * s[:, None]).sum(0) / s.sum())
        sizes.append(s.sum())
    return torch.stack(rows), torch.stack(sizes)


def tome_merge(x, metric, size, r, protected):
    """Batch of merges: x (B, N, C), metric (B, N, c), size (B, N) -> x, size, groups per sample."""
    out, sizes, groups = [], [], []
    for i in range(x.shape[0]):
        g = match_one(metric[i], r, protected)
        xi, si = merge_groups(x[i], size[i], g)
        out.append(xi)
        sizes.append(si)
        groups.append(g)
    return torch.stack(out), torch.stack(sizes), groups


def attend(q, k, v, size, scale=None):
    """Attention with proportional attention: log(size) added to the logits."""
    mask = None if size is None else size.log()[:, None, None, :].to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def weighted_pool(t, size, prefix):
    s = size[:, prefix:, None]
    return (t[:, prefix:] * s).sum(1) / s.sum(1)


# ---------------------------------------------------------------------------------------------
# models, re-run block by block


@torch.no_grad()
def timm_vit(model, x, schedule, prop_attn=True, sources=None):
    """A timm VisionTransformer (or DeiT distilled) with ToMe after each block's attention."""
    p = model.num_prefix_tokens
    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    size = torch.ones(t.shape[:2])
    merged = False
    for blk, r in zip(model.blocks, schedule):
        attn = blk.attn
        h = blk.norm1(t)
        b, n, c = h.shape
        q, k, v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        o = attend(q, k, v, size if (prop_attn and merged) else None)
        o = attn.proj(attn.norm(o.transpose(1, 2).reshape(b, n, -1)))
        t = t + blk.ls1(o)
        if r > 0:
            t, size, groups = tome_merge(t, k.mean(1), size, r, p)
            merged = True
            if sources is not None:
                sources.append(groups)
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    t = model.norm(t)
    if model.global_pool == "avg":
        return model.head(model.head_drop(model.fc_norm(weighted_pool(t, size, p))))
    return model.forward_head(t)


@torch.no_grad()
def hf_vit(model, x, schedule, prop_attn=True):
    """transformers ViTForImageClassification with ToMe after each layer's attention."""
    vit = model.vit
    t = vit.embeddings(x)
    size = torch.ones(t.shape[:2])
    merged = False
    for layer, r in zip(vit.layers, schedule):
        a = layer.attention
        h = layer.layernorm_before(t)
        b, n, _ = h.shape

        def heads(proj):
            return proj(h).view(b, n, -1, a.head_dim).transpose(1, 2)

        q, k, v = heads(a.q_proj), heads(a.k_proj), heads(a.v_proj)
        o = attend(q, k, v, size if (prop_attn and merged) else None, scale=a.scaling)
        t = a.o_proj(o.transpose(1, 2).reshape(b, n, -1)) + t
        if r > 0:
            t, size, _ = tome_merge(t, k.mean(1), size, r, 1)
            merged = True
        t = layer.mlp(layer.layernorm_after(t)) + t
    return model.classifier(vit.layernorm(t)[:, 0])


def sources_matrix(steps: list[list[list[list[int]]]], n: int) -> torch.Tensor:
    """Compose the groups of successive merges into (B, N_out, N_in) 0/1 matrices."""
    batch = len(steps[0])
    out = []
    for i in range(batch):
        cover = [[j] for j in range(n)]
        for groups in steps:
            cover = [sorted(sum((cover[k] for k in g), [])) for g in groups[i]]
        m = torch.zeros(len(cover), n)
        for row, members in enumerate(cover):
            m[row, members] = 1
        out.append(m)
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# diffusion (tomesd): merge before an attention, unmerge after


def grid_match_one(metric, dst: list[int], r: int) -> list[list[int]]:
    """tomesd's matching for one sample: B = `dst` positions, A = the rest; groups in any order."""
    n = metric.shape[0]
    m = metric / metric.norm(dim=-1, keepdim=True)
    a = [i for i in range(n) if i not in set(dst)]
    best, match = (m[a] @ m[dst].T).max(dim=1)
    ranked = sorted(range(len(a)), key=lambda i: -best[i].item())
    groups = {j: [dst[j]] for j in range(len(dst))}
    for i in ranked[:min(r, len(a))]:
        groups[int(match[i])].append(a[i])
    return [[a[i]] for i in ranked[min(r, len(a)):]] + list(groups.values())


def merge_unmerge(fn, x, metric, dst, r):
    """fn applied to the merged tokens (plain means), its output spread back over every token."""
    out = []
    for i in range(x.shape[0]):
        groups = grid_match_one(metric[i], dst, r)
        merged = torch.stack([x[i][g].mean(0) for g in groups])
        out.append((merged, groups))
    y = fn(torch.stack([m for m, _ in out]))
    full = torch.empty(x.shape[0], x.shape[1], y.shape[-1], dtype=y.dtype)
    for i, (_, groups) in enumerate(out):
        for row, g in enumerate(groups):
            full[i, g] = y[i, row]
    return full


def top_left_destinations(h: int, w: int) -> list[int]:
    return [(2 * i) * w + 2 * j for i in range(h // 2) for j in range(w // 2)]


class MergedCall(torch.nn.Module):
    """Wraps a block's attn1 (or ff): merge the input, call it, unmerge the output."""

    def __init__(self, inner, state, dst, ratio):
        super().__init__()
        self.inner, self.state, self.dst, self.ratio = inner, state, dst, ratio

    def forward(self, hidden_states, *args, **kwargs):
        r = int(hidden_states.shape[1] * self.ratio)
        return merge_unmerge(lambda t: self.inner(t, *args, **kwargs), hidden_states, self.state["metric"],
                             self.dst, r)


def tomesd_patch(blocks, grid, ratio, merge_mlp=False, destinations=None):
    """Patch diffusers BasicTransformerBlocks in place (on a copy of the model) as tomesd does."""
    h, w = grid
    for i, blk in enumerate(blocks):
        state = {}
        dst = destinations[i] if destinations is not None else top_left_destinations(h, w)

        def remember(module, args, kwargs, state=state):
            state["metric"] = args[0] if args else kwargs["hidden_states"]

        blk.register_forward_pre_hook(remember, with_kwargs=True)
        blk.attn1 = MergedCall(blk.attn1, state, dst, ratio)
        if merge_mlp:
            blk.ff = MergedCall(blk.ff, state, dst, ratio)
