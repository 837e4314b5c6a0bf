"""The safety net: at its exact setting, the rewritten model computes what the original does.

A rewrite can be wrong in ways no test of the zoo foresaw (an in-place write the outlining missed, an
axis the analysis misread). So `optimize()` runs the rewritten module once on the example inputs at
the passes' exact setting (`Pass.exact()`: PAB's first call, which computes every attention; ToMe
r=0; RLT tau < 0) next to the original model, and refuses, in one line naming the pass and the first
block that differs, instead of returning a module that computes something else.

Cost: one forward of the original model and one of the rewritten module on the example inputs; when
a pass's exact setting is another pass (ToMe, RLT), the passes run once more at that setting on a
copy of the captured graph (it shares the parameters). Only on a failure does it run more (each prefix
of the pass list, and the graphs node by node) to say where.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from dittofx import runtime, signature
from dittofx.errors import InexactRewriteError
from dittofx.passes.base import Pass
from dittofx.rewriter.analysis import analyze
from dittofx.rewriter.capture import Capture
from dittofx.rewriter.edit import copy_module, values_at


def tolerance(reference: torch.Tensor) -> float:
    """What two exact computations of `reference` may differ by: rounding (another attention kernel,
    another summation order), relative to its largest value."""
    if not reference.is_floating_point():
        return 0.0
    eps = torch.finfo(reference.dtype).eps
    return max(1e-4, 8 * eps) * max(1.0, reference.detach().abs().max().item())


def difference(reference, got) -> tuple[float, float] | None:
    """(max |diff|, tolerance) of the first tensor output beyond tolerance, None when all agree."""
    ref, out = signature.tensor_leaves(reference), signature.tensor_leaves(got)
    if [p for p, _ in ref] != [p for p, _ in out]:
        return float("inf"), 0.0
    for (_, a), (_, b) in zip(ref, out):
        if a.shape != b.shape or a.dtype != b.dtype:
            return float("inf"), 0.0
        d = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        tol = tolerance(a)
        if not d <= tol:
            return d, tol
    return None


def check_exact(model: torch.nn.Module, passes: list[Pass], cap: Capture, base: fx.GraphModule,
                rewritten: fx.GraphModule, run) -> None:
    """InexactRewriteError unless the passes at their exact setting compute what `model` does.

    base: a copy of the captured graph before any pass; rewritten, run: the rewritten graph and what a
    call of it runs (its runner), used as they are when every pass is its own exact setting."""
    from dittofx.passes.manager import PassManager

    args, kwargs = cap.example_inputs, cap.example_kwargs
    with torch.no_grad():
        reference = model(*args, **kwargs)
    start = rng_state()  # in train mode, every graph run draws the masks the original's run drew
    exact = [p.exact() for p in passes]

    def rewrite(prefix: list[Pass]) -> fx.GraphModule:
        gm, _ = PassManager(prefix).run(model, dataclasses.replace(cap, graph_module=copy_module(base)))
        return gm

    def outputs(gm: fx.GraphModule, runner=None):
        runner = runner or runtime.make_runner(gm, False)
        set_rng_state(start)  # after making the runner, which may draw (a module's initialisation)
        try:
            with torch.no_grad():
                return runner(*args, **kwargs)
        finally:
            runtime.reset(gm)

    if all(e is p for e, p in zip(exact, passes)):
        gm, found = rewritten, difference(reference, outputs(rewritten, run))
    else:
        gm = rewrite(exact)
        found = difference(reference, outputs(gm))
    if found is None:
        return
    # where: the first pass whose exact prefix differs (none: the capture), then the first block
    d, tol = found
    culprit = -1
    for k in range(len(exact)):
        prefix_gm = rewrite(exact[:k + 1])
        if difference(reference, outputs(prefix_gm)) is not None:
            culprit, gm = k, prefix_gm
            break
    block = _first_block_differing(base, gm, cap)
    where = f", first in block {block}" if block else ""
    if culprit < 0:
        what = f"the captured graph of {type(model).__name__} differs from the model"
    else:
        p, e = passes[culprit], exact[culprit]
        what = f"pass {p.spec()!r} would change what {type(model).__name__} computes: at its exact setting " \
               f"({e.exact_setting or e.spec()}) the output differs from the original model's"
    raise InexactRewriteError(
        f"{what} by {d:.3g} (max |diff|, {tol:.1g} allowed){where}. dittofx refuses rather than return a module "
        f"that computes something else: please report this model to the dittofx developers "
        f"(optimize(..., check=False) skips this check)")


def rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _first_block_differing(base: fx.GraphModule, gm: fx.GraphModule, cap: Capture) -> str | None:
    """The first block (in the captured graph's order) whose closing residual add has another value in
    `gm` than in `base`; nodes are matched by name (passes keep the names of the nodes they leave)."""
    blocks = analyze(base, cap.batched_inputs).blocks
    closing = {b.name: b.mlp_residual or b.stream for b in blocks}
    closing = {k: v for k, v in closing.items() if v is not None}
    by_name = {n.name: n for n in gm.graph.nodes}
    pairs = {k: (v, by_name[v.name]) for k, v in closing.items() if v.name in by_name}
    flat = cap.flat_inputs()
    try:
        want = values_at(base, [a for a, _ in pairs.values()], flat)
        got = values_at(gm, [b for _, b in pairs.values()], flat)
    finally:
        runtime.reset(gm)
    for name, (a, b) in pairs.items():
        if a in want and b in got and difference(want[a], got[b]) is not None:
            return name
    return None
