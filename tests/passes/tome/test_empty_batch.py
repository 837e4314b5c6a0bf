"""ToMe on a batch of 0: the merge ops give empty outputs of the shapes they give any other batch, as the
original model gives an empty output."""

from __future__ import annotations

import pytest
import torch

import dittofx
from dittofx.models import zoo
from dittofx.passes.tome import ops

N, C, R = 65, 32, 4


def merged(batch: int, protected: int, grid: bool):
    """Every merge op's output for a batch of `batch` (B, N, C) tokens, by name."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, N - protected if grid else N, C, generator=g)
    metric = ops.head_mean(torch.randn(batch, 2, x.shape[1], 8, generator=g))
    if grid:
        keep, src, dst = ops.grid_matching(metric, *ops.grid_destinations(8, 8), R)
        num_dst = 16
    else:
        keep, src, dst = ops.bipartite_soft_matching(metric, R, protected)
        num_dst = ops.num_destinations(N, protected)
    size = torch.rand(batch, x.shape[1], 1, generator=g) + 1
    new_size = ops.merge_sizes(x, size, keep, src, dst)
    return {
        "metric": metric, "keep": keep, "src": src, "dst": dst,
        "sizes": ops.merge_sizes(x, None, keep, src, dst),
        "new_size": new_size,
        "wavg": ops.merge_wavg(x, None, ops.merge_sizes(x, None, keep, src, dst), keep, src, dst, num_dst),
        "wavg_sized": ops.merge_wavg(x, size, new_size, keep, src, dst, num_dst),
        "source": ops.merge_source(x, None, keep, src, dst),
        "unmerge": ops.unmerge(ops.merge_wavg(x, None, ops.merge_sizes(x, None, keep, src, dst), keep, src, dst,
                                              num_dst), ops.unmerge_index(keep, src, dst)),
    }


@pytest.mark.parametrize("protected,grid", [(0, False), (1, False), (0, True)], ids=["plain", "class-token", "grid"])
def test_merge_ops_on_an_empty_batch(protected, grid):
    empty, full = merged(0, protected, grid), merged(2, protected, grid)
    for name, out in empty.items():
        assert out.shape == (0,) + full[name].shape[1:], name
        assert out.dtype == full[name].dtype, name


@pytest.mark.parametrize("spec", ["tome:r=4", "tome:r=4,trace_source=true"])
def test_model_on_an_empty_batch_is_the_original(spec):
    vit = zoo.build("vit")
    opt = dittofx.optimize(vit.model, [spec], vit.example_inputs)
    empty = vit.example_inputs[0][:0]
    with torch.no_grad():
        want = vit.model(empty)
        got = opt(empty)
    assert got.shape == want.shape == (0, 10) and got.dtype == want.dtype
