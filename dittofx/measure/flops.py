"""FLOP counts of a forward (or of a whole denoising loop), for the bound that goes next to a speed-up.

    from dittofx.measure.flops import count_flops
    base = count_flops(lambda: model(x))
    opt_flops = count_flops(lambda: opt(x))
    bound = base / opt_flops          # the FLOP-ratio bound on the speed-up

Counted with `torch.utils.flop_counter.FlopCounterMode` while the callable runs eagerly: matrix
multiplications, convolutions and attention (SDPA) only, the work that token merging, dropping and
attention reuse cut. Elementwise ops, norms and the passes' own bookkeeping (matching, gathers) are
not counted, so the ratio is an upper bound on what the rewrite can gain in compute-bound runs.

The count follows what really runs: a token count that depends on the data (RLT) is counted at its
value on these inputs, and a PAB loop counts only the attentions that computed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Q K^T and P V: 2 matmuls of (N_q x d) by (d x N_k) per batch and head, 2 FLOPs per MAC."""
    *batch, nq, d = query
    nk, dv = key[-2], value[-1]
    heads = 1
    for s in batch:
        heads *= s
    return 2 * heads * nq * nk * (d + dv)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls, convolutions and attentions that `fn()` runs (eagerly, in inference mode).

    torch's FlopCounterMode knows the CUDA attention kernels but not the CPU one, which it would count
    as free; its count is added here.
    """
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _sdpa_flops
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def flop_ratio(baseline: Callable[[], object], optimized: Callable[[], object]) -> tuple[float | None, int, int]:
    """(baseline FLOPs / optimized FLOPs, baseline FLOPs, optimized FLOPs); the ratio is None when the
    optimized count is 0 (nothing countable ran)."""
    base = count_flops(baseline)
    opt = count_flops(optimized)
    return (base / opt if opt else None), base, opt
