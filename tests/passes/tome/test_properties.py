"""Properties of ToMe's merge on random shapes, batches, r and protected prefixes (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dittofx.passes.tome import (
    bipartite_soft_matching,
    grid_destinations,
    grid_matching,
    merge_sizes,
    merge_source,
    merge_wavg,
    num_destinations,
    unmerge,
    unmerge_index,
)

try:  # tests/passes is a package
    from . import reference as ref
except ImportError:  # run as loose files
    import reference as ref


@st.composite
def merges(draw):
    batch = draw(st.integers(1, 4))
    n = draw(st.integers(2, 70))
    protected = draw(st.integers(0, min(6, n - 2)))
    r = draw(st.integers(0, (n - protected) // 2))
    c = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, c, generator=gen, dtype=torch.float64)
    metric = torch.randn(batch, n, draw(st.integers(3, 8)), generator=gen, dtype=torch.float64)
    size = None if draw(st.booleans()) else torch.randint(1, 5, (batch, n, 1), generator=gen).double()
    return x, metric, size, r, protected


def run(x, metric, size, r, protected):
    keep, src, dst = bipartite_soft_matching(metric, r, protected)
    new_size = merge_sizes(x, size, keep, src, dst)
    merged = merge_wavg(x, size, new_size, keep, src, dst, num_destinations(x.shape[1], protected))
    return merged, new_size, (keep, src, dst)


@settings(max_examples=150, deadline=None)
@given(merges())
def test_merge_properties(case):
    x, metric, size, r, protected = case
    batch, n, _ = x.shape
    out, new_size, (keep, src, dst) = run(*case)
    ones = torch.ones(batch, n, 1, dtype=x.dtype)
    size_in = ones if size is None else size
    # the token count drops by exactly r
    assert out.shape == (batch, n - r, x.shape[2]) and new_size.shape == (batch, n - r, 1)
    # every input token is kept or merged away, once; tokens that receive nothing are copied exactly
    first = n - r - num_destinations(n, protected)
    assert torch.equal(out[:, :first], x.gather(1, keep[:, :first, None].expand(-1, -1, x.shape[2])))
    assert torch.equal(torch.cat([keep, src], 1).sort(1).values, torch.arange(n).expand(batch, n))
    # sizes add up to the input total; the size-weighted sum (so the weighted mean) is preserved
    torch.testing.assert_close(new_size.sum(1), size_in.sum(1))
    torch.testing.assert_close((out * new_size).sum(1), (x * size_in).sum(1))
    # protected tokens stay unmerged, in place; sources are A tokens (even positions) merged into B
    assert torch.equal(keep[:, :protected], torch.arange(protected).expand(batch, protected))
    assert torch.equal(out[:, :protected], x[:, :protected])
    assert torch.equal(new_size[:, :protected], size_in[:, :protected])
    assert bool((src % 2 == 0).all()) and bool((src >= protected).all())
    assert bool((keep.gather(1, dst) % 2 == 1).all())


@settings(max_examples=60, deadline=None)
@given(merges())
def test_merge_matches_the_reference(case):
    x, metric, size, r, protected = case
    out, new_size, _ = run(*case)
    size_in = torch.ones(x.shape[:2], dtype=x.dtype) if size is None else size[..., 0]
    want, want_size, _ = ref.tome_merge(x, metric, size_in, r, protected)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(new_size[..., 0], want_size)


@settings(max_examples=60, deadline=None)
@given(merges())
def test_source_covers_each_input_once(case):
    x, metric, _, r, protected = case
    keep, src, dst = bipartite_soft_matching(metric, r, protected)
    source = merge_source(x, None, keep, src, dst)
    assert torch.equal(source.sum(1), torch.ones(x.shape[:2], dtype=x.dtype))
    sizes = merge_sizes(x, None, keep, src, dst)
    torch.testing.assert_close(source.sum(2, keepdim=True), sizes)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3), st.integers(2, 9), st.integers(2, 9), st.floats(0, 0.99), st.integers(0, 1000),
       st.booleans())
def test_grid_merge_unmerge(batch, h, w, ratio, seed, seeded):
    gen = torch.Generator().manual_seed(seed)
    a_pos, b_pos = grid_destinations(h, w, gen if seeded else None)
    assert len(b_pos) == (h // 2) * (w // 2) and len(a_pos) + len(b_pos) == h * w
    x = torch.randn(batch, h * w, 5, generator=gen, dtype=torch.float64)
    r = min(int(h * w * ratio), len(a_pos))
    keep, src, dst = grid_matching(x, a_pos, b_pos, r)
    size = merge_sizes(x, None, keep, src, dst)
    merged = merge_wavg(x, None, size, keep, src, dst, len(b_pos))
    assert merged.shape[1] == h * w - r
    back = unmerge(merged, unmerge_index(keep, src, dst))
    assert back.shape == x.shape
    want = ref.merge_unmerge(lambda t: t, x, x, b_pos.tolist(), r)
    torch.testing.assert_close(back, want.to(back.dtype))
